"""Which tensors of a checkpoint become INT8 ConvRot layers, and why the others stay as they are.

A *candidate* is a 2-D floating-point tensor whose name ends in `.weight` (a Linear weight; Conv
weights are 4-D, norms and biases 1-D): exactly what convert-to-quant considers. A preset then keeps
some candidates in high precision by name, and says what happens to a layer whose input dimension
the group size does not divide (quantized without rotation, or kept).

Presets
- `zimage`: convert-to-quant's `--zimage` lists, matched the way it matches them (substring of the
  tensor name), so the same layers are quantized as `ctq --zimage`.
- `qwen3`: the Qwen3-4B text encoder as Z-Image uses it. Kept: `embed_tokens` (a lookup table: no
  matmul to speed up, every prompt token reads it directly; 0.78 GB in bf16 against 0.39 GB in INT8,
  and `EMBEDDINGS_INCLUDE` quantizes it as ctq's no-preset recipe does, which our loaders read), `lm_head` (not run by Z-Image, which reads hidden states;
  often absent), norms (1-D). Every attention and MLP projection is quantized.
- `generic`: every candidate whose input dimension divides by the group size; embeddings and norms
  kept; a layer whose input does not divide is kept (not quantized unrotated).
`--include` regexes quantize matching candidates a preset would keep; `--exclude` regexes keep
matching tensors whatever else says (exclude wins). Regexes are searched in the full tensor name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from ..kernels.hadamard import check_group_size
from .errors import Int8ConvRotError
from .format import LayerQuant
from .safetensors_writer import ST_TO_TORCH

SCALINGS = ("row", "tensor")
# `--include` pattern that quantizes token-embedding tables too (convert-to-quant's layout for Qwen3's
# embed_tokens without a preset: int8 codes + row scales, looked up row by row at run time).
EMBEDDINGS_INCLUDE = r"(^|\.)embed_tokens\.weight$"
TENSOR_SCALING_WARNING = ("--scaling tensor: one scale per matrix with ConvRot gives soft, waxy images; "
                          "row (the default) is recommended")

# convert-to-quant 1.3.4 constants.ZIMAGE_AVOID_KEY_NAMES + ZIMAGE_LAYER_KEYNAMES (substring matches).
ZIMAGE_NEVER = ("cap_embedder.0", "cap_pad_token", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2",
                "k_norm", "q_norm", "x_pad_token")
ZIMAGE_HIGH_PRECISION = ("x_embedder", "clip_text_pooled_proj", "final_layer", "cap_embedder.1", "adaLN_modulation",
                         "t_embedder", "time_text_embed")

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    keep: tuple[tuple[str, str], ...]      # (regex, reason): candidates kept in high precision
    unrotated: str                          # "quantize" or "keep": a layer whose input the group does not divide


def _substrings(names, reason):
    return tuple((re.escape(n), reason) for n in names)


PRESETS = {
    "zimage": Preset(
        "zimage", "Z-Image / Lumina2 DiT, identical layer choice to `ctq --zimage`",
        _substrings(ZIMAGE_NEVER, "Z-Image: never quantized (norm/pad token/caption norm)")
        + _substrings(ZIMAGE_HIGH_PRECISION, "Z-Image: kept in high precision (embedder/modulation/final layer)"),
        "quantize"),
    "qwen3": Preset(
        "qwen3", "Qwen3-4B text encoder as Z-Image uses it",
        ((r"embed_tokens", "embedding lookup table (no matmul; read directly by every token)"),
         (r"lm_head", "output head (unused by Z-Image, which reads hidden states)"),
         (r"norm", "normalization weight")),
        "quantize"),
    "generic": Preset(
        "generic", "every Linear weight whose input divides by the group size",
        ((r"(^|[._])(embed_tokens|embeddings?|token_embedding|position_embedding|pos_embed|wte|wpe|shared)([._]|$)",
          "embedding lookup table"),
         (r"norm", "normalization weight")),
        "keep"),
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


@dataclass(frozen=True)
class Decision:
    """What happens to one tensor: `quant` None means it is written unchanged."""
    quant: LayerQuant | None
    reason: str
    candidate: bool = False        # a 2-D float `.weight` (a Linear weight)

    @property
    def action(self) -> str:
        if self.quant is None:
            return "kept" if self.candidate else "other"
        return "quantized" if self.quant.group_size else "unrotated"


def to_torch_dtype(dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    return ST_TO_TORCH.get(dtype)


def _compile(patterns, what: str) -> tuple[re.Pattern, ...]:
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise Int8ConvRotError(f"invalid {what} regex {p!r}: {exc}", hint="use Python regular expression syntax")
    return tuple(out)


@dataclass(frozen=True)
class Policy:
    preset: Preset
    group_size: int = 64
    scaling: str = "row"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    orig_dtype: torch.dtype | None = None    # recorded compute dtype; None: the source's (bf16 for fp32/fp8)
    _include_re: tuple = field(default=(), repr=False, compare=False)
    _exclude_re: tuple = field(default=(), repr=False, compare=False)
    _keep_re: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        try:
            check_group_size(self.group_size)
        except ValueError as exc:
            raise Int8ConvRotError(str(exc), hint="use --group-size 64 for Z-Image and Qwen3") from None
        if self.scaling not in SCALINGS:
            raise Int8ConvRotError(f"unknown scaling {self.scaling!r}", hint="use 'row' (recommended) or 'tensor'")
        object.__setattr__(self, "_include_re", _compile(self.include, "--include"))
        object.__setattr__(self, "_exclude_re", _compile(self.exclude, "--exclude"))
        object.__setattr__(self, "_keep_re", tuple((re.compile(p), why) for p, why in self.preset.keep))

    @property
    def name(self) -> str:
        return self.preset.name

    def with_options(self, group_size: int | None = None, scaling: str | None = None) -> "Policy":
        return replace(self, group_size=group_size or self.group_size, scaling=scaling or self.scaling)

    def layer_quant(self, dtype: torch.dtype | None, group_size: int | None) -> LayerQuant:
        orig = self.orig_dtype or (dtype if dtype in COMPUTE_DTYPES else torch.bfloat16)
        return LayerQuant(orig_dtype=orig, group_size=group_size, per_row=self.scaling == "row")

    def explain(self, name: str, shape, dtype) -> Decision:
        shape = tuple(int(s) for s in shape)
        tdtype = to_torch_dtype(dtype)
        if not name.endswith(".weight") or len(shape) != 2 or tdtype not in FLOAT_DTYPES:
            return Decision(None, "not a 2-D floating-point Linear weight")
        if shape[0] == 0 or shape[1] == 0:
            return Decision(None, "empty tensor", candidate=True)
        for rx in self._exclude_re:
            if rx.search(name):
                return Decision(None, f"excluded by --exclude {rx.pattern!r}", candidate=True)
        if not any(rx.search(name) for rx in self._include_re):
            for rx, why in self._keep_re:
                if rx.search(name):
                    return Decision(None, why, candidate=True)
        if shape[1] % self.group_size:
            why = f"input dimension {shape[1]} is not divisible by the group size {self.group_size}"
            if self.preset.unrotated == "keep":
                return Decision(None, why, candidate=True)
            return Decision(self.layer_quant(tdtype, None), f"quantized without rotation: {why}", candidate=True)
        return Decision(self.layer_quant(tdtype, self.group_size), "quantized", candidate=True)

    def decide(self, name: str, shape, dtype) -> LayerQuant | None:
        """How to store tensor `name`, or None to keep it as it is."""
        return self.explain(name, shape, dtype).quant


def get_policy(name: str = "generic", group_size: int = 64, scaling: str = "row", include=(), exclude=(),
               orig_dtype: torch.dtype | None = None) -> Policy:
    if isinstance(name, Policy):
        return name.with_options(group_size, scaling)
    try:
        preset = PRESETS[name]
    except KeyError:
        raise Int8ConvRotError(f"unknown preset {name!r}", hint=f"choose one of {', '.join(PRESETS)}") from None
    return Policy(preset, group_size, scaling, tuple(include or ()), tuple(exclude or ()), orig_dtype)


def detect_preset(keys) -> tuple[str, str]:
    """(preset, why) from tensor names alone (a checkpoint prefix must already be stripped)."""
    keys = set(keys)
    zimage_marks = [k for k in ("cap_embedder.1.weight", "x_pad_token", "cap_pad_token") if k in keys]
    if "cap_embedder.1.weight" in keys and any(k.startswith(("layers.", "noise_refiner.", "context_refiner."))
                                               for k in keys):
        return "zimage", f"Z-Image/Lumina2 DiT keys ({', '.join(zimage_marks)}, layers.*)"
    if any(k.endswith("self_attn.q_norm.weight") for k in keys) and any(k.endswith("mlp.gate_proj.weight")
                                                                        for k in keys):
        return "qwen3", "Qwen3 text-encoder keys (self_attn.q_norm, mlp.gate_proj)"
    return "generic", "no known architecture in the tensor names"
