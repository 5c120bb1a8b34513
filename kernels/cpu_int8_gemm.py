"""Exact row-scaled int8 x int8 GEMM on CPU using only ops that ship in torch.

    y[m, n] = sx[m] * sw[n] * sum_k qx[m, k] * qw[n, k]  (+ bias[n])

qx: int8 (M, K) per-token activation codes, qw: int8 (N, K) per-row weight codes
(fixed, prepacked once by `pack_int8_weight`).

Why not just call an int8 GEMM?
-------------------------------
* ``torch._int_mm`` on CPU is a scalar loop (~1-6 GOP/s) without AMX; with AMX it is exact and
  fast but re-lays the weight out on every call (~1.6x slower than prepacked oneDNN there).
* fbgemm (``quantized::*``) and oneDNN (``onednn::qlinear_*``) are fast (~300 GOP/s
  on a 2-core Zen3) but on x86 without VNNI (AVX2, AVX-512 w/o VNNI) their u8 x s8
  inner product is ``vpmaddubsw``: it adds the two products of ADJACENT k
  (k = 2j, 2j+1) into a SATURATING int16 before widening to int32.  Activations
  enter as u = qx + 128 in [0, 255] (zero point 128; oneDNN given an s8 source
  adds the same +128 internally), so a pair
  u_a*w_a + u_b*w_b can reach 255*254 = 64770 > 32767 and is silently clamped.
  On realistic rotated Gaussian data that gave 2.6% wrong outputs (0.6% relative
  error of y), 3.4% (1.2%) with massive-activation channels, ~5% on worst-case rows.
  (This is why torch's x86 observers use ``reduce_range``: 7-bit activations.)

The fix used here (exact, ~1.1x the cost instead of 2x)
-------------------------------------------------------
A pair can only saturate if, for u <= 255, 255*(w_a+ + w_b+) > 32767 or
255*(w_a- + w_b-) < -32768, i.e. both weights share a sign and |w_a + w_b| > 128
(255*128 = 32640 fits, 255*129 does not).  That is a property of the weights only,
so at pack time we split  W = W_safe + R:  in every violating pair the excess
|w_a + w_b| - 128 is taken off the larger element (it keeps its sign and stays in
int8) so W_safe is saturation-free for ANY int8 activation, and R holds one value
per violating pair.  For Hadamard-rotated per-row-quantized weights ~0.8% of pairs
violate, so R is ~0.4% dense and is applied with a CSR sparse x dense product in
fp32 (a few terms per output, so only fp32 rounding remains; bit-exact when sw = 1).  The probe below verifies
on this machine, with adversarial data, that the fast kernel pairs k the way we
assume and that W_safe + R is bit-exact; if the raw kernel does not saturate at
all (VNNI/AMX machines) the residual is skipped.

Measured on a 2-core Zen3 (AVX2, no VNNI), M=1024, K=N=3840, 2 threads:
  this module (fbgemm, pair-safe + sparse residual, exact)     ~255 GOP/s
  raw fbgemm / raw oneDNN u8s8 (saturating, rejected)          ~320 / ~290 GOP/s
  exact 7-bit weight halves along K (2x MACs), oneDNN / fbgemm ~150 / ~138 GOP/s
  fbgemm fp16-weight sgemm on the codes (near-exact)           ~150-170 GOP/s
  fp32 sgemm on the codes, MKL / oneDNN prepacked (4 B/weight) ~125 / ~139 GOP/s
  aten::_weight_int8pack_mm, torch._int_mm                     ~2 / ~1-6 GOP/s
On a 2-core Xeon with AMX (measured 2026-12-02, 2 threads, M=4096, K=N=3840), neither kernel
saturates and oneDNN runs AMX int8 tiles: oneDNN prepacked in 256-row chunks 28.7 ms, whole-M
46 ms, torch._int_mm 46 ms, fbgemm (VNNI) 144 ms, bf16 F.linear (AMX bf16) 50 ms, fp32 405 ms;
so with AMX oneDNN is the first tier.
Without AMX, oneDNN qlinear is as fast as fbgemm for large M but re-packs the weight on every
call (40 ms at M=1, N=10240 vs 1.3 ms for prepacked fbgemm), so it is only the
second tier.  The residual costs ~10-20% (CSR x dense + two transposes); the packed
weight takes ~1.15 B/weight (fbgemm layout + ~0.4% CSR entries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .backends import cpu_has_amx

__all__ = ["PackedInt8Weight", "pack_int8_weight", "int8_gemm_rowscaled", "backend", "backend_report",
           "fast_backend_available"]

# |w_a + w_b| <= 128 for same-sign pairs keeps 255*(w_a+w_b) inside int16.
_PAIR_LIMIT = 128
# Rows of the output handled per epilogue chunk (residual + scale + bias + cast),
# small enough that the chunk's x^T and residual stay in L2/L3. oneDNN also runs per chunk: with
# AMX that is 1.6x faster than one whole-M call at M=4096.
_EPILOGUE_ROWS = 256
# Output columns per chunk for the fp32 fallback (bounds the fp32 weight temp).
_FALLBACK_COLS = 1024
# torch.sparse.mm(csr, dense, "sum") runs torch's native spmm_reduce kernel, which
# vectorises over the dense columns: ~20% faster than the default (MKL) CSR x dense
# path for >= 64 columns, but ~2x slower for a handful (small M): pick per chunk.
_SPMM_REDUCE_MIN_COLS = 64


@contextlib.contextmanager
def _quantized_engine(name: str):
    """Select the quantized engine only while prepacking, then restore it."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _pair_safe_split(codes: torch.Tensor):
    """codes int8 (N, K) -> (safe int8 (N, K), residual int16 (N, K)); safe + residual == codes."""
    n, k = codes.shape
    q = codes.to(torch.int16)
    if k % 2:  # the last k pairs with zero padding inside the kernel: pad the same way
        q = F.pad(q, (0, 1))
    pairs = q.view(n, -1, 2)
    pos = pairs.clamp_min(0).sum(-1)
    neg = pairs.clamp_max(0).sum(-1)
    # At most one of the two is non-zero: a violating pair has both weights of one sign.
    excess = ((pos - _PAIR_LIMIT).clamp_min(0) + (neg + _PAIR_LIMIT).clamp_max(0)).to(q.dtype)
    # Take the excess off the larger-magnitude element: a >= b > 0 with a + b > 128
    # gives a - excess = 128 - b in [1, 127]; the negative case mirrors it (>= -128).
    larger = (pairs[..., 1].abs() > pairs[..., 0].abs()).long().unsqueeze(-1)
    resid = torch.zeros_like(pairs).scatter_(-1, larger, excess.unsqueeze(-1))
    resid = resid.view(n, -1)[:, :k]
    safe = (q[:, :k] - resid).to(torch.int8)
    return safe, resid


