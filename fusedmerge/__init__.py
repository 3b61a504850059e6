"""fusedmerge: fused multi-tensor kernels for model merging."""

from .dispatch import BackendStatus, backends
from .dare import dare
from .linear import average, task_arithmetic, weighted_sum
from .ties import ties
from . import torch_ops  # noqa: E402,F401 — registers torch.ops.fusedmerge.*

__version__ = "0.1.0"
__all__ = ["average", "weighted_sum", "task_arithmetic", "dare", "ties", "backends", "BackendStatus", "__version__"]
