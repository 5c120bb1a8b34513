"""The pack's kernels behind comfy-kitchen's function signatures, as a comfy-kitchen backend module.

ComfyUI (0.29+) runs INT8 ConvRot files through comfy-kitchen, which picks, per call, the first backend
in its priority list whose `FunctionConstraints` accept the call. This module is such a backend:
`int8_linear` and `quantize_and_rotate_rowwise`, plus `constraints()` saying exactly which calls it
takes. The ConvRot dequantize LoRA merges call (`dequantize_int8_convrot_weight*`) is not served: ours is
the same float32 rotation GEMM as comfy-kitchen's eager one and measured no faster on CPU (3840², 2 cores:
eager 0.57 s, ours 0.70-0.79 s, a row-chunked variant 1.2 s), so comfy-kitchen keeps it.
Everything else is declined by a constraint, so comfy-kitchen serves it unchanged.

Where it serves (and why; see bench/native.py for the figures):
- CPU, W8A8 (`int8_linear`): measured faster. comfy-kitchen's eager path rotates in a separate pass and
  uses torch._int_mm: a scalar loop on CPUs without AMX, and with AMX a kernel that re-lays the weight
  out on every call; ours (kernels/cpu_int8_gemm.py) is exact on a packed copy of the weight cached per
  weight tensor (`PackCache`): fbgemm with a pair-safe split on AVX2, oneDNN's AMX int8 tiles with AMX
  (stock UNETLoader, Z-Image dim 3840, 1024+128 tokens: 2.2x native there).
- CPU `quantize_and_rotate_rowwise`: fp16/bf16 inputs only (measured faster; float32 was not).
- NVIDIA GPUs the routing gives our Triton (sm_80/86/89/90, kernels/routing.py), group size <= 64 (`int8_linear`,
  `quantize_and_rotate_rowwise`): by design — one fused rotate+quantize kernel where comfy-kitchen's fused
  kernel exists only for 256. Group 256 and every other GPU stay with comfy-kitchen's own kernels: on AMD
  (ROCm) its HIP backend, which ours was never measured against, so it is never shadowed.

Numerics: the activation is rotated and quantized in float32 (comfy-kitchen's eager path rotates in
x's dtype), so results are at least as close to the exact product; `input_act` and `residual` are
applied by comfy-kitchen's own helpers, exactly as its eager backend does. No ComfyUI imports here;
comfy_kitchen is imported only by `constraints()` and the activation helpers.
"""
from __future__ import annotations

import inspect
import threading

import torch

from . import backends
from .hadamard import VALID_GROUP_SIZES, hadamard
from .linear import int8_linear as _int8_linear
from .act_quant import rotate_quantize_rows
from .linear import prepack

NAME = "int8_convrot"
FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
# Group sizes our fused Triton rotate+quantize handles by design better than comfy-kitchen (which fuses 256 only).
CUDA_GROUP_SIZES = (4, 16, 64)
# int8_linear's keyword arguments we implement, with the value that means "not used". A call passing any
# other keyword (a newer comfy-kitchen's feature) is declined, so it reaches a backend that knows it.
INT8_LINEAR_ARGS = {"x": None, "weight": None, "weight_scale": None, "bias": None, "out_dtype": None,
                    "convrot": False, "convrot_groupsize": 256, "input_act": None, "input_act_weight": None,
                    "input_act_eps": 0.0, "residual": None, "residual_scale": None}


# -- comfy-kitchen's own pre/post steps (applied exactly as its eager backend does) ---------------------

def _activations():
    try:
        from comfy_kitchen.backends import _activations as acts
    except Exception:   # an older comfy-kitchen without input_act: only input_act=None is accepted
        return None
    return acts


def input_act_support() -> tuple[frozenset, bool]:
    """(input_act names comfy-kitchen's eager helper applies, whether it takes weight/eps (rms_norm))."""
    acts = _activations()
    if acts is None:
        return frozenset({None, "none"}), False
    names = frozenset(getattr(acts, "INPUT_ACT_TO_CODE", {None: 0, "none": 0}))
    takes_weight = len(inspect.signature(acts.apply_input_act).parameters) >= 4
    return names, takes_weight


def _apply_input_act(x, input_act, weight, eps):
    if input_act in (None, "none"):
        return x
    acts = _activations()
    if input_act_support()[1]:
        return acts.apply_input_act(x, input_act, weight, eps)
    return acts.apply_input_act(x, input_act)


def _apply_residual(y, residual, residual_scale):
    if residual is None:
        return y
    acts = _activations()
    if acts is not None and hasattr(acts, "apply_residual"):
        return acts.apply_residual(y, residual, residual_scale)
    if residual_scale is None:
        raise ValueError("residual requires residual_scale")
    return torch.addcmul(residual.to(y.dtype), y, residual_scale.to(y.dtype))


# -- the CPU prepack cache ---------------------------------------------------------------------------