def _residual_csr(resid: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
    if not bool(resid.any()):
        return None
    # sw folded in, like the main GEMM's per-channel scale.
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return (resid.float() * scale.view(-1, 1)).to_sparse_csr()


# ----------------------------------------------------------------------------- backends
def _fbgemm_pack(codes: torch.Tensor, scale: torch.Tensor):
    n = codes.shape[0]
    with warnings.catch_warnings():  # quantized-tensor creation is deprecated but works
        warnings.simplefilter("ignore")
        wq = torch._make_per_channel_quantized_tensor(
            codes.contiguous(), scale.reshape(-1).double(), torch.zeros(n, dtype=torch.long), 0)
        with _quantized_engine("fbgemm"):
            return torch.ops.quantized.linear_prepack(wq, None)


def _fbgemm_run(xf: torch.Tensor, packed_params) -> torch.Tensor:
    # fbgemm quantizes xf with scale 1, zero point 128: u8 = qx + 128 exactly (xf holds
    # integer codes), accumulates in int32 (modulo the vpmaddubsw pairs), subtracts
    # 128 * colsum(W) and returns sw[n] * acc as fp32.
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(xf, 1.0, 128, packed_params)


def _onednn_pack(codes: torch.Tensor, scale: torch.Tensor):
    return torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)


