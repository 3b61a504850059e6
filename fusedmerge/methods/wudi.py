"""WUDI merging (arXiv 2503.08099), as FusionBench's WUDIMerging (wudi/wudi.py::wudi_merging). Per task
matrix, X starts at Σᵢ τᵢ and takes `iter_num` full-batch Adam steps (lr 1e-5, β = (0.9, 0.999), eps 1e-8,
FusionBench's hard-coded settings) on

    L(X) = Σᵢ ‖(X − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,      ∇L = 2 (X A − B),
    A = Σᵢ τᵢᵀτᵢ / ‖τᵢ‖²  (n×n),   B = Σᵢ τᵢ τᵢᵀτᵢ / ‖τᵢ‖²  (m×n)

out = θ0 + X; other entries θ0 + mean(τᵢ). A and B are formed once in fp64 (rounded to the work dtype), so
a step is one batched GEMM (m·n² per matrix) plus torch's Adam update on the whole batch, instead of
autograd through T products of m×m (≈ 6·T·m²·n). The iterates equal FusionBench's up to the rounding of
the gradient (Adam normalises each entry, so rounding-level gradient differences move entries by up to
lr per step where the gradient is tiny); tolerance in tests/test_svd_methods.py. A zero task vector
(FusionBench: 0/0, NaN) contributes nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .. import options as opt
from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param
from ._svd import keys_option, merge_matrices
from .svd_reference import wudi_reference

LR = 1e-5


@dataclass(frozen=True)
class WudiOptions:
    iter_num: int = opt.option(400)
    exclude_keys: Tuple[str, ...] = opt.option(())
    name: str = opt.option("tensor")
    out_dtype: Optional[torch.dtype] = opt.option(None)

    def __post_init__(self):
        n = opt.integer(self.iter_num, "iter_num")
        if n < 0:
            raise ValueError(f"iter_num must be ≥ 0, got {n}")
        opt.canonical(self, iter_num=n, exclude_keys=keys_option(self.exclude_keys), name=opt.text(self.name, "name"),
                      out_dtype=opt.out_dtype(self.out_dtype))


def wudi_batch(iter_num: int):
    def batch(taus: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """X after iter_num Adam steps for a batch [b, T, m, n] (module docstring)."""
        b, t, m, n = taus.shape
        A = taus.new_zeros((b, n, n), dtype=torch.float64)
        B = taus.new_zeros((b, m, n), dtype=torch.float64)
        for i in range(t):
            tau = taus[:, i].to(torch.float64)
            norm = tau.square().sum((-2, -1), keepdim=True)
            w = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
            G = (tau.mT @ tau) * w
            A += G
            B += tau @ G
        A, B = A.to(taus.dtype), B.to(taus.dtype)
        X = torch.nn.Parameter(taus.sum(1))
        adam = torch.optim.Adam([X], lr=LR, weight_decay=0)
        for _ in range(iter_num):
            X.grad = torch.baddbmm(B, X.detach(), A, beta=-1).mul_(2)
            adam.step()
        return X.detach()

    return batch


@torch.no_grad()
def wudi(base, inputs, iter_num: int = 400, *, exclude_keys=(), name: str = "tensor",
         out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """WUDI of fine-tuned models onto `base` over tensors (matrices), state dicts or modules (the forms of
    `average`): FusionBench's Adam iterations with the closed-form gradient, every matrix of one shape in
    one batch; see the module docstring."""
    o = WudiOptions(iter_num, exclude_keys, name, out_dtype)
    return merge_matrices("wudi", base, inputs, wudi_batch(o.iter_num), exclude_keys=o.exclude_keys, name=o.name,
                          out_dtype=o.out_dtype, backend=backend, tall=False)


# --- peers --------------------------------------------------------------------------------------------------


def _config_wudi(call: GroupCall):
    n = call.param("iter_num", WUDI_CONFIG)
    if n != int(n) or n < 0:
        raise opt.ConfigError(f"parameters.iter_num must be a whole number ≥ 0, got {n}")
    return wudi(call.base, call.models, int(n), name=call.name, out_dtype=call.out_dtype, backend=call.backend)


WUDI_CONFIG = ConfigMethod(
    "wudi", None, needs_base=True, model_params={},
    global_params={"iter_num": Param("number", 400, doc="Adam steps per matrix")},
    merge=_config_wudi, doc="WUDI: Adam on Σᵢ‖(X − τᵢ)τᵢᵀ‖²/‖τᵢ‖², closed-form gradient")


def _fb_wudi(algo, pool):
    return wudi(pool.pretrained(), pool.finetuned(), algo.iter_num, exclude_keys=algo.exclude_keys,
                backend=algo.backend)


WUDI = Method(
    "wudi", wudi, WudiOptions, wudi_reference, ("combine",),
    config=(WUDI_CONFIG,),
    fusionbench=(FusionBenchAlgorithm("FusedWUDIMerging", "WUDIMerging",
                                      (("iter_num", REQUIRED), ("exclude_keys", None)), _fb_wudi,
                                      "WUDI with the closed-form gradient, batched. A new module."),),
    grid=({"iter_num": 2}, {"iter_num": 1, "exclude_keys": ["enc.0.fc.weight"]}))
