"""fusedmerge: fused multi-tensor kernels for model merging."""

from . import torch_ops  # noqa: F401 — registers torch.ops.fusedmerge.*
from .adamerging import FusedLayerWiseMergedModel, FusedTaskWiseMergedModel, adamerging
from .dispatch import BackendStatus, backends
from .learned import MergedModel, differentiable_merge, entropy_loss
from .methods.dare import dare
from .methods.linear import average, weighted_sum
from .methods.model_stock import model_stock
from .methods.slerp import slerp
from .methods.task_arithmetic import task_arithmetic
from .methods.ties import ties
from .soups import GreedySoup, LearnedSoup, fit_learned_soup, greedy_soup

__version__ = "0.1.0"
__all__ = ["average", "weighted_sum", "task_arithmetic", "dare", "ties", "slerp", "model_stock", "backends",
           "BackendStatus", "__version__",
           "differentiable_merge", "MergedModel", "entropy_loss", "FusedTaskWiseMergedModel", "FusedLayerWiseMergedModel",
           "adamerging", "greedy_soup", "GreedySoup", "LearnedSoup", "fit_learned_soup"]
