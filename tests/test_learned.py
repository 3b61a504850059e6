"""The differentiable fused merge (fusedmerge/learned.py) and the AdaMerging drop-ins (adamerging.py):
coefficient gradients against autograd through a plain-torch merge (fp64 gradcheck; fp32 within the
summation bound), task-wise and layer-wise, clamp and softmax; FusionBench 0.2.33's merged weights (bits)
and gradients for the same inputs; functional_call, a training loop, backends, no N·P autograd graph."""

import copy

import pytest
import torch
from torch import nn

from conftest import STATUS, same_bits
from fusedmerge import (
    FusedLayerWiseMergedModel,
    FusedTaskWiseMergedModel,
    MergedModel,
    adamerging,
    differentiable_merge,
    entropy_loss,
)

N = 3


def _dicts(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (7, 5), "b": (5,), "v": (3, 2, 4)}
    base = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    vectors = [{k: torch.randn(s, generator=g, dtype=dtype) * 0.1 for k, s in shapes.items()} for _ in range(N)]
    return base, vectors


def _plain_merge(base, vectors, lam):
    """FusionBench's merge: θ0 + λ₁τ₁ + λ₂τ₂ + … with autograd."""
    lam = lam[:, None].expand(-1, len(base)) if lam.dim() == 1 else lam
    out = dict(base) if base is not None else None
    for row, v in zip(lam, vectors):
        for w, k in zip(row, v):
            out[k] = out[k] + v[k] * w
    return out


def _transform(lam, clamp, softmax):
    lam = lam.clamp(0, 1) if clamp else lam
    return lam.softmax(dim=0) if softmax else lam


VARIANTS = [pytest.param(shape, clamp, softmax, id=f"{'layer' if len(shape) == 2 else 'task'}"
                         f"{'-clamp' if clamp else ''}{'-softmax' if softmax else ''}")
            for shape in ((N,), (N, 3)) for clamp, softmax in ((False, False), (True, False), (False, True),
                                                                (True, True))]


def _raw(shape, dtype):
    # values inside and outside [0, 1], away from the clamp's kinks
    return (torch.linspace(-0.43, 1.37, torch.Size(shape).numel(), dtype=dtype).reshape(shape)
            .roll(1)).requires_grad_(True)


@pytest.mark.parametrize("shape, clamp, softmax", VARIANTS)
def test_gradcheck_fp64(shape, clamp, softmax):
    base, vectors = _dicts(torch.float64)
    lam = _raw(shape, torch.float64)

    def merged(raw):
        out = differentiable_merge(base, vectors, _transform(raw, clamp, softmax))
        return tuple(torch.sin(t) for t in out.values())

    assert torch.autograd.gradcheck(merged, (lam,), fast_mode=True)


@pytest.mark.parametrize("shape, clamp, softmax", VARIANTS)
def test_fp32_equals_plain_torch(shape, clamp, softmax, backend="auto"):
    """Merged weights: the same bits as the plain fold (on every backend: test_backward_same_bits_...).
    Coefficient gradients: autograd's fp32 sum within the recursive summation bound P·2⁻²⁴·Σ|g·τ| (ours
    is an fp64 sum rounded once)."""
    base, vectors = _dicts(torch.float32)
    weights = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in base.items()}
    results = []
    for merge in (lambda lam: differentiable_merge(base, vectors, lam, backend=backend),
                  lambda lam: _plain_merge(base, vectors, lam)):
        raw = _raw(shape, torch.float32)
        out = merge(_transform(raw, clamp, softmax))
        loss = sum((torch.tanh(out[k]) * weights[k]).sum() for k in out)
        loss.backward()
        results.append(({k: t.detach() for k, t in out.items()}, raw.grad))
    (fused, g_fused), (plain, g_plain) = results
    for k in plain:
        assert same_bits(fused[k], plain[k]), k
    # the bound, per coefficient: recompute Σ|g·τ| per (model, key) and sum as the raw λ sees it
    out = {k: plain[k].clone().requires_grad_(True) for k in plain}
    sum((torch.tanh(out[k]) * weights[k]).sum() for k in out).backward()
    numel = max(t.numel() for t in base.values())
    abs_dots = torch.tensor([[float((out[k].grad.double() * v[k].double()).abs().sum()) for k in v] for v in vectors])
    scale = abs_dots.sum(1) if len(shape) == 1 else abs_dots
    bound = numel * 2.0**-24 * (scale.sum() if softmax else scale) + 1e-30
    assert ((g_fused.double() - g_plain.double()).abs() <= bound).all()
    assert not same_bits(g_fused, torch.zeros_like(g_fused))


def test_backward_same_bits_on_every_backend():
    base, vectors = _dicts(torch.float32, seed=3)
    grads = []
    for backend in ["torch"] + [n for n in ("cpu", "triton") if STATUS[n].available and "cpu" in STATUS[n].devices]:
        lam = torch.full((N, 3), 0.3, requires_grad=True)
        out = differentiable_merge(base, vectors, lam, backend=backend)
        sum((t.sin() * t).sum() for t in out.values()).backward()
        grads.append(lam.grad)
    assert all(same_bits(g, grads[0]) for g in grads[1:])


