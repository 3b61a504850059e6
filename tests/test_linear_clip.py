"""Averaging, weighted averaging and task arithmetic on CLIP ViT state dicts: every backend equals the
torch reference bit for bit (fp32, bf16, fp16), and the reference is what the peers compute up to the
documented accumulation differences."""

import pytest
import torch

import fusedmerge
from conftest import CPU_BACKENDS, assert_dicts_equal
from fusedmerge.synthetic import clip_vit_shapes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = {
    "average": lambda base, ms, backend: fusedmerge.average(ms, backend=backend),
    "weighted": lambda base, ms, backend: fusedmerge.average(ms, [0.5, 1, 2, 0.25, 1, 3, 0.7, 1.1], backend=backend),
    "task_arithmetic": lambda base, ms, backend: fusedmerge.task_arithmetic(base, ms, 0.3, backend=backend),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_cpu_backend_equals_reference_on_full_vit_b32(clip_b32_as, dtype, op):
    base, models = clip_b32_as(dtype)
    got = OPS[op](base, models, "cpu")
    assert_dicts_equal(got, OPS[op](base, models, "torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_equal_reference_on_vit_b32_first_block(clip_b32_as, dtype, op, backend):
    """The interpreter is slow: the embeddings and the first attention block of ViT-B/32."""
    base, models = clip_b32_as(dtype)
    keys = [k for k in base if "embeddings" in k or "layers.0.self_attn.q" in k or "layers.0.layer_norm" in k]
    pick = lambda sd: {k: sd[k] for k in keys}  # noqa: E731
    got = OPS[op](pick(base), [pick(m) for m in models], backend)
    assert_dicts_equal(got, OPS[op](pick(base), [pick(m) for m in models], "torch"))


def test_synthetic_checkpoints_have_hf_clip_names_and_shapes():
    transformers = pytest.importorskip("transformers")
    for name, (hidden, layers, inter, patch) in {"B/32": (768, 12, 3072, 32), "L/14": (1024, 24, 4096, 14)}.items():
        cfg = transformers.CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                            patch_size=patch, image_size=224, num_attention_heads=hidden // 64)
        with torch.device("meta"):
            hf = transformers.CLIPVisionModel(cfg).state_dict()
        ours = clip_vit_shapes(name)
        # transformers >= 5 drops the `vision_model.` prefix that released checkpoints carry
        strip = lambda k: k.removeprefix("vision_model.")  # noqa: E731
        assert [strip(k) for k in hf] == [strip(k) for k in ours]
        assert all(tuple(hf[k].shape) == ours[o] for k, o in zip(hf, ours))


def test_reference_matches_the_peers_within_accumulation_error(clip_b32):
    """stack().mean(0) and FusionBench's fold-then-divide differ from the contract only by rounding."""
    base, models = clip_b32
    avg = fusedmerge.average(models)
    ta = fusedmerge.task_arithmetic(base, models, 0.3)
    for key in list(base)[:40]:
        xs = [m[key] for m in models]
        exact = torch.stack([x.double() for x in xs]).mean(0)
        scale = torch.stack([x.double().abs() for x in xs]).mean(0)
        bound = 10 * 2**-24 * scale + 1e-45
        assert ((avg[key].double() - exact).abs() <= bound).all(), key
        assert ((torch.stack(xs).mean(0).double() - exact).abs() <= bound).all(), key
        fb = xs[0].clone()
        for x in xs[1:]:
            fb += x
        assert ((fb / len(xs)).double() - exact).abs().le(bound).all(), key
        ta_exact = base[key].double() + 0.3 * sum(x.double() - base[key].double() for x in xs)
        assert (ta[key].double() - ta_exact).abs().le(16 * 2**-24 * (ta_exact.abs() + scale)).all(), key


def test_inputs_are_not_modified(clip_tiny):
    base, models = clip_tiny
    before = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    for backend in ["torch"] + [p.values[0] for p in CPU_BACKENDS if not p.marks]:
        fusedmerge.average(models, backend=backend)
        fusedmerge.task_arithmetic(base, models, 0.5, weights=[1, 2, 3, 4], backend=backend)
    for b, m in zip(before, [base, *models]):
        assert_dicts_equal(m, b)
