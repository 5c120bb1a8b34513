"""The INT8 ConvRot Linear layer without ComfyUI: reading one layer from a state dict, running it,
and applying LoRA exactly.

A quantized layer holds
- `weight`: int8 codes (out, in) of the rotated weight (the stored tensor, never modified here),
- `weight_scale`: float32 row scales (out, 1) (or one scale, (1, 1)),
- `group_size`: the ConvRot group (None: not rotated), and an optional bias.
The forward is `kernels.int8_linear` in the chosen mode. On CPU the w8a8 GEMM wants the weight
prepacked; a `PrepackCache` per layer (kernels/cpu_prepack.py) keeps that packed copy and rebuilds it
whenever the codes or scales change or move.

LoRA stays exact without touching the codes: a low-rank term `s · (x·Aᵀ)·Bᵀ` is added to the
INT8 output (`LowRankTerm`). A layer's terms are stacked once into one down (Σr, in) and one up
per row group (`LowRankSet`), so any number of LoRAs costs one small GEMM pair, added in place into
the INT8 output. Anything that is not a plain low-rank update is applied to the dequantized weight
instead (see nodes/ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from ..kernels.cpu_prepack import PrepackCache
from ..kernels.hadamard import VALID_GROUP_SIZES, is_power_of_4
from ..kernels.lora_ranks import LORA_SLICE_ALIGN, LORA_UP_RANKS, LORA_Z_RANKS
from .errors import FileFormatError
from .format import QUANT_SUFFIX, SCALE_SUFFIX, LayerQuant, parse_layer_tensor

# Per-layer keys a quantized Linear may carry besides weight/bias; unknown extras are ignored.
IGNORED_SUFFIXES = (".input_scale",)


@dataclass(frozen=True)
class Int8Layer:
    codes: torch.Tensor        # int8 (out, in)
    scale: torch.Tensor        # float32 (out, 1) or (1, 1)
    quant: LayerQuant

    @property
    def group_size(self) -> int | None:
        return self.quant.group_size


def check_layer(codes: torch.Tensor, scale: torch.Tensor, quant: LayerQuant, *, layer: str,
                out_features: int | None = None, in_features: int | None = None, path=None) -> torch.Tensor:
    """Validate one stored layer; returns the scale as float32 (out, 1) / (1, 1)."""
    where = dict(path=path, tensor=f"{layer}.weight")
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise FileFormatError(f"an int8_tensorwise layer must store int8 (out, in) codes, found {codes.dtype} "
                              f"{list(codes.shape)}", **where, hint="the file is damaged or was written by another tool")
    out_f, in_f = codes.shape
    if (out_features is not None and out_f != out_features) or (in_features is not None and in_f != in_features):
        raise FileFormatError(f"weight shape {list(codes.shape)} does not match the model's Linear "
                              f"({out_features}, {in_features})", **where,
                              hint="the file belongs to a different model or size variant")
    if scale.numel() not in (1, out_f):
        raise FileFormatError(f"weight_scale has {scale.numel()} values; expected {out_f} (per row) or 1",
                              path=path, tensor=f"{layer}{SCALE_SUFFIX}")
    g = quant.group_size
    if g is not None:
        if not is_power_of_4(g):
            raise FileFormatError(f"ConvRot group size {g} is not a power of 4 (valid: {VALID_GROUP_SIZES}, ...)",
                                  path=path, tensor=f"{layer}{QUANT_SUFFIX}", hint="re-convert the file")
        if in_f % g:
            raise FileFormatError(f"ConvRot group size {g} does not divide the input dimension {in_f}",
                                  path=path, tensor=f"{layer}{QUANT_SUFFIX}",
                                  hint="the kernels reject this layer; re-convert with a group size that divides it")
    if not bool(torch.isfinite(scale).all()):
        raise FileFormatError("weight_scale holds NaN/Inf", path=path, tensor=f"{layer}{SCALE_SUFFIX}",
                              hint="the file is damaged; re-convert it")
    return scale.to(torch.float32).reshape(-1, 1)


def pop_int8_layer(state_dict: dict, prefix: str, *, out_features: int | None = None,
                   in_features: int | None = None, path=None) -> Int8Layer | None:
    """Take `prefix`weight/weight_scale/comfy_quant out of `state_dict` if the layer is INT8 ConvRot.

    Returns None (and leaves the dict alone) for a layer stored in a float dtype. An int8 weight
    without its `comfy_quant` description is an error: its rotation cannot be known.
    """
    layer = prefix[:-1] if prefix.endswith(".") else prefix
    conf = state_dict.get(prefix + QUANT_SUFFIX[1:])
    weight = state_dict.get(prefix + "weight")
    if conf is None:
        if weight is not None and weight.dtype == torch.int8:
            raise FileFormatError("int8 weight without a comfy_quant entry (its ConvRot group size is unknown)",
                                  path=path, tensor=f"{layer}.weight",
                                  hint="convert the original with the INT8 ConvRot Converter or ctq --comfy_quant")
        return None
    quant = parse_layer_tensor(conf, path=path, layer=layer)
    if weight is None:
        raise FileFormatError("comfy_quant entry without a weight", path=path, tensor=f"{layer}{QUANT_SUFFIX}")
    scale = state_dict.get(prefix + SCALE_SUFFIX[1:])
    if scale is None:
        raise FileFormatError("int8 weight without weight_scale", path=path, tensor=f"{layer}.weight",
                              hint="the file is incomplete; re-convert it")
    scale = check_layer(weight, scale, quant, layer=layer, out_features=out_features, in_features=in_features,
                        path=path)
    for suffix in ("weight", QUANT_SUFFIX[1:], SCALE_SUFFIX[1:]) + tuple(s[1:] for s in IGNORED_SUFFIXES):
        state_dict.pop(prefix + suffix, None)
    return Int8Layer(weight, scale, quant)


@dataclass(frozen=True)
class LowRankTerm:
    """y[..., rows] += scale · (x·downᵀ)·upᵀ — one LoRA's exact contribution to a Linear."""
    down: torch.Tensor            # (rank, in)
    up: torch.Tensor              # (out or rows, rank)
    scale: float
    rows: tuple[int, int] | None = None   # (start, length) of a fused layer's output slice (q/k/v of qkv)

    def to(self, device, dtype) -> "LowRankTerm":
        return LowRankTerm(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype),
                           self.scale, self.rows)

    def delta(self, out_features: int, dtype=torch.float32) -> torch.Tensor:
        """The dense weight update (for tests and for folding)."""
        d = self.up.to(dtype) @ self.down.to(dtype) * self.scale
        if self.rows is None:
            return d
        full = torch.zeros(out_features, d.shape[1], dtype=dtype, device=d.device)
        full[self.rows[0]: self.rows[0] + self.rows[1]] = d
        return full


