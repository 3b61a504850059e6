"""fusedmerge: fused multi-tensor kernels for model merging."""

from .dispatch import BackendStatus, backends
from .linear import average, task_arithmetic

__version__ = "0.1.0"
__all__ = ["average", "task_arithmetic", "backends", "BackendStatus", "__version__"]
