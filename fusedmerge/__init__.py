"""fusedmerge: fused multi-tensor kernels for model merging."""

import gc as _gc

_collecting = _gc.isenabled()
_gc.disable()  # importing torch and the methods makes ~10^6 objects and no cycles worth collecting: the collector's
try:  # passes were 0.25-0.5 s of a 3.5-4 s `import fusedmerge` on a 2-core VM
    from . import torch_ops  # noqa: F401 — registers torch.ops.fusedmerge.*
    from .adamerging import FusedLayerWiseMergedModel, FusedTaskWiseMergedModel, adamerging
    from .dispatch import BackendStatus, backends
    from .learned import MergedModel, differentiable_merge, entropy_loss
    from .methods.arcee_fusion import arcee_fusion
    from .methods.breadcrumbs import breadcrumbs
    from .methods.dare import dare
    from .methods.della import della
    from .methods.iso_c import iso_c
    from .methods.iso_cts import iso_cts
    from .methods.karcher import karcher
    from .methods.linear import average, weighted_sum
    from .methods.magmax import magmax
    from .methods.model_stock import model_stock
    from .methods.multislerp import multislerp
    from .methods.nearswap import nearswap
    from .methods.nuslerp import nuslerp
    from .methods.passthrough import passthrough
    from .methods.sce import sce
    from .methods.slerp import slerp
    from .methods.task_arithmetic import task_arithmetic
    from .methods.ties import ties
    from .methods.tsv_m import tsv_m
    from .methods.wudi import wudi
    from .soups import GreedySoup, LearnedSoup, fit_learned_soup, greedy_soup
finally:
    if _collecting:
        _gc.enable()

__version__ = "0.1.0"
__all__ = ["average", "weighted_sum", "task_arithmetic", "dare", "ties", "slerp", "model_stock", "backends",
           "BackendStatus", "__version__", "passthrough",
           "nuslerp", "multislerp", "karcher",
           "della", "breadcrumbs", "sce", "nearswap", "arcee_fusion",
           "tsv_m", "iso_c", "iso_cts", "magmax", "wudi",
           "differentiable_merge", "MergedModel", "entropy_loss", "FusedTaskWiseMergedModel", "FusedLayerWiseMergedModel",
           "adamerging", "greedy_soup", "GreedySoup", "LearnedSoup", "fit_learned_soup"]
