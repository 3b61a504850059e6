"""fusedmerge: fused multi-tensor kernels for model merging."""

from . import torch_ops  # noqa: F401 — registers torch.ops.fusedmerge.*
from .dispatch import BackendStatus, backends
from .methods.dare import dare
from .methods.karcher import karcher
from .methods.linear import average, weighted_sum
from .methods.model_stock import model_stock
from .methods.multislerp import multislerp
from .methods.nuslerp import nuslerp
from .methods.slerp import slerp
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties

__version__ = "0.1.0"
__all__ = ["average", "weighted_sum", "task_arithmetic", "dare", "ties", "slerp", "model_stock", "backends",
           "BackendStatus", "__version__", "nuslerp", "multislerp", "karcher"]