# Rows of x per down-projection GEMM on CPU (measured best of 128/256/512 at 4096 tokens, K = 3840).
LOWRANK_DOWN_ROWS = 256


def lowrank_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the small LoRA GEMMs: x's on accelerators; float32 on CPU, where sgemm is ~10x faster
    than bf16/fp16 matmul on CPUs without native bf16 (AVX2) and the output is float32 anyway."""
    if not x.is_floating_point() or (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)):
        return torch.float32
    return x.dtype


@dataclass(frozen=True)
class StackedLowRank:
    """Every term of a layer in one down and few ups: z = x·downᵀ once, then y[rows] += z[:, cols]·upᵀ.

    Terms on the same output rows share one up (their ranks side by side, scales folded in), so a
    layer with plain LoRAs costs one GEMM pair however many LoRAs it has; row-offset terms (q/k/v of
    a fused qkv) get one up per slice instead of a zero-padded block up (no wasted FLOPs)."""
    down: torch.Tensor                                             # (Σr, in)
    ups: tuple[tuple[tuple[int, int] | None, int, int, torch.Tensor], ...]   # (rows, col0, col1, up (len, r))
    _fused: dict = field(default_factory=dict, compare=False, repr=False)

    def fused_operands(self, out_features: int, down_dtype: torch.dtype, up_dtype: torch.dtype):
        """(down_t (in, RZ), up (out, R), zcol int32 (out,)) for the Triton kernels (see fused_layout):
        z = x·down_t, and output row n adds z[:, zcol[n]:zcol[n]+R]·up[n]. Zero padding costs MMA slots only."""
        key = (out_features, down_dtype, up_dtype)
        if key not in self._fused:
            layout = fused_layout([(rows, c1 - c0) for rows, c0, c1, _ in self.ups])
            if layout is None:
                raise ValueError("these LoRA terms cannot be fused (check fuses_lowrank_triton first)")
            r, rz, sliced = layout
            down_t = self.down.new_zeros((self.down.shape[1], rz), dtype=down_dtype)
            up = self.down.new_zeros((out_features, r), dtype=up_dtype)
            zcol = torch.zeros(out_features, dtype=torch.int32, device=self.down.device)
            for s, (rows, c0, c1, u) in enumerate(self.ups):
                z0 = s * r if sliced else c0          # sliced: each row group's z columns start at s·R
                down_t[:, z0: z0 + c1 - c0] = self.down[c0:c1].t().to(down_dtype)
                rsl = slice(None) if rows is None else slice(rows[0], rows[0] + rows[1])
                up[rsl, (0 if sliced else c0): (0 if sliced else c0) + c1 - c0] = u.to(up_dtype)
                if sliced:
                    zcol[rsl] = z0
            self._fused[key] = (down_t, up, zcol)
        return self._fused[key]


def fused_rank(rank: int) -> int:
    """The padded rank the fused Triton LoRA runs at."""
    return max(16, 1 << (rank - 1).bit_length())


def fused_layout(groups) -> tuple[int, int, bool] | None:
    """Pure: (R, RZ, sliced) for the fused Triton LoRA from [(rows, rank)] per output-row group (as
    StackedLowRank orders them), or None where it cannot fuse (limits: kernels/linear.py LORA_*). Sliced:
    row slices aligned to LORA_SLICE_ALIGN (q/k/v of a fused qkv) get z columns [s·R, s·R + rank) each,
    so three rank-64 LoRAs run at R = 64 with z 256 wide rather than R = 192; dense: all groups share
    one up of width R = Σr (padded)."""
    if len(groups) > 1 and all(rows is not None and rows[0] % LORA_SLICE_ALIGN == 0
                               and rows[1] % LORA_SLICE_ALIGN == 0 for rows, _ in groups):
        r = fused_rank(max(rank for _, rank in groups))
        rz = fused_rank(len(groups) * r)
        if r in LORA_UP_RANKS and rz in LORA_Z_RANKS:
            return r, rz, True
    r = fused_rank(sum(rank for _, rank in groups))
    return (r, r, False) if r in LORA_UP_RANKS else None


def _group_by_rows(terms) -> list:
    """[(rows, [terms])] per output-row group: whole-output terms first, then slices by start."""
    groups: dict = {}
    for t in terms:
        groups.setdefault(t.rows, []).append(t)
    return [(rows, groups[rows]) for rows in sorted(groups, key=lambda r: (-1, 0) if r is None else r)]


def _row_groups(terms) -> list:
    """[(rows, Σrank)] per output-row group, in StackedLowRank's order."""
    return [(rows, sum(t.down.shape[0] for t in ts)) for rows, ts in _group_by_rows(terms)]


