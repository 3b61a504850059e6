"""fusedmerge: fused multi-tensor kernels for model merging."""

from . import torch_ops  # noqa: F401 — registers torch.ops.fusedmerge.*
from .dispatch import BackendStatus, backends
from .methods.dare import dare
from .methods.iso_c import iso_c
from .methods.iso_cts import iso_cts
from .methods.linear import average, weighted_sum
from .methods.magmax import magmax
from .methods.model_stock import model_stock
from .methods.slerp import slerp
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties
from .methods.tsv_m import tsv_m
from .methods.wudi import wudi

__version__ = "0.1.0"
__all__ = ["average", "weighted_sum", "task_arithmetic", "dare", "ties", "slerp", "model_stock", "backends",
           "BackendStatus", "__version__"]
__all__ += ["tsv_m", "iso_c", "iso_cts", "magmax", "wudi"]  # the singular-vector family
