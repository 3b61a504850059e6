"""Shared fixtures: backends present on this machine and synthetic CLIP ViT checkpoints.

Without a GPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set before any kernel
module is imported); CUDA and GPU-Triton tests skip with a visible reason.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedmerge  # noqa: E402
from fusedmerge.perf import same_bits  # noqa: E402,F401 — the tests' bit-for-bit comparison
from fusedmerge.synthetic import clip_vit_models  # noqa: E402

STATUS = fusedmerge.backends()


def backend_params(device: str, names=("cpu", "triton", "cuda")):
    """pytest params for the fused backends on `device`, skipped with the backend's own reason."""
    params = []
    for name in names:
        s = STATUS[name]
        runs = s.available and device in s.devices
        reason = s.reason if not s.available else f"{name} does not run on {device} tensors here"
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(not runs, reason=reason)))
    return params


CPU_BACKENDS = backend_params("cpu", ("cpu", "triton"))
GPU_BACKENDS = backend_params("cuda", ("cuda", "triton"))
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine")


@pytest.fixture(scope="session")
def clip_b32():
    """Base + 8 fine-tuned CLIP ViT-B/32 state dicts in fp32 (~3 GB), built once."""
    return clip_vit_models("B/32", 8, seed=0)


@pytest.fixture(scope="session")
def clip_b32_as(clip_b32):
    """clip_b32 converted to a dtype, cached (one dtype kept at a time to bound memory)."""
    cache = {}

    def get(dtype):
        if dtype == torch.float32:
            return clip_b32
        if dtype not in cache:
            cache.clear()
            base, models = clip_b32
            cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
            cache[dtype] = (cast(base), [cast(m) for m in models])
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def clip_tiny():
    return clip_vit_models("tiny", 4, seed=1)


def assert_dicts_equal(got, want):
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), f"{key}: max diff {(got[key].double() - want[key].double()).abs().max()}"


def tiny_clip_modules(n: int, seed: int = 0):
    """A tiny transformers CLIPVisionModel and n fine-tuned copies (base + 1e-2·noise), or a skip without
    transformers."""
    import copy

    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, patch_size=8,
                                        image_size=32, num_attention_heads=4)
    torch.manual_seed(seed)
    base = transformers.CLIPVisionModel(cfg).eval()
    models = []
    for _ in range(n):
        m = copy.deepcopy(base)
        m.load_state_dict({k: v + 1e-2 * torch.randn_like(v) for k, v in base.state_dict().items()})
        models.append(m)
    return base, models


def load_model_dir(path):
    """Every tensor of a model directory, copied out of its memory-mapped files."""
    from fusedmerge.checkpoint.model_dir import ModelDir

    d = ModelDir(str(path))
    try:
        return {k: d.tensor(k).clone() for k in d.where}
    finally:
        d.close()


@pytest.fixture(scope="session")
def small_llama_ckpts(tmp_path_factory):
    """Directories base, m0, m1, m2 of a tiny Llama-shaped bf16 checkpoint (sharded), written once."""
    from fusedmerge.synthetic import llama_shapes, write_checkpoint

    root = tmp_path_factory.mktemp("small_llama")
    shapes = llama_shapes(hidden=32, layers=2, intermediate=64, vocab=40)
    write_checkpoint(str(root / "base"), shapes, shard_size=20_000)
    for i in range(3):
        write_checkpoint(str(root / f"m{i}"), shapes, i, shard_size=20_000)
    return root