def _onednn_run(qx: torch.Tensor, packed) -> torch.Tensor:
    # u8 source = qx + 128 (flip the sign bit), zero point 128 -- the form every torch
    # version accepts (an s8 source is shifted by +128 inside oneDNN anyway); weight
    # per-channel scales = sw; fp32 output.
    u8 = torch.bitwise_xor(qx.view(torch.uint8), 0x80)
    return torch.ops.onednn.qlinear_pointwise(
        u8, 1.0, 128, packed.main, packed.scale, packed.zero_points, None,
        1.0, 0, torch.float32, "none", [], "")


_FAST = ("fbgemm", "onednn")


def _tier_order() -> tuple[str, ...]:
    """oneDNN first where AMX makes it the fastest exact kernel; else fbgemm (prepacked, fast at
    every M; oneDNN without AMX re-packs W per call: ~30x slower at M=1)."""
    return ("onednn", "fbgemm") if cpu_has_amx() else _FAST


def _probe_one(kind: str):
    """Return (usable, needs_residual, reason) for a fast int8 kernel, checked bit-exactly."""
    gen = torch.Generator().manual_seed(1234)
    k, n = 259, 24  # odd K: checks the tail pairing too
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16)
    w[0, :] = 127                      # every pair violates (+)
    w[1, :] = -128                     # every pair violates (-)
    w[2, 1::2] = 127                   # (odd, even) neighbours: must be harmless
    w[2, 0::2] = 0
    w = w.to(torch.int8)
    unit = torch.ones(n, 1)
    rows = []
    for m in (1, 7, 70):
        x = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        x[0] = 127                     # u8 = 255 everywhere: worst case
        if m > 1:
            x[1] = -128
        rows.append(x)

    def run(codes, resid_csr):
        pk = PackedInt8Weight(kind, n, k, unit.view(-1).clone(), None, resid_csr, None, None)
        if kind == "fbgemm":
            pk = dataclasses.replace(pk, main=_fbgemm_pack(codes, unit))
        else:
            pk = dataclasses.replace(pk, main=_onednn_pack(codes, unit),
                                     zero_points=torch.zeros(n, dtype=torch.long))
        return [_gemm(x, torch.ones(x.shape[0], 1), pk, None, torch.float32) for x in rows]

    try:
        refs = [(x.long() @ w.long().T).float() for x in rows]  # |acc| < 2^24: exact in fp32
        raw = run(w, None)
        raw_exact = all(torch.equal(a, b) for a, b in zip(raw, refs))
        safe, resid = _pair_safe_split(w)
        split = run(safe, _residual_csr(resid, unit))
        split_exact = all(torch.equal(a, b) for a, b in zip(split, refs))
    except Exception as e:  # op missing in this build, engine unsupported, ...
        return False, False, f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if raw_exact:
        return True, False, "exact without residual (no int16 saturation: VNNI/AMX-class kernel)"
    if split_exact:
        return True, True, "int16 pair saturation detected; pair-safe split + sparse residual is bit-exact"
    return False, False, "not exact even with the pair-safe split (unexpected k pairing)"


@functools.lru_cache(maxsize=None)
def _probe():
    """Cached capability probe: {kind: (usable, needs_residual, reason)}."""
    out = {}
    for kind in _FAST:
        if kind == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
            out[kind] = (False, False, "fbgemm engine not in this torch build")
            continue
        out[kind] = _probe_one(kind)
    return out


