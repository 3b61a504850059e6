"""fusedmerge: fused multi-tensor kernels for model merging."""

from . import torch_ops  # noqa: F401 — registers torch.ops.fusedmerge.*
from .dispatch import BackendStatus, backends
from .methods.arcee_fusion import arcee_fusion
from .methods.breadcrumbs import breadcrumbs
from .methods.dare import dare
from .methods.della import della
from .methods.linear import average, weighted_sum
from .methods.model_stock import model_stock
from .methods.nearswap import nearswap
from .methods.passthrough import passthrough
from .methods.sce import sce
from .methods.slerp import slerp
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties

__version__ = "0.1.0"
__all__ = ["average", "weighted_sum", "task_arithmetic", "dare", "ties", "slerp", "model_stock", "backends",
           "BackendStatus", "__version__", "passthrough"]
__all__ += ["della", "breadcrumbs", "sce", "nearswap", "arcee_fusion"]
