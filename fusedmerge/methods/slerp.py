"""SLERP: spherical linear interpolation of two models, tensor by tensor (each flattened to one vector).

    per tensor: â = a/‖a‖, b̂ = b/‖b‖ (a norm ≤ eps is left at 1), d = ⟨â, b̂⟩
                |d| > dot_threshold:  cₐ = 1 − t,  c_b = t                       (lerp)
                otherwise:            θ = acos(d), cₐ = sin((1−t)θ)/sin θ, c_b = sin(tθ)/sin θ
    out = cₐ·a + c_b·b

a is the base (t = 0 gives it), b the one other model. The three sums Σa², Σb², Σab of every tensor of a
group are one launch of the ``dots`` primitive (fp64, fusedmerge/reductions.py), the coefficients one
vectorised fp64 step over all tensors with the conventions of the peer named by ``variant``:
``"mergekit"`` (mergekit 0.1.5 slerp.py: norms ≤ eps left at 1, d clamped to [−1, 1]) or ``"fusionbench"``
(FusionBench slerp_utils.slerp: unclamped d, sin(θ₀ − tθ₀)), and the elementwise step cₐ·a + c_b·b one
fused linear-combination launch (reference.combine_reference: fp32, fp64 for fp64 inputs, rounded once).
The peers compute their norms and dot in fp32 (fp64) by their own summation order, so their coefficients
differ from these fp64 ones by fp32 rounding: results are within 2 ulps of the output dtype (relative to
max(|a|, |b|) elementwise) of theirs, and usually equal (tests/test_slerp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import options as opt
from .. import reference
from .._forms import Forms, Slot, gather, gather_like, prepare
from ..reductions import DotsJob, DotsSpec
from ._reduce import combine_rows, group_sums, reduce_blocks, run_combine
from ._spec import REQUIRED, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param

VARIANTS = ("mergekit", "fusionbench")


@dataclass(frozen=True)
class SlerpOptions:
    t: float = opt.option(op=float)
    variant: str = opt.option("mergekit", op=str)
    dot_threshold: float = opt.option(0.9995, op=float)
    eps: float = opt.option(1e-8, op=float)
    name: str = opt.option("tensor", op=str)
    out_dtype: Optional[torch.dtype] = opt.option(None, op=Optional[torch.dtype])

    def __post_init__(self):
        opt.canonical(self, t=opt.real(self.t, "t"), variant=opt.choice(self.variant, "variant", VARIANTS),
                      dot_threshold=opt.real(self.dot_threshold, "dot_threshold"), eps=opt.real(self.eps, "eps"),
                      name=opt.text(self.name, "name"), out_dtype=opt.out_dtype(self.out_dtype))


def coefficients(sums: torch.Tensor, t: torch.Tensor, variant: str = "mergekit", threshold: float = 0.9995,
                 eps: float = 1e-8) -> torch.Tensor:
    """[rows, 2] fp64 (cₐ, c_b) from the sums [rows, 3] = (Σa², Σb², Σab) and t [rows], as `variant` does."""
    t = t.to(torch.float64)
    norm_a, norm_b = sums[:, 0].sqrt(), sums[:, 1].sqrt()
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = sums[:, 2] / (norm_a * norm_b)
    if variant == "mergekit":
        dot = dot.clamp(-1, 1)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    far = (torch.sin((1 - t) * theta) if variant == "mergekit" else torch.sin(theta - theta * t)) / sin_theta
    return torch.stack([torch.where(linear, 1 - t, far), torch.where(linear, t, torch.sin(t * theta) / sin_theta)], 1)


SUMS = DotsSpec(((0, 0), (1, 1), (0, 1)))


def _merge_pairs(slots, rows, t: torch.Tensor, o: SlerpOptions, backend: str,
                 sums: Optional[torch.Tensor] = None) -> None:
    """One dots launch for every slot's sums (per tensor, or per row: `rows`; or the given `sums`), one
    combine launch."""
    if sums is None:
        sums = group_sums([DotsJob(s.inputs, None, r) for s, r in zip(slots, rows)], SUMS, backend)
    c = coefficients(sums, t, o.variant, o.dot_threshold, o.eps)
    run_combine([job for s, r, cs in zip(slots, rows, torch.split(c, rows))
                 for job in combine_rows(s.out, s.inputs, None, cs, "t", s.key)], backend)


@torch.no_grad()
def slerp(base, inputs, t: float, *, variant: str = "mergekit", dot_threshold: float = 0.9995, eps: float = 1e-8,
          name: str = "tensor", out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """SLERP from `base` (t = 0) to the one model of `inputs` (t = 1), tensor by tensor, over tensors, state
    dicts or modules (the forms of `average`); see the module docstring. Integer buffers are taken when
    both models agree."""
    return _slerp(base, inputs, SlerpOptions(t, variant, dot_threshold, eps, name, out_dtype), backend)


def _slerp(base, inputs, o: SlerpOptions, backend: str, sums: Optional[torch.Tensor] = None):
    """slerp; `sums`: the sums of every tensor when already known (a row block's: the whole tensor's)."""
    forms = gather(inputs, name=o.name)
    if len(forms.dicts) != 1:
        raise ValueError(f"slerp interpolates between base and exactly one model; inputs has {len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base")
    pair = Forms(forms.kind, [base_dict, forms.dicts[0]], base, forms.name)
    merged, slots = prepare(pair, None, o.out_dtype)
    _merge_pairs(slots, [1] * len(slots), torch.full((len(slots),), o.t, dtype=torch.float64), o, backend, sums)
    return pair.wrap(merged)


# --- peers --------------------------------------------------------------------------------------------------


def _mergekit_slerp(call: GroupCall, sums: Optional[torch.Tensor] = None):
    if len(call.models) != 1:
        raise ValueError(f"slerp needs the base and exactly one other model, got {len(call.models)} others")
    o = SlerpOptions(call.param("t", MERGEKIT_SLERP), out_dtype=call.out_dtype)
    return _slerp(call.base, call.models, o, call.backend, sums)


def _mergekit_slerp_batch(tensors: Sequence[torch.Tensor], base_index, params) -> torch.Tensor:
    """mergekit's batched slerp: rows of one shape, t per row; one dots and one combine launch for all rows."""
    if not tensors[0].is_floating_point():
        raise TypeError("SLERP requires floating-point tensors")
    if base_index is None or len(tensors) != 2:
        raise ValueError("SLERP requires a base and one other input")
    a, b = tensors[base_index], tensors[1 - base_index]
    rows = a.shape[0]
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    t = torch.as_tensor(params["t"], dtype=torch.float64).reshape(-1).expand(rows).cpu()
    _merge_pairs([Slot("batch", out, [a, b], None)], [rows], t, SlerpOptions(0.0), "auto")
    return out