def backend() -> str:
    """Name of the backend `pack_int8_weight` will use on this machine."""
    p = _probe()
    for kind in _tier_order():
        if p[kind][0]:
            return kind + ("_pairsafe_sparse" if p[kind][1] else "")
    return "fp32_fallback"


# Decided once per process; dynamo takes the answer as a constant instead of tracing the probe (an fbgemm
# pack is an opaque object: a graph break at every layer).
@torch.compiler.assume_constant_result
def fast_backend_available() -> bool:
    """True when a fast int8 kernel passed the exactness probe (else the fp32 fallback is used,
    which is no faster than a float GEMM, so callers may prefer their w8a16 path)."""
    return backend() != "fp32_fallback"


def backend_report() -> dict:
    """Why each backend was chosen or rejected (for logs)."""
    rep = {k: v[2] for k, v in _probe().items()}
    rep["fp32_fallback"] = ("always available; fp32 sgemm on the codes (products exact, "
                            "fp32 accumulation: relative error ~1e-7), weight converted per column chunk")
    rep["rejected"] = {
        "torch._int_mm": "exact; a scalar loop without AMX (~1-6 GOP/s), with AMX ~1.6x slower than "
                         "prepacked oneDNN (re-lays the weight out per call)",
        "raw fbgemm/oneDNN u8s8": "int16 saturation of adjacent-k pairs on non-VNNI x86 (up to ~1e-2 rel. error)",
        "7-bit weight halves": "exact but 2x the MACs (~140-150 GOP/s vs ~255 here)",
        "fp32/fp16-weight sgemm": "near-exact but ~125-170 GOP/s and 2-4 bytes per weight",
        "oneDNN first without AMX": "re-packs the weight every call: ~30x slower than fbgemm at M=1",
        "aten::_weight_int8pack_mm": "~2 GOP/s for M > 1 on this build",
    }
    rep["amx"] = cpu_has_amx()
    rep["selected"] = backend()
    return rep


# ----------------------------------------------------------------------------- public API
@dataclasses.dataclass(frozen=True, eq=False)
class PackedInt8Weight:
    backend: str                 # "fbgemm", "onednn" or "fp32" (see backend())
    n: int
    k: int
    scale: torch.Tensor          # float32 (N,) per-row weight scale sw
    main: object                 # prepacked W_safe (fbgemm params / oneDNN tensor) or None
    residual: Optional[torch.Tensor]  # sparse CSR (N, K) fp32 = sw * (W - W_safe), or None
    codes: Optional[torch.Tensor]     # int8 (N, K), only kept for the fp32 fallback
    zero_points: Optional[torch.Tensor] = None  # oneDNN per-channel weight zero points (0)

    @property
    def residual_nnz(self) -> int:
        return 0 if self.residual is None else int(self.residual._nnz())


def pack_int8_weight(codes: torch.Tensor, scale: torch.Tensor) -> PackedInt8Weight:
    """One-time prepack of int8 (N, K) weight codes with float32 (N, 1) row scales."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"codes must be int8 (N, K), got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    scale = scale.detach().to(torch.float32).reshape(-1).contiguous()
    if scale.numel() != n:
        raise ValueError(f"scale must have N={n} elements, got {scale.numel()}")
    codes = codes.detach().cpu().contiguous()
    p = _probe()
    for kind in _tier_order():
        usable, needs_residual, _ = p[kind]
        if not usable:
            continue
        if needs_residual:
            safe, resid = _pair_safe_split(codes)
            residual = _residual_csr(resid, scale)
        else:
            safe, residual = codes, None
        if kind == "fbgemm":
            return PackedInt8Weight(kind, n, k, scale, _fbgemm_pack(safe, scale), residual, None)
        return PackedInt8Weight(kind, n, k, scale, _onednn_pack(safe, scale), residual, None,
                                torch.zeros(n, dtype=torch.long))
    return PackedInt8Weight("fp32", n, k, scale, None, None, codes)


def int8_gemm_rowscaled(qx: torch.Tensor, sx: torch.Tensor, packed: PackedInt8Weight,
                        bias: Optional[torch.Tensor] = None,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = sx * sw^T * (qx @ qw^T) + bias, exact up to fp32 rounding of the scaling.

    qx: int8 (..., K); sx: float (..., 1) per-token scale; returns (..., N) in out_dtype.
    """
    if qx.dtype != torch.int8 or qx.shape[-1] != packed.k:
        raise ValueError(f"qx must be int8 (..., {packed.k}), got {qx.dtype} {tuple(qx.shape)}")
    lead = qx.shape[:-1]
    x2 = qx.reshape(-1, packed.k)
    s2 = sx.reshape(-1, 1).to(torch.float32)
    if s2.shape[0] != x2.shape[0]:
        raise ValueError("sx must have one scale per token")
    y = _gemm(x2, s2, packed, bias, out_dtype)
    return y.reshape(*lead, packed.n)


