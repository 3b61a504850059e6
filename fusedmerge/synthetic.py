"""Synthetic CLIP ViT checkpoints with Hugging Face ``CLIPVisionModel`` key names and shapes.

No network: a base model plus fine-tuned variants whose task vectors are low rank plus dense noise,
like real fine-tuning deltas, generated from a seed. Used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ViTConfig:
    hidden: int
    layers: int
    intermediate: int
    patch: int
    image: int = 224

    @property
    def positions(self) -> int:
        return (self.image // self.patch) ** 2 + 1


CLIP_VIT = {
    "tiny": ViTConfig(hidden=32, layers=2, intermediate=64, patch=8, image=32),
    "B/32": ViTConfig(hidden=768, layers=12, intermediate=3072, patch=32),
    "B/16": ViTConfig(hidden=768, layers=12, intermediate=3072, patch=16),
    "L/14": ViTConfig(hidden=1024, layers=24, intermediate=4096, patch=14),
}


def clip_vit_shapes(model: str = "B/32") -> Dict[str, Tuple[int, ...]]:
    """Key → shape of ``CLIPVisionModel.state_dict()`` for a CLIP ViT config, in its key order."""
    if model not in CLIP_VIT:
        raise ValueError(f"unknown CLIP ViT config {model!r}; choose one of {sorted(CLIP_VIT)}")
    c = CLIP_VIT[model]
    h, p = c.hidden, "vision_model."
    shapes = {
        p + "embeddings.class_embedding": (h,),
        p + "embeddings.patch_embedding.weight": (h, 3, c.patch, c.patch),
        p + "embeddings.position_embedding.weight": (c.positions, h),
        p + "pre_layrnorm.weight": (h,),
        p + "pre_layrnorm.bias": (h,),
    }
    for i in range(c.layers):
        layer = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (h, h)
            shapes[f"{layer}self_attn.{proj}.bias"] = (h,)
        shapes[layer + "layer_norm1.weight"] = (h,)
        shapes[layer + "layer_norm1.bias"] = (h,)
        shapes[layer + "mlp.fc1.weight"] = (c.intermediate, h)
        shapes[layer + "mlp.fc1.bias"] = (c.intermediate,)
        shapes[layer + "mlp.fc2.weight"] = (h, c.intermediate)
        shapes[layer + "mlp.fc2.bias"] = (h,)
        shapes[layer + "layer_norm2.weight"] = (h,)
        shapes[layer + "layer_norm2.bias"] = (h,)
    shapes[p + "post_layernorm.weight"] = (h,)
    shapes[p + "post_layernorm.bias"] = (h,)
    return shapes


def clip_vit_base(model: str = "B/32", *, dtype=torch.float32, seed: int = 0) -> StateDict:
    """A pretrained-like base: LayerNorm weights near 1, other parameters small Gaussians."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in clip_vit_shapes(model).items():
        t = torch.randn(shape, generator=g) * 0.02
        if "layer_norm" in key or "layrnorm" in key or "post_layernorm" in key:
            t = t + 1.0 if key.endswith("weight") else t
        out[key] = t.to(dtype)
    return out


def clip_vit_finetuned(base: StateDict, index: int, *, rank: int = 4, noise: float = 1e-3,
                       lowrank: float = 5e-3, seed: int = 0) -> StateDict:
    """Fine-tuned variant `index` of `base`: θ = θ0 + τ, τ = low rank (2-D weights) + dense noise."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    out = {}
    for key, b in base.items():
        tau = torch.randn(b.shape, generator=g) * noise
        if b.dim() == 2:
            u = torch.randn(b.shape[0], rank, generator=g)
            v = torch.randn(rank, b.shape[1], generator=g)
            tau += (u @ v) * (lowrank / rank**0.5)
        out[key] = (b.float() + tau).to(b.dtype)
    return out


def clip_vit_models(model: str = "B/32", n: int = 8, *, dtype=torch.float32, seed: int = 0
                    ) -> Tuple[StateDict, List[StateDict]]:
    """A base and `n` fine-tuned variants of a CLIP ViT config."""
    base = clip_vit_base(model, dtype=dtype, seed=seed)
    return base, [clip_vit_finetuned(base, i, seed=seed) for i in range(n)]


def llama_shapes(hidden: int = 2048, layers: int = 16, intermediate: int = 5632, vocab: int = 32000,
                 kv_hidden: int = None) -> Dict[str, Tuple[int, ...]]:
    """Key → shape of a Llama-style causal LM (``LlamaForCausalLM`` names); the defaults make ≈ 0.95B
    parameters, the size of the mergekit end-to-end benchmark."""
    kv = kv_hidden or hidden
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(directory: str, shapes: Dict[str, Tuple[int, ...]], index: int = -1, *,
                     dtype=torch.bfloat16, seed: int = 0, shard_size: int = 500 * 10**6, noise: float = 1e-3) -> None:
    """A Hugging Face style model directory (sharded safetensors + index, config, tokenizer config) written
    tensor by tensor: the base for index = -1, else fine-tuned variant `index` (base + Gaussian noise).
    Each tensor is generated from (seed, its name), so nothing is held beyond one tensor."""
    import json
    import os
    import zlib

    from .checkpoint.output import ShardPlan, ShardWriter, write_index

    os.makedirs(directory, exist_ok=True)
    plan = ShardPlan([(k, dtype, s) for k, s in shapes.items()], shard_size, 1)
    writer = ShardWriter(plan, directory, 0)
    for key, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        t = torch.randn(shape, generator=g) * 0.02 + (1.0 if "norm" in key else 0.0)
        if index >= 0:
            g.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()) + 7919 * (index + 1))
            t += torch.randn(shape, generator=g) * noise
        writer.write(key, t.to(dtype))
    writer.close()
    write_index(directory, plan)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": str(dtype)[6:],
                   "hidden_size": shapes["model.norm.weight"][0], "vocab_size": shapes["model.embed_tokens.weight"][0],
                   "num_hidden_layers": sum(k.endswith("input_layernorm.weight") for k in shapes)}, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}, f)
