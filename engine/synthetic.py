"""Small checkpoints with the real key layouts (Z-Image / Lumina2 DiT, Qwen3 text encoder) and
realistic statistics, for the demo, the tests and the benchmarks (no weights can be downloaded).

Linear weights are N(0, 1/in) with a few *outlier input channels* scaled up 20–60×, the pattern
seen in trained DiT/LLM weights and the reason rotation matters: without it, one outlier column
sets every row's INT8 scale. Everything is generated one tensor at a time (`iter_*`), so a
full-size 6B layout can be streamed to disk without holding the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class ZImageShape:
    dim: int = 3840
    n_layers: int = 30
    n_refiner: int = 2          # noise_refiner and context_refiner blocks (fixed at 2 in Z-Image)
    ffn: int = 10240
    head_dim: int = 128
    cap_feat_dim: int = 2560    # Qwen3-4B hidden size
    t_dim: int = 256
    t_hidden: int = 1024
    patch_channels: int = 64    # 16 latent channels × 2×2 patch


ZIMAGE_FULL = ZImageShape()
# Full layer sizes, few blocks: ComfyUI 0.8.0 detects Z-Image only at dim 3840 (~1.46 GB bf16).
ZIMAGE_BENCH = ZImageShape(n_layers=2, n_refiner=1)
ZIMAGE_STOCK = ZImageShape(n_layers=0)
# Tiny Lumina2-family layout for fast tests (ComfyUI needs its config supplied for this dim).
ZIMAGE_TINY = ZImageShape(dim=256, n_layers=2, ffn=704, head_dim=64, cap_feat_dim=256, t_hidden=256)


@dataclass(frozen=True)
class Qwen3Shape:
    hidden: int = 2560
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 9728
    vocab: int = 151936


QWEN3_4B = Qwen3Shape()
QWEN3_TINY = Qwen3Shape(hidden=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn=768, vocab=1024)


def linear_weight(out_f: int, in_f: int, gen: torch.Generator, outliers: int = 4) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen).mul_(in_f ** -0.5)
    if outliers and in_f >= 16:
        cols = torch.randperm(in_f, generator=gen)[:outliers]
        w[:, cols] *= torch.empty(outliers).uniform_(20.0, 60.0, generator=gen)
    return w


def _norm(n: int, gen: torch.Generator) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(n, generator=gen)


def _bias(n: int, gen: torch.Generator) -> torch.Tensor:
    return 0.02 * torch.randn(n, generator=gen)


def _zimage_block(prefix: str, s: ZImageShape, gen, modulated: bool):
    d = s.dim
    yield f"{prefix}.attention.qkv.weight", linear_weight(3 * d, d, gen)
    yield f"{prefix}.attention.out.weight", linear_weight(d, d, gen)
    yield f"{prefix}.attention.q_norm.weight", _norm(s.head_dim, gen)
    yield f"{prefix}.attention.k_norm.weight", _norm(s.head_dim, gen)
    yield f"{prefix}.feed_forward.w1.weight", linear_weight(s.ffn, d, gen)
    yield f"{prefix}.feed_forward.w2.weight", linear_weight(d, s.ffn, gen)
    yield f"{prefix}.feed_forward.w3.weight", linear_weight(s.ffn, d, gen)
    for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        yield f"{prefix}.{norm}.weight", _norm(d, gen)
    if modulated:
        yield f"{prefix}.adaLN_modulation.0.weight", linear_weight(4 * d, s.t_dim, gen, outliers=0)
        yield f"{prefix}.adaLN_modulation.0.bias", _bias(4 * d, gen)


def iter_zimage(shape: ZImageShape = ZIMAGE_TINY, seed: int = 0, dtype=torch.bfloat16,
                prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Z-Image DiT tensors in the order ComfyUI's NextDiT state dict lists them."""
    gen = torch.Generator().manual_seed(seed)
    s, d = shape, shape.dim

    def items():
        yield "x_pad_token", 0.02 * torch.randn(1, d, generator=gen)
        yield "cap_pad_token", 0.02 * torch.randn(1, d, generator=gen)
        yield "x_embedder.weight", linear_weight(d, s.patch_channels, gen, outliers=0)
        yield "x_embedder.bias", _bias(d, gen)
        for i in range(s.n_refiner):
            yield from _zimage_block(f"noise_refiner.{i}", s, gen, modulated=True)
        for i in range(s.n_refiner):
            yield from _zimage_block(f"context_refiner.{i}", s, gen, modulated=False)
        yield "t_embedder.mlp.0.weight", linear_weight(s.t_hidden, 256, gen, outliers=0)
        yield "t_embedder.mlp.0.bias", _bias(s.t_hidden, gen)
        yield "t_embedder.mlp.2.weight", linear_weight(s.t_dim, s.t_hidden, gen, outliers=0)
        yield "t_embedder.mlp.2.bias", _bias(s.t_dim, gen)
        yield "cap_embedder.0.weight", _norm(s.cap_feat_dim, gen)
        yield "cap_embedder.1.weight", linear_weight(d, s.cap_feat_dim, gen)
        yield "cap_embedder.1.bias", _bias(d, gen)
        for i in range(s.n_layers):
            yield from _zimage_block(f"layers.{i}", s, gen, modulated=True)
        yield "final_layer.linear.weight", linear_weight(s.patch_channels, d, gen)
        yield "final_layer.linear.bias", _bias(s.patch_channels, gen)
        yield "final_layer.adaLN_modulation.1.weight", linear_weight(d, s.t_dim, gen, outliers=0)
        yield "final_layer.adaLN_modulation.1.bias", _bias(d, gen)

    for name, t in items():
        yield prefix + name, t.to(dtype)


def iter_qwen3(shape: Qwen3Shape = QWEN3_TINY, seed: int = 0, dtype=torch.bfloat16,
               lm_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen3 text-encoder tensors with Hugging Face key names (as ComfyUI's Qwen3-4B loads them)."""
    gen = torch.Generator().manual_seed(seed)
    s, h = shape, shape.hidden

    def items():
        yield "model.embed_tokens.weight", 0.02 * torch.randn(s.vocab, h, generator=gen)
        for i in range(s.n_layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", _norm(h, gen)
            yield f"{p}.self_attn.q_proj.weight", linear_weight(s.n_heads * s.head_dim, h, gen)
            yield f"{p}.self_attn.k_proj.weight", linear_weight(s.n_kv_heads * s.head_dim, h, gen)
            yield f"{p}.self_attn.v_proj.weight", linear_weight(s.n_kv_heads * s.head_dim, h, gen)
            yield f"{p}.self_attn.o_proj.weight", linear_weight(h, s.n_heads * s.head_dim, gen)
            yield f"{p}.self_attn.q_norm.weight", _norm(s.head_dim, gen)
            yield f"{p}.self_attn.k_norm.weight", _norm(s.head_dim, gen)
            yield f"{p}.post_attention_layernorm.weight", _norm(h, gen)
            yield f"{p}.mlp.gate_proj.weight", linear_weight(s.ffn, h, gen)
            yield f"{p}.mlp.up_proj.weight", linear_weight(s.ffn, h, gen)
            yield f"{p}.mlp.down_proj.weight", linear_weight(h, s.ffn, gen)
        yield "model.norm.weight", _norm(h, gen)
        if lm_head:
            yield "lm_head.weight", linear_weight(s.vocab, h, gen, outliers=0)

    for name, t in items():
        yield name, t.to(dtype)


def save(path, tensors: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a small synthetic checkpoint in one go (tests); large ones go through the streaming writer."""
    from safetensors.torch import save_file
    save_file(dict(tensors), str(path), metadata=metadata)