def _gemm(qx, sx, packed, bias, out_dtype):
    m, n = qx.shape[0], packed.n
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype)
    qx = qx.contiguous()
    if packed.backend == "fp32":
        return _fp32_fallback(qx, sx, packed, bias, out_dtype)
    xf = None
    acc = None
    if packed.backend == "fbgemm":
        xf = qx.float()                   # codes are exact in fp32
        acc = _fbgemm_run(xf, packed.main)  # (M, N) fp32 = sw * (qx @ W_safe^T)
    # oneDNN runs per chunk inside the epilogue loop: its output chunk is still in cache there.
    if packed.residual is not None and xf is None:
        xf = qx.float()
    if bias is not None:
        bias = bias.to(torch.float32).reshape(1, n)
    out = acc if acc is not None and out_dtype == torch.float32 else torch.empty(m, n, dtype=out_dtype)
    # Row-chunked epilogue so each step works on cache-resident data.
    rows = _EPILOGUE_ROWS
    for m0 in range(0, m, rows):
        m1 = min(m, m0 + rows)
        a = acc[m0:m1] if acc is not None else _onednn_run(qx[m0:m1], packed)
        if packed.residual is not None:
            # (N, K) CSR @ (K, rows) -> (N, rows) = (qx @ (sw*R)^T)^T: a few terms per
            # output, each within an ulp or two of exact.  The CSR x dense kernel
            # vectorises over the dense columns, hence x^T.
            xt = xf[m0:m1].t().contiguous()
            if m1 - m0 >= _SPMM_REDUCE_MIN_COLS:
                r = torch.sparse.mm(packed.residual, xt, "sum")
            else:
                r = torch.sparse.mm(packed.residual, xt)
            a.add_(r.t().contiguous())  # blocked transpose copy beats a strided add
        # One fused pass: y = acc * sx (+ bias), cast to out_dtype on the store.
        if bias is None:
            torch.mul(a, sx[m0:m1], out=out[m0:m1])
        else:
            torch.addcmul(bias, a, sx[m0:m1], out=out[m0:m1])
    return out


def _fp32_fallback(qx, sx, packed, bias, out_dtype):
    # Products |x*w| <= 2^14 are exact in fp32; only the K-sum rounds (rel. ~1e-7).
    # The weight is converted per column chunk to avoid keeping a 4 B/weight copy.
    m, n = qx.shape[0], packed.n
    xf = qx.float()
    out = torch.empty(m, n, dtype=out_dtype)
    for n0 in range(0, n, _FALLBACK_COLS):
        n1 = min(n, n0 + _FALLBACK_COLS)
        y = F.linear(xf, packed.codes[n0:n1].float())
        y.mul_(sx).mul_(packed.scale[n0:n1])
        if bias is not None:
            y.add_(bias[n0:n1].to(torch.float32))
        out[:, n0:n1] = y
    return out
