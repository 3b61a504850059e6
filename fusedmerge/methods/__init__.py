"""The merge methods, one module each, and the registry that lists them.

A module holds a method's public function, its frozen options, the pointer to its reference, the kernel
primitives it runs on and its peers' conventions (``Method`` in _spec.py). The CLI's configuration checks
and help, the mergekit plugin, the FusionBench classes, the torch custom ops and the generic backend test
are generated from ``METHODS``; adding a method is its module, one line here, its test and README.
"""

from __future__ import annotations

from typing import Dict

from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param
from .arcee_fusion import ARCEE_FUSION
from .breadcrumbs import BREADCRUMBS
from .dare import DARE
from .della import DELLA
from .iso_c import ISO_C
from .iso_cts import ISO_CTS
from .karcher import KARCHER
from .linear import AVERAGE, WEIGHTED_SUM
from .magmax import MAGMAX
from .model_stock import MODEL_STOCK
from .multislerp import MULTISLERP
from .nearswap import NEARSWAP
from .nuslerp import NUSLERP
from .opcm import OPCM
from .passthrough import PASSTHROUGH
from .sce import SCE
from .slerp import SLERP
from .task_arithmetic import TASK_ARITHMETIC
from .ties import TIES
from .tsv_m import TSV_M
from .wudi import WUDI

METHODS: Dict[str, Method] = {m.name: m for m in (AVERAGE, WEIGHTED_SUM, TASK_ARITHMETIC, DARE, TIES, SLERP, MODEL_STOCK,
                                                    OPCM,
                                                    PASSTHROUGH)}
METHODS.update({m.name: m for m in (DELLA, BREADCRUMBS, SCE, NEARSWAP, ARCEE_FUSION)})  # the sparsification family
METHODS.update({m.name: m for m in (TSV_M, ISO_C, ISO_CTS, MAGMAX, WUDI)})  # the singular-vector family
METHODS.update({m.name: m for m in (NUSLERP, MULTISLERP, KARCHER)})  # the geometric family
CONFIG_METHODS: Dict[str, ConfigMethod] = {c.name: c for m in METHODS.values() for c in m.config}
FUSIONBENCH_ALGORITHMS: Dict[str, FusionBenchAlgorithm] = {a.name: a for m in METHODS.values() for a in m.fusionbench}

__all__ = ["METHODS", "CONFIG_METHODS", "FUSIONBENCH_ALGORITHMS", "Method", "ConfigMethod", "FusionBenchAlgorithm",
           "GroupCall", "Param", "REQUIRED"]
