"""SLERP: spherical linear interpolation of two models, tensor by tensor (each flattened to one vector).

    per tensor: â = a/‖a‖, b̂ = b/‖b‖ (a norm ≤ eps is left at 1), d = ⟨â, b̂⟩
                |d| > dot_threshold:  cₐ = 1 − t,  c_b = t                       (lerp)
                otherwise:            θ = acos(d), cₐ = sin((1−t)θ)/sin θ, c_b = sin(tθ)/sin θ
    out = cₐ·a + c_b·b

a is the base (t = 0 gives it), b the one other model. The per-tensor coefficients are computed exactly as
the peer named by ``variant`` computes them (the same torch operations on the tensors' device, so the same
bits): ``"mergekit"`` (mergekit 0.1.5 slerp.py: norms of chunk norms, dot of normalised chunks clamped to
[−1, 1], in fp32, fp64 for fp64 inputs) or ``"fusionbench"`` (FusionBench slerp_utils.slerp: fp32 norm,
unclamped dot, θ₀ − θ₀t). The elementwise step cₐ·a + c_b·b is the fused linear combination
(reference.combine_reference), so with the peers' coefficients the result equals theirs bit for bit: both
compute it in fp32 (fp64) without FMA and round once to the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import options as opt
from .. import reference
from .._forms import Forms, Terms, gather, gather_like, merge_linear
from ._spec import REQUIRED, BlockPass, ConfigMethod, FusionBenchAlgorithm, GroupCall, Method, Param, RowBlocks, Span

VARIANTS = ("mergekit", "fusionbench")
MERGEKIT_CHUNK = 1 << 20  # mergekit's _CHUNK_ELEMENTS: its norms and dot are summed chunk by chunk


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


def mergekit_coefficients(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, threshold: float = 0.9995,
                          eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cₐ, c_b) per row of a, b [rows, n] and t [rows], as mergekit 0.1.5's slerp() computes them."""
    dtype = _dtype(a)
    t = t.reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return 1 - t, t
    norm_a, norm_b = (unit_norm(chunk_norms(x), eps) for x in (a, b))
    return from_dot(sum_dots(chunk_dots(a, b, norm_a, norm_b)), t, threshold)


# mergekit's reductions, chunk by chunk (MERGEKIT_CHUNK elements per row block of a [rows, n] pair): the
# chunks' norms and dot products are computed alone, then stacked and reduced, so a tensor merged in row
# blocks of whole chunks (RowBlocks) gets the very same bits.


