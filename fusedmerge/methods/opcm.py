"""OPCM continual merging (arXiv 2501.09522): models merged one after another, constant memory, one batched
projection per model (fusedmerge.opcm holds the merger and the projection). The result is defined by
fusedmerge.opcm.opcm_reference (FusionBench's loop, one full SVD per matrix), within the tolerances stated
there. Peers: FusionBench's OPCMForCLIP (its diagonal variant, non-leaf quirk and task order for a seed);
``merge_method: opcm`` in fusedmerge's own configuration files.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from .. import options as opt
from ..opcm import ContinualMerger, continual_merge, opcm_reference
from ..opcm.projection import VARIANTS, check_alpha, check_variant
from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, Method, Param

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpcmOptions:
    alpha: float = opt.option(0.5)
    variant: str = opt.option("fusionbench")
    skip_nonleaf: bool = opt.option(False)

    def __post_init__(self):
        opt.canonical(self, alpha=check_alpha(self.alpha), variant=check_variant(self.variant),
                      skip_nonleaf=opt.boolean(self.skip_nonleaf, "skip_nonleaf"))


OPCM_CONFIG = ConfigMethod(
    "opcm", None, needs_base=True, model_params={},
    global_params={"alpha": Param("number", 0.5, doc="kept share of the singular mass"),
                   "variant": Param("choice", "fusionbench", VARIANTS, doc="which entries the projection removes"),
                   "skip_nonleaf": Param("bool", False, doc="FusionBench's non-leaf-parameter quirk")},
    whole_model=True, doc="continual merging in the models' order, orthogonal projection")


def _fb_opcm(algo, pool):
    """Task order as FusionBench's for a seed (it seeds Python's generator before shuffling); per-step saving
    and evaluation need FusionBench's program and task pool and are not done here (logged when asked for)."""
    names = list(pool.names)
    if algo.seed is not None:
        random.seed(algo.seed)
    if algo.shuffle_order:
        random.shuffle(names)
    for option in ("save_on_every_step", "evaluate_on_every_step"):
        if getattr(algo, option):
            log.info(f"FusedOPCM: {option} needs FusionBench's program (log dir, task pool); not done here")
    algo.model_names = names
    merger = ContinualMerger(pool.pretrained(), algo.alpha, skip_nonleaf=True, backend=algo.backend)
    for name in names:
        merger.add(pool.load(name))
    return merger.merged()


OPCM = Method(
    "opcm", continual_merge, OpcmOptions, opcm_reference, ("combine",),
    config=(OPCM_CONFIG,),
    fusionbench=(FusionBenchAlgorithm("FusedOPCM", "OPCMForCLIP",
                                      (("alpha", REQUIRED), ("shuffle_order", True), ("seed", None),
                                       ("save_on_every_step", True), ("evaluate_on_every_step", False)), _fb_opcm,
                                      "FusionBench's OPCMForCLIP merge with fusedmerge's batched projection."),),
    grid=({"alpha": 0.5}, {"alpha": 0.8, "variant": "paper"}))