class PackCache:
    """fbgemm packed copies of the weights comfy-kitchen passes in, one per live weight tensor.

    comfy-kitchen hands the raw int8 weight to every call, and packing costs far more than a GEMM, so
    the pack is kept while the weight tensor lives (weak keys by identity: nothing is kept alive, a new
    tensor never sees an old pack). A hit must also match storage, shape and content: the version
    counter where the tensor has one; ComfyUI's weights are made under inference_mode, which has none,
    and its hooks can write weights in place, so for those an int64 checksum of the codes (one 5 GB/s
    pass, ~2% of the GEMM it guards at 1k tokens) plus the exact scales. Memory: a pack is ~1–1.15 bytes
    per weight on top of ComfyUI's own int8 copy (oneDNN / fbgemm layout), as in the pack's own loader.
    """

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary
        self._packs = WeakIdKeyDictionary()
        self._lock = threading.Lock()

    @staticmethod
    def _content(codes: torch.Tensor):
        if not codes.is_inference():
            return ("version", codes._version)
        flat = codes.reshape(-1)
        if flat.numel() % 8 == 0 and codes.is_contiguous():
            return ("sum", int(flat.view(torch.int64).sum()))
        return ("sum", int(flat.sum(dtype=torch.int64)), int((flat.to(torch.int64) * 31).sum()))

    def key(self, codes: torch.Tensor):
        return (codes.data_ptr(), tuple(codes.shape), codes.stride(), self._content(codes))

    def get(self, codes: torch.Tensor, scale: torch.Tensor):
        key = self.key(codes)
        with self._lock:
            hit = self._packs.get(codes)
        if hit is not None and hit[0] == key and torch.equal(hit[1], scale):
            return hit[2]
        packed = prepack(codes, scale)
        with self._lock:
            self._packs[codes] = (key, scale.detach().clone(), packed)
        return packed

    def __len__(self) -> int:
        return len(self._packs)

    def clear(self) -> None:
        with self._lock:
            self._packs = type(self._packs)()


PACKS = PackCache()


# -- the backend functions (comfy-kitchen's names and signatures) ---------------------------------------

def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None,
                out_dtype: torch.dtype = torch.bfloat16, convrot: bool = False, convrot_groupsize: int = 256,
                input_act=None, input_act_weight=None, input_act_eps: float = 0.0, residual=None,
                residual_scale=None) -> torch.Tensor:
    """comfy-kitchen `int8_linear`: W8A8, activation rotated + quantized per token in float32."""
    x = _apply_input_act(x, input_act, input_act_weight, input_act_eps)
    scale = weight_scale.to(device=weight.device, dtype=torch.float32).reshape(-1, 1)
    group = int(convrot_groupsize) if convrot else None
    packed = None
    if x.device.type == "cpu" and backends.select_gemm_backend(x.device) == "cpu":
        packed = PACKS.get(weight, scale)
    y = _int8_linear(x, weight, scale, bias, group, "w8a8", packed=packed, out_dtype=out_dtype or x.dtype)
    return _apply_residual(y, residual, residual_scale)