def _dtype(a: torch.Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _spans(x: torch.Tensor):
    chunk = max(1, MERGEKIT_CHUNK // x.shape[0])
    return [(s, s + chunk) for s in range(0, x.shape[1], chunk)]


def chunk_norms(x: torch.Tensor) -> List[torch.Tensor]:
    return [torch.linalg.vector_norm(x[:, i:j].to(_dtype(x)), dim=1, keepdim=True) for i, j in _spans(x)]


def unit_norm(norms: List[torch.Tensor], eps: float) -> torch.Tensor:
    """The norm from its chunks' norms, a norm ≤ eps taken as 1."""
    norm = torch.linalg.vector_norm(torch.stack(norms), dim=0)
    return torch.where(norm > eps, norm, 1)


def chunk_dots(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> List[torch.Tensor]:
    dtype = _dtype(a)
    return [((a[:, i:j].to(dtype) / norm_a) * (b[:, i:j].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
            for i, j in _spans(a)]


def sum_dots(dots: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(dots).sum(dim=0).clamp(-1, 1)


def from_dot(dot: torch.Tensor, t: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cₐ, c_b) from the clamped dot products of the unit vectors."""
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    return (torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta),
            torch.where(linear, t, torch.sin(t * theta) / sin_theta))


def fusionbench_coefficients(a: torch.Tensor, b: torch.Tensor, t: float, threshold: float = 0.9995,
                             eps: float = 1e-8) -> Tuple[float, float]:
    """(s₀, s₁) as FusionBench 0.2.33's slerp_utils.slerp computes them (inputs other than fp32/fp64 in fp32)."""
    if a.dtype not in (torch.float32, torch.float64):
        a, b = a.float(), b.float()
    unit = lambda v: v / n if (n := torch.linalg.norm(v)) > eps else v  # noqa: E731
    dot = torch.sum(unit(a) * unit(b))
    if torch.abs(dot) > threshold:
        return 1 - t, t
    theta_0 = torch.arccos(dot)
    sin_theta_0 = torch.sin(theta_0)
    theta_t = theta_0 * t
    return float(torch.sin(theta_0 - theta_t) / sin_theta_0), float(torch.sin(theta_t) / sin_theta_0)


def coefficients(a: torch.Tensor, b: torch.Tensor, o: SlerpOptions) -> Tuple[float, float]:
    """The two coefficients of one tensor pair under the options' variant."""
    if o.variant == "fusionbench":
        return fusionbench_coefficients(a, b, o.t, o.dot_threshold, o.eps)
    t = torch.tensor([o.t], dtype=torch.float64)
    ca, cb = mergekit_coefficients(a.reshape(1, -1), b.reshape(1, -1), t, o.dot_threshold, o.eps)
    return float(ca), float(cb)


@torch.no_grad()
def slerp(base, inputs, t: float, *, variant: str = "mergekit", dot_threshold: float = 0.9995, eps: float = 1e-8,
          name: str = "tensor", out_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """SLERP from `base` (t = 0) to the one model of `inputs` (t = 1), tensor by tensor, over tensors, state
    dicts or modules (the forms of `average`); see the module docstring. Integer buffers are taken when
    both models agree."""
    return _slerp(SlerpOptions(t, variant, dot_threshold, eps, name, out_dtype), base, inputs, backend)


def _slerp(o: SlerpOptions, base, inputs, backend: str, coeffs: Optional[Tuple[float, float]] = None):
    """`slerp` with its options; `coeffs` when the inputs are a row block of a tensor whose coefficients were
    reduced block by block (RowBlocks)."""
    forms = gather(inputs, name=o.name)
    if len(forms.dicts) != 1:
        raise ValueError(f"slerp interpolates between base and exactly one model; inputs has {len(forms.dicts)}")
    base_dict = gather_like(base, forms, "base")
    pair = Forms(forms.kind, [base_dict, forms.dicts[0]], base, forms.name)
    terms = lambda slots: [Terms(coeffs or coefficients(s.inputs[0], s.inputs[1], o)) for s in slots]  # noqa: E731
    return pair.wrap(merge_linear(pair, terms, None, o.out_dtype, backend, arg="t"))


# --- peers --------------------------------------------------------------------------------------------------


def _mergekit_options(call: GroupCall) -> SlerpOptions:
    if len(call.models) != 1:
        raise ValueError(f"slerp needs the base and exactly one other model, got {len(call.models)} others")
    return SlerpOptions(call.param("t", MERGEKIT_SLERP), out_dtype=call.out_dtype)


def _pair(call: GroupCall):
    _, a, (b,) = call.block()
    return a.reshape(1, -1), b.reshape(1, -1)


def _block_coefficients(call: GroupCall, span: Span, stats) -> dict:
    o = _mergekit_options(call)
    _, a, _ = call.block()
    if not a.is_floating_point():  # integer buffers: taken where the models agree, as whole
        return _slerp(o, call.base, call.models, call.backend)
    t = torch.tensor([o.t], dtype=torch.float64).reshape(-1, 1).to(_dtype(a))
    ca, cb = from_dot(stats[1], t, o.dot_threshold)
    return _slerp(o, call.base, call.models, call.backend, (float(ca), float(cb)))


def _concat(x, y):
    return tuple(p + q for p, q in zip(x, y))


# mergekit's per-tensor norms, then dot products, chunk by chunk over the blocks (whole chunks each).
SLERP_BLOCKS = RowBlocks(
    passes=(BlockPass(lambda call, span, _: tuple(chunk_norms(x) for x in _pair(call)), _concat,
                      lambda norms, _: tuple(unit_norm(n, 1e-8) for n in norms)),
            BlockPass(lambda call, span, norms: (chunk_dots(*_pair(call), *norms),), _concat,
                      lambda dots, norms: (norms, sum_dots(dots[0])))),
    merge=_block_coefficients, align=lambda shape, call: MERGEKIT_CHUNK)


def _mergekit_slerp_batch(tensors: Sequence[torch.Tensor], base_index, params) -> torch.Tensor:
    """mergekit's batched slerp: rows of one shape, t per row; one fused launch for all rows."""
    if not tensors[0].is_floating_point():
        raise TypeError("SLERP requires floating-point tensors")
    if base_index is None or len(tensors) != 2:
        raise ValueError("SLERP requires a base and one other input")
    a, b = tensors[base_index], tensors[1 - base_index]
    rows = a.shape[0]
    ca, cb = mergekit_coefficients(a.reshape(rows, -1), b.reshape(rows, -1), params["t"])
    keys = [str(r) for r in range(rows)]
    forms = gather([{k: a[r] for r, k in enumerate(keys)}, {k: b[r] for r, k in enumerate(keys)}])
    merged = merge_linear(forms, lambda slots: [Terms([float(ca[int(s.key)]), float(cb[int(s.key)])]) for s in slots],
                          None, a.dtype, "auto")
    return torch.stack([merged[k] for k in keys])


def _check_pair(models) -> None:
    if len(models) != 1:
        raise opt.ConfigError(f"slerp merges base_model and exactly one other model; models lists {len(models)} "
                              "besides the base")


MERGEKIT_SLERP = ConfigMethod(
    "slerp", "mergekit", needs_base=True, model_params={},
    global_params={"t": Param("number", REQUIRED, doc="0 gives base_model, 1 the other model")},
    merge=lambda call: _slerp(_mergekit_options(call), call.base, call.models, call.backend), check=_check_pair,
    batch=_mergekit_slerp_batch, doc="spherical interpolation from base_model to the other model, per tensor",
    blocks=SLERP_BLOCKS)


def _fb_slerp(algo, pool):
    names = pool.all_names
    if len(names) != 2:
        raise ValueError(f"Slerp expect exactly 2 models, got {len(names)}")
    primary, secondary = pool.load(names[0]), pool.load(names[1])
    return slerp(primary, [secondary], algo.t, variant="fusionbench", dot_threshold=algo.DOT_THRESHOLD,
                 eps=algo.epsilon, backend=algo.backend)


SLERP = Method(
    "slerp", slerp, SlerpOptions, reference.combine, ("combine",), n_inputs=1,
    config=(MERGEKIT_SLERP,),
    fusionbench=(FusionBenchAlgorithm("FusedSlerpMerge", "SlerpMergeAlgorithm",
                                      (("t", REQUIRED), ("DOT_THRESHOLD", 0.9995), ("epsilon", 1e-8)), _fb_slerp,
                                      "SLERP of the pool's two models (t = 0: the first). A new module."),),
    grid=({"t": 0.3}, {"t": 0.7, "variant": "fusionbench"}, {"t": 0.5, "dot_threshold": 0.0},
          {"t": 1.4, "out_dtype": torch.float32}))