def _operands(call: GroupCall):
    """([a, b], no base) of a row block (RowBlocks): SUMS are over the base and the model themselves."""
    name, base, inputs = call.block()
    return [base] + inputs, None


def _check_pair(models) -> None:
    if len(models) != 1:
        raise opt.ConfigError(f"slerp merges base_model and exactly one other model; models lists {len(models)} "
                              "besides the base")


MERGEKIT_SLERP = ConfigMethod(
    "slerp", "mergekit", needs_base=True, model_params={},
    global_params={"t": Param("number", REQUIRED, doc="0 gives base_model, 1 the other model")},
    merge=_mergekit_slerp, check=_check_pair, batch=_mergekit_slerp_batch,
    blocks=reduce_blocks(lambda n: SUMS, _operands, lambda call: False, _mergekit_slerp),
    doc="spherical interpolation from base_model to the other model, per tensor")


def _fb_slerp(algo, pool):
    names = pool.all_names
    if len(names) != 2:
        raise ValueError(f"Slerp expect exactly 2 models, got {len(names)}")
    primary, secondary = pool.load(names[0]), pool.load(names[1])
    return slerp(primary, [secondary], algo.t, variant="fusionbench", dot_threshold=algo.DOT_THRESHOLD,
                 eps=algo.epsilon, backend=algo.backend)


SLERP = Method(
    "slerp", slerp, SlerpOptions, reference.combine, ("dots", "combine"), n_inputs=1,
    config=(MERGEKIT_SLERP,),
    fusionbench=(FusionBenchAlgorithm("FusedSlerpMerge", "SlerpMergeAlgorithm",
                                      (("t", REQUIRED), ("DOT_THRESHOLD", 0.9995), ("epsilon", 1e-8)), _fb_slerp,
                                      "SLERP of the pool's two models (t = 0: the first). A new module."),),
    grid=({"t": 0.3}, {"t": 0.7, "variant": "fusionbench"}, {"t": 0.5, "dot_threshold": 0.0},
          {"t": 1.4, "out_dtype": torch.float32}))