def quantize_and_rotate_rowwise(x: torch.Tensor, h: torch.Tensor, group_size: int,
                                stochastic_rounding: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """comfy-kitchen `quantize_and_rotate_rowwise` (deterministic rounding only; `h` is the regular
    Hadamard of `group_size`, which our kernels build themselves)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        from .triton import rotate_quantize
        q, s = rotate_quantize(x2, group_size)
    else:
        q, s = rotate_quantize_rows(x2, group_size)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


# -- which calls we take -------------------------------------------------------------------------------

def _tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def cuda_ok(device: torch.device) -> tuple[bool, str]:
    """Our GPU path: the fused Triton kernels, only where the pack's routing runs them (NVIDIA GPUs whose
    configs were compiled and checked). Elsewhere, AMD included, comfy-kitchen keeps every call: on ROCm its
    HIP backend is not shadowed, as ours was never measured faster there."""
    r = backends.route(device)
    return r.w8a8 == "triton", r.why


def cpu_ok() -> tuple[bool, str]:
    from .cpu_int8_gemm import backend as cpu_gemm
    return True, f"CPU int8 GEMM: {cpu_gemm()}"


def _device_rule(x: torch.Tensor, group, linear: bool) -> str | None:
    """Why this device/group size is not ours, or None."""
    if x.device.type == "cpu":
        return None
    if x.device.type == "cuda":
        ok, why = cuda_ok(x.device)
        if not ok:
            return why
        if linear and group not in CUDA_GROUP_SIZES:
            return f"CUDA: group size {group} stays with comfy-kitchen (ours is fused by design for <= 64)"
        return None
    return f"device {x.device.type} is not served"


def int8_linear_rule(kwargs) -> tuple[str, str] | None:
    """(param, reason) when the call is not ours, else None. Pure Python: tests call it directly."""
    for k, v in kwargs.items():
        if k not in INT8_LINEAR_ARGS:
            if v is not None and v is not False:
                return k, "keyword not implemented by int8_convrot"
    x, w, s = kwargs.get("x"), kwargs.get("weight"), kwargs.get("weight_scale")
    if not (_tensor(x) and _tensor(w) and _tensor(s)):
        return "x", "x, weight and weight_scale must be tensors"
    if x.dtype not in FLOATS or w.dtype != torch.int8:
        return "x", "x must be float32/float16/bfloat16 and weight int8"
    if w.dim() != 2 or x.dim() < 1:
        return "weight", "weight must be 2-D (N, K)"
    if x.device != w.device or s.device != w.device:
        return "weight", "x, weight and weight_scale must be on one device"
    if s.numel() not in (1, w.shape[0]):
        return "weight_scale", "neither per-row nor per-tensor"
    out_dtype = kwargs.get("out_dtype")
    if out_dtype is not None and out_dtype not in FLOATS:
        return "out_dtype", f"{out_dtype} not produced by int8_convrot"
    bias = kwargs.get("bias")
    if bias is not None and (bias.device != w.device or bias.numel() != w.shape[0]):
        return "bias", "bias must hold N values on the weight's device"
    act = kwargs.get("input_act")
    names, takes_weight = input_act_support()
    if act not in names or (act == "rms_norm" and not takes_weight):
        return "input_act", f"{act!r} is not applied by this comfy-kitchen's eager helper"
    k_in = x.shape[-1] // (2 if act in ("swiglu", "situ") else 1)
    if k_in != w.shape[1]:
        return "x", "inner dimensions differ (comfy-kitchen reports the error)"
    convrot = kwargs.get("convrot", False)
    group = kwargs.get("convrot_groupsize", 256) if convrot else None
    if convrot and (group not in VALID_GROUP_SIZES or w.shape[1] % group):
        return "convrot_groupsize", f"group size {group} invalid for K={w.shape[1]}"
    if kwargs.get("residual") is not None and kwargs.get("residual_scale") is None:
        return "residual", "residual without residual_scale (comfy-kitchen reports the error)"
    why = _device_rule(x, group, linear=True)
    return None if why is None else ("__device__", why)


def quantize_and_rotate_rule(kwargs) -> tuple[str, str] | None:
    x, g = kwargs.get("x"), kwargs.get("group_size")
    if not _tensor(x) or x.dim() < 1:
        return "x", "x must be a tensor"
    if kwargs.get("stochastic_rounding"):
        return "stochastic_rounding", "only deterministic rounding"
    if g not in VALID_GROUP_SIZES or x.shape[-1] % g:
        return "group_size", f"group size {g} invalid for K={x.shape[-1]}"
    h = kwargs.get("h", kwargs.get("H"))
    # Ours builds H_g itself: take the call only when h is that matrix (comfy-kitchen's is the same one).
    if _tensor(h) and (tuple(h.shape) != (g, g) or not torch.allclose(
            h.float(), hadamard(g, h.device, torch.float32), atol=1e-3)):
        return "h", "not the regular Hadamard matrix of group_size"
    if x.device.type == "cuda":
        why = _device_rule(x, g, linear=True)
        return None if why is None else ("__device__", why)
    if x.device.type != "cpu":
        return "__device__", f"device {x.device.type} is not served"
    # Measured on CPU (1152×3840, g 64, 2 loaded cores): fp16/bf16 ~2.7x faster than comfy-kitchen's eager
    # (it rotates in x's dtype); float32 was a toss-up (0.6-1.6x), so float32 stays with comfy-kitchen.
    return ("x", "float32 on CPU stays with comfy-kitchen (not measured faster)") if x.dtype == torch.float32 else None


def constraints() -> dict:
    """comfy-kitchen `FunctionConstraints` for every function of this module (needs `call_rules`)."""
    from comfy_kitchen.constraints import FunctionConstraints, ParamConstraint, ValidationResult

    def rule(check):
        def call_rule(kwargs):
            failed = check(kwargs)
            return ValidationResult.ok() if failed is None else ValidationResult.fail(*failed)
        call_rule.__name__ = f"int8_convrot_{check.__name__}"
        return call_rule

    devices = frozenset({"cpu", "cuda"})
    floats = ParamConstraint(dtypes=FLOATS)
    int8 = ParamConstraint(dtypes=frozenset({torch.int8}))
    linear = FunctionConstraints(
        params={"x": floats, "weight": int8, "weight_scale": floats, "bias": floats,
                "convrot": ParamConstraint(dtypes=frozenset({bool})),
                "convrot_groupsize": ParamConstraint(dtypes=frozenset({int})),
                "residual": floats, "residual_scale": floats, "input_act_weight": floats},
        default_devices=devices, call_rules=(rule(int8_linear_rule),))
    quant = FunctionConstraints(
        params={"x": floats, "group_size": ParamConstraint(dtypes=frozenset({int}))},
        default_devices=devices, call_rules=(rule(quantize_and_rotate_rule),))
    return {"int8_linear": linear, "quantize_and_rotate_rowwise": quant}


__all__ = ["CUDA_GROUP_SIZES", "NAME", "PACKS", "PackCache", "constraints", "cpu_ok", "cuda_ok",
           "input_act_support",
           "int8_linear", "int8_linear_rule", "quantize_and_rotate_rowwise"]