def stack_lowrank(terms, device, dtype) -> StackedLowRank:
    """Pure: concatenate terms grouped by output rows; scale folded into up in float32, then one
    rounding to `dtype` (the same single rounding the per-term cast made)."""
    downs, ups, col = [], [], 0
    for rows, ts in _group_by_rows(terms):
        downs += [t.down.to(device=device, dtype=dtype) for t in ts]
        up = torch.cat([t.up.to(device=device, dtype=torch.float32) * t.scale for t in ts], dim=1).to(dtype)
        ups.append((rows, col, col + up.shape[1], up))
        col += up.shape[1]
    return StackedLowRank(torch.cat(downs, dim=0).contiguous(), tuple(ups))


class LowRankSet:
    """A layer's LowRankTerms (`terms`, compared and indexed like that tuple) that keeps their stacked
    form per (device, dtype): built on the first call, reused while the set lives (a new patch set is a
    new LowRankSet). `keep=False` stacks per call instead (lowvram: the terms of an offloaded layer must
    not stay on the compute device between calls). A plain class, not a tuple subclass: torch 2.7's
    dynamo cannot iterate a tuple subclass, so the forward reads `.terms` (`term_tuple`)."""

    def __init__(self, terms=(), keep: bool = True):
        self.terms = tuple(terms)
        self._stacked = {} if keep else None

    def __len__(self) -> int:
        return len(self.terms)

    def __iter__(self):
        return iter(self.terms)

    def __getitem__(self, index):
        return self.terms[index]

    def __eq__(self, other) -> bool:
        if isinstance(other, LowRankSet):
            other = other.terms
        return isinstance(other, tuple) and self.terms == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"LowRankSet({self.terms!r})"

    def stacked(self, device, dtype) -> StackedLowRank:
        if self._stacked is None:
            return stack_lowrank(self.terms, device, dtype)
        key = (torch.device(device), dtype)
        s = self._stacked.get(key)
        if s is None:
            s = self._stacked[key] = stack_lowrank(self.terms, device, dtype)
        return s


def term_tuple(terms) -> tuple:
    """The terms as a plain tuple, from a LowRankSet or any sequence of LowRankTerms."""
    return terms.terms if isinstance(terms, LowRankSet) else tuple(terms)


def as_lowrank_set(terms) -> LowRankSet:
    return terms if isinstance(terms, LowRankSet) else LowRankSet(terms)