def test_no_autograd_graph_of_model_size():
    """The plain merge's graph keeps every τ (N·P elements saved); the fused merge saves nothing."""
    base, vectors = _dicts(torch.float32)
    saved = []
    for merge in (differentiable_merge, _plain_merge):
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            merge(base, vectors, torch.full((N, 3), 0.3, requires_grad=True))
        saved.append(count[0])
    assert saved[0] == 0 and saved[1] >= N * sum(t.numel() for t in base.values())


def test_refusals():
    base, vectors = _dicts(torch.float32)
    with pytest.raises(ValueError, match="coeffs must have shape"):
        differentiable_merge(base, vectors, torch.zeros(N, 2))
    with pytest.raises(ValueError, match="merge coefficients"):
        differentiable_merge(base, vectors, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="vectors\\[1\\]"):
        differentiable_merge(base, [vectors[0], {"b": vectors[1]["b"]}], torch.zeros(2))


# --- FusionBench drop-ins --------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.fc2(self.norm(torch.relu(self.fc1(x))) * self.scale)


def _models(seed=0):
    torch.manual_seed(seed)
    base = Net()
    base.norm.bias.requires_grad_(False)  # frozen: deleted from the task vectors, taken from θ0
    models = []
    for _ in range(N):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        models.append(m)
    return base, models


def _pair(kind, clamp, normalized):
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel
    from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel

    base, models = _models()
    layers = sum(p.requires_grad for p in base.parameters())
    weight = torch.linspace(-0.2, 1.1, N * layers).reshape(N, layers) if kind == "layer" else torch.tensor([0.3, -0.1, 0.8])
    pair = []
    for cls in ((LayerWiseMergedModel, FusedLayerWiseMergedModel) if kind == "layer"
                else (TaskWiseMergedModel, FusedTaskWiseMergedModel)):
        extra = {"normalized_merging_weights": normalized} if kind == "layer" else {}
        pair.append(cls(weight.clone(), copy.deepcopy(base), copy.deepcopy(models), clamp_weights=clamp, **extra))
    return pair


@pytest.mark.parametrize("kind, clamp, normalized", [("task", True, False), ("task", False, False),
                                                     ("layer", True, False), ("layer", False, True)])
def test_drop_ins_equal_fusion_bench(kind, clamp, normalized):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(4))
    fb, fused = _pair(kind, clamp, normalized)
    merged = [m.merge_weights() for m in (fb, fused)]
    assert list(merged[0]) == list(merged[1])
    for k in merged[0]:
        assert same_bits(merged[1][k].detach(), merged[0][k].detach()), k
    losses = []
    for m in (fb, fused):
        loss = entropy_loss(m(x))
        loss.backward()
        losses.append(loss.detach())
    assert same_bits(losses[1], losses[0])
    torch.testing.assert_close(fused.merge_weight.grad, fb.merge_weight.grad, rtol=1e-5, atol=1e-7)
    assert fused.merge_weight.grad.abs().sum() > 0


def test_drop_in_mask_and_unload():
    fb, fused = _pair("task", True, False)
    masks = {n: (torch.arange(p.numel()) % 2).reshape(p.shape).float() for n, p in fb.task_vectors[0].named_parameters()}
    for k, v in fb.merge_weights(masks).items():
        assert same_bits(fused.merge_weights(masks)[k].detach(), v.detach()), k
    a, b = fb.merge_and_unload(copy=True), fused.merge_and_unload(copy=True)
    for k, v in a.state_dict().items():
        assert same_bits(b.state_dict()[k], v), k


def test_adamerging_loop_matches_fusion_bench_steps():
    """FusionBench's loop (merge, entropy per task, backward, Adam step) on both models: same coefficients up
    to the gradients' rounding, and the fused loop function lowers the entropy."""
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    fb, fused = _pair("layer", True, False)
    for m in (fb, fused):
        opt = torch.optim.Adam([m.merge_weight], lr=1e-2)
        for _ in range(3):
            m.merge_weights()
            opt.zero_grad()
            for x in batches:
                entropy_loss(m(x)).backward(retain_graph=True)
            opt.step()
    torch.testing.assert_close(fused.merge_weight, fb.merge_weight, rtol=1e-5, atol=1e-6)
    def entropy():
        with torch.no_grad():
            fused.merge_weights()
            return sum(float(entropy_loss(fused(x))) for x in batches)

    before = entropy()
    adamerging(fused, [(batches[:1], None), (batches[1:], None)], steps=8, lr=1e-2, show_progress=False)
    assert entropy() < before


def test_merged_model_with_functional_call_and_no_base():
    """MergedModel without θ0 (Σ λᵢ·xᵢ) under torch.func.functional_call, against the plain sum."""
    base, models = _models(1)
    vectors = [dict(m.named_parameters()) for m in models]
    merged = MergedModel(torch.tensor([0.5, 0.25, 0.25]), base, vectors, base=False)
    x = torch.randn(5, 6)
    want = torch.func.functional_call(base, {k: sum(w * v[k] for w, v in zip((0.5, 0.25, 0.25), vectors))
                                             for k in vectors[0]}, (x,))
    torch.testing.assert_close(merged(x), want)
    with pytest.raises(NotImplementedError, match="sparsity_ratio"):
        FusedLayerWiseMergedModel(torch.zeros(N, 5), base, models, sparsity_ratio=0.5)