def join_lowrank(a, b):
    """Two term sets as one, keeping a cached set when the other is empty."""
    if not b:
        return a
    if not a:
        return b
    return LowRankSet(term_tuple(a) + term_tuple(b), keep=False)


def apply_lowrank(y: torch.Tensor, x: torch.Tensor, terms) -> torch.Tensor:
    """Add every term's contribution to y in place (y is the fresh output of the INT8 GEMM): one
    down GEMM and an addmm_ per row group, accumulating into y with no full-size temporary."""
    terms = as_lowrank_set(terms)
    if not len(terms.terms) or not x.numel():
        return y
    cd = lowrank_compute_dtype(x)
    s = terms.stacked(x.device, cd)
    x2 = x.reshape(-1, x.shape[-1])
    if not y.is_contiguous():
        y = y.contiguous()
    y2 = y.view(-1, y.shape[-1])
    xc = x2 if x2.dtype == cd else x2.to(cd)
    m = xc.shape[0]
    if x.device.type == "cpu" and m > 2 * LOWRANK_DOWN_ROWS:
        # MKL's skinny sgemm (N = Σr) is ~20% faster on row panels of x than on the whole of it.
        z = torch.empty((m, s.down.shape[0]), dtype=cd)
        for r0 in range(0, m, LOWRANK_DOWN_ROWS):
            torch.mm(xc[r0:r0 + LOWRANK_DOWN_ROWS], s.down.t(), out=z[r0:r0 + LOWRANK_DOWN_ROWS])
    else:
        z = torch.mm(xc, s.down.t())
    for rows, c0, c1, up in s.ups:
        dst = y2 if rows is None else y2[:, rows[0]: rows[0] + rows[1]]
        zc = z if c0 == 0 and c1 == z.shape[1] else z[:, c0:c1]
        if dst.dtype == cd:
            dst.addmm_(zc, up.t())
        else:  # e.g. bf16 activations on CPU: the GEMMs stay float32, one rounding into y
            dst.add_(torch.mm(zc, up.t()))
    return y


def fuses_lowrank_triton(x: torch.Tensor, group_size: int | None, terms, mode: str = "auto") -> bool:
    """Whether these LoRA terms run fused into the Triton W8A8 kernels for x (CUDA, group size ≤ 64,
    fp16/bf16, see fused_layout): no extra pass over x or the output (RTX 3070 roofline, 3840² at 4096 tokens, rank 64:
    1.25× unfused, from the output's read-modify-write and a second read of x; ~1.06× fused)."""
    terms = term_tuple(terms)
    if not terms or not x.is_floating_point():
        return False
    layout = fused_layout(_row_groups(terms))
    return layout is not None and kernels.fuses_lora(x, group_size, layout[1], layout[0], mode)


def int8_forward(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int | None, mode: str = "auto", cache: PrepackCache | None = None,
                 lowrank=()) -> torch.Tensor:
    """One INT8 ConvRot Linear call; `cache` keeps the weight's CPU pack where w8a8 runs on the CPU GEMM.
    LoRA terms are fused into the Triton W8A8 kernels where they can be, else added to the output."""
    lowrank = as_lowrank_set(lowrank)
    if len(lowrank.terms) and fuses_lowrank_triton(x, group_size, lowrank, mode):
        stacked = lowrank.stacked(x.device, lowrank_compute_dtype(x))
        dot = kernels.lora_operand_dtype(x)   # x's dtype on GPUs; float32 where the dot cannot take it
        lora = stacked.fused_operands(codes.shape[0], dot, dot)
        return kernels.int8_linear(x, codes, scale, bias, group_size, mode, lora=lora)
    y = kernels.int8_linear(x, codes, scale, bias, group_size, mode, cache=cache)
    if len(lowrank.terms):
        y = apply_lowrank(y, x, lowrank)
    return y


class Int8Linear(torch.nn.Module):
    """A stand-alone INT8 ConvRot Linear (engine, demo and benchmarks; ComfyUI has its own ops)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int | None = 64, mode: str = "auto"):
        super().__init__()
        if mode not in kernels.MODES:
            raise ValueError(f"unknown INT8 compute mode {mode!r}; choose one of {kernels.MODES}")
        self.out_features, self.in_features = codes.shape
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.float().reshape(-1, 1), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.group_size = group_size
        self.mode = mode
        self._cache = PrepackCache()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = 64,
                   mode: str = "auto") -> "Int8Linear":
        codes, scale = kernels.quantize_weight(weight, group_size)
        return cls(codes, scale, bias, group_size, mode)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return kernels.dequantize_weight(self.weight, self.weight_scale, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return int8_forward(x, self.weight, self.weight_scale, bias, self.group_size, self.mode, self._cache)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, mode={self.mode}")
