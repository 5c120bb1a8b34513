"""Tests for kernels/cpu_int8_gemm.py against an exact float64 reference.

Reference: acc = qx @ qw^T computed in float64 (|acc| < 2^53, so exact), then
ref = sx * sw * acc + bias in float64.

Tolerances (u = 2^-24, the fp32 unit roundoff):
* fast int8 backends: the integer accumulation is exact; only a handful of fp32
  roundings remain (int32->fp32, *sw, + residual terms, *sx, + bias), so
  |y - ref| <= 16 u (sx*sw*sum_k |qx*qw| + |bias|).  That is < ~1 accumulator unit at
  K=3840, while one saturated int16 pair is off by up to ~32000 units.
* fp32 fallback: the classic summation bound |err| <= K u sum_k |qx*qw| (+ the scaling).
* Unit scales with K <= 1024: every partial sum is < 2^24, so ALL backends must be
  bit-exact, and this is checked with torch.equal.
* bf16/fp16 outputs: one extra rounding, 2^-8 / 2^-11 relative to |ref|.
"""

import pytest
import torch

from comfyui_int8_convrot.kernels import cpu_int8_gemm as g

U = 2.0 ** -24


# ----------------------------------------------------------------------------- data
def _hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / h.shape[0] ** 0.5).float()


def _rotate(x, block=128):
    k = x.shape[-1]
    return (x.reshape(-1, k // block, block) @ _hadamard(block)).reshape(x.shape)


def _quant_rows(x, qmin):
    scale = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale).clamp(qmin, 127).to(torch.int8), scale.float()


def realistic(m, k, n, seed=0, adversarial=True):
    """Rotated Gaussian weight (per-row codes, max |code| 127 once per row, typical
    ~30) and rotated activations with massive-activation channels (per-token codes).
    The first rows are worst cases: all +127 (u8 = 255 everywhere) and +-127 following
    the sign of weight rows, so adjacent large same-sign weights meet u8 = 255."""
    gen = torch.Generator().manual_seed(seed)
    qw, sw = _quant_rows(_rotate(torch.randn(n, k, generator=gen) * 0.02), -128)
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:16]] *= 40.0
    qx, sx = _quant_rows(_rotate(x), -127)
    if adversarial and m >= 4:
        qx[0] = 127
        qx[1] = -127
        qx[2] = torch.where(qw[0] > 0, 127, -127).to(torch.int8)
        qx[3] = torch.where(qw[1 % n] < 0, 127, -127).to(torch.int8)
    return qx, sx, qw, sw


def reference(qx, sx, qw, sw, bias=None):
    acc = qx.double() @ qw.double().T
    ref = acc * sx.double().reshape(-1, 1) * sw.double().reshape(1, -1)
    absacc = qx.double().abs() @ qw.double().abs().T
    mag = absacc * sx.double().reshape(-1, 1) * sw.double().reshape(1, -1)
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    return acc, ref, mag


def _tol(packed, k, mag):
    return (16 * U if packed.backend != "fp32" else (k + 16) * U) * mag + 1e-30


def check(y, qx, sx, qw, sw, packed, bias=None):
    acc, ref, mag = reference(qx, sx, qw, sw, bias)
    err = (y.double() - ref).abs()
    tol = _tol(packed, qx.shape[1], mag)
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} elements out of tolerance; worst err {err.max().item():.3e}, "
        f"in accumulator units {(err / (mag / (qx.double().abs() @ qw.double().abs().T).clamp_min(1))).max().item():.3f}")
    return err, ref


# ----------------------------------------------------------------------------- tests
def test_backend_reports_choice():
    rep = g.backend_report()
    assert rep["selected"] == g.backend()
    assert g.fast_backend_available() == (g.backend() != "fp32_fallback")
    assert set(rep) >= {"fbgemm", "onednn", "fp32_fallback", "rejected", "selected"}


def test_tier_order_follows_amx(monkeypatch):
    """With AMX oneDNN runs int8 tiles (2x bf16, 3x fbgemm's VNNI there); without, fbgemm leads."""
    monkeypatch.setattr(g, "cpu_has_amx", lambda: True)
    assert g._tier_order() == ("onednn", "fbgemm")
    monkeypatch.setattr(g, "cpu_has_amx", lambda: False)
    assert g._tier_order() == ("fbgemm", "onednn")


@pytest.mark.parametrize("codes_case", ["random", "extremes"])
def test_pair_safe_split(codes_case):
    gen = torch.Generator().manual_seed(3)
    k = 67  # odd: the last element pairs with padding
    if codes_case == "random":
        codes = torch.randint(-128, 128, (40, k), generator=gen, dtype=torch.int8)
    else:
        codes = torch.tensor([[127] * k, [-128] * k, [127, -128] * (k // 2) + [127],
                              [65, 64] * (k // 2) + [0], [-64, -65] * (k // 2) + [-128]], dtype=torch.int8)
    safe, resid = g._pair_safe_split(codes)
    assert safe.dtype == torch.int8
    assert torch.equal(safe.to(torch.int16) + resid, codes.to(torch.int16))
    p = torch.nn.functional.pad(safe.to(torch.int32), (0, 1)).view(codes.shape[0], -1, 2)
    # 255 * (positive part) <= 32767 and 255 * (negative part) >= -32768 for every pair.
    assert int(p.clamp_min(0).sum(-1).max()) * 255 <= 32767
    assert int(p.clamp_max(0).sum(-1).min()) * 255 >= -32768
    # one residual entry at most per pair
    r = torch.nn.functional.pad(resid, (0, 1)).view(codes.shape[0], -1, 2)
    assert int((r != 0).sum(-1).max()) <= 1


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("k,n", [(259, 33), (1024, 257), (64, 1)])
def test_unit_scales_bit_exact(m, k, n):
    """sx = sw = 1, no bias, K <= 1024: every backend must return the integer exactly (oneDNN with
    AMX: within the fp32 rounding of its u8 accumulator, see below),
    including worst-case rows (all +127 / -128) and worst-case weight pairs."""
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    qx = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    qw = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    qx[0] = 127
    qw[0] = 127
    if m > 1:
        qx[1] = -128  # outside the per-token range but a valid int8: must still be exact
    if n > 1:
        qw[1] = -128
    packed = g.pack_int8_weight(qw, torch.ones(n, 1))
    y = g.int8_gemm_rowscaled(qx, torch.ones(m, 1), packed)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = qx.double() @ qw.double().T
    if packed.backend == "onednn":
        # oneDNN's AMX path takes the zero-point compensation (128·colsum) off the u8 accumulator
        # (up to 255·128·K) in fp32: bit-exact while that is below 2^24, else one or two fp32 ulps.
        assert (y.double() - ref).abs().max() <= 2.0 ** -23 * 255 * 128 * k
    else:
        assert torch.equal(y.double(), ref)


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_realistic_with_worst_case_rows(m, with_bias):
    k, n = 3840, 129  # odd N
    qx, sx, qw, sw = realistic(m, k, n, seed=m)
    bias = torch.randn(n) * 0.1 if with_bias else None
    packed = g.pack_int8_weight(qw, sw)
    y = g.int8_gemm_rowscaled(qx, sx, packed, bias)
    err, ref = check(y, qx, sx, qw, sw, packed, bias)
    assert (err.norm() / ref.norm()).item() < 1e-6


def test_raw_kernel_saturates_here_and_split_fixes_it():
    """Documents the reason for the split: on this machine the raw fast kernel is wrong
    on worst-case rows (skipped where the kernel has no int16 saturation)."""
    if g.backend() not in ("fbgemm_pairsafe_sparse", "onednn_pairsafe_sparse"):
        pytest.skip(f"backend {g.backend()} needs no pair-safe split")
    k, n, m = 3840, 64, 8
    qx, sx, qw, sw = realistic(m, k, n, seed=11)
    packed = g.pack_int8_weight(qw, sw)
    assert packed.residual_nnz > 0
    raw = g.PackedInt8Weight(packed.backend, n, k, packed.scale,
                             g._fbgemm_pack(qw, sw) if packed.backend == "fbgemm" else g._onednn_pack(qw, sw),
                             None, None, torch.zeros(n, dtype=torch.long))
    acc, ref, mag = reference(qx, sx, qw, sw)
    y_raw = g.int8_gemm_rowscaled(qx, sx, raw)
    assert ((y_raw.double() - ref).abs() > _tol(packed, k, mag)).any()
    check(g.int8_gemm_rowscaled(qx, sx, packed), qx, sx, qw, sw, packed)


@pytest.mark.parametrize("out_dtype,rel", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_low_precision_output(out_dtype, rel):
    k, n, m = 512, 95, 9
    qx, sx, qw, sw = realistic(m, k, n, seed=5)
    bias = torch.randn(n) * 0.1
    packed = g.pack_int8_weight(qw, sw)
    y = g.int8_gemm_rowscaled(qx, sx, packed, bias.to(out_dtype), out_dtype)
    assert y.dtype == out_dtype
    _, ref, mag = reference(qx, sx, qw, sw, bias.to(out_dtype).float())
    assert ((y.double() - ref).abs() <= rel * ref.abs() + _tol(packed, k, mag) + 1e-6).all()


def test_leading_dims_and_scale_shapes():
    k, n = 256, 40
    qx, sx, qw, sw = realistic(6, k, n, seed=9)
    packed = g.pack_int8_weight(qw, sw.reshape(-1))  # (N,) scale accepted too
    y = g.int8_gemm_rowscaled(qx.reshape(2, 3, k), sx.reshape(2, 3, 1), packed)
    assert y.shape == (2, 3, n)
    check(y.reshape(6, n), qx, sx, qw, sw, packed)
    assert g.int8_gemm_rowscaled(qx[:0], sx[:0], packed).shape == (0, n)


def test_engine_not_leaked():
    before = torch.backends.quantized.engine
    g.pack_int8_weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(8, 1))
    assert torch.backends.quantized.engine == before


def test_bad_inputs():
    packed = g.pack_int8_weight(torch.ones(8, 16, dtype=torch.int8), torch.ones(8, 1))
    with pytest.raises(ValueError):
        g.int8_gemm_rowscaled(torch.ones(2, 15, dtype=torch.int8), torch.ones(2, 1), packed)
    with pytest.raises(ValueError):
        g.int8_gemm_rowscaled(torch.ones(2, 16), torch.ones(2, 1), packed)
    with pytest.raises(ValueError):
        g.pack_int8_weight(torch.ones(8, 16), torch.ones(8, 1))


@pytest.mark.parametrize("m,with_bias", [(1, False), (7, True), (33, True)])
def test_fp32_fallback(monkeypatch, m, with_bias):
    """Force the fallback used when neither fast op is usable in the torch build."""
    monkeypatch.setattr(g, "_probe", lambda: {kind: (False, False, "forced off") for kind in g._FAST})
    assert g.backend() == "fp32_fallback" and not g.fast_backend_available()
    k, n = 3840, 1100  # > one fallback column chunk, odd-ish N
    qx, sx, qw, sw = realistic(m, k, n, seed=21)
    bias = torch.randn(n) if with_bias else None
    packed = g.pack_int8_weight(qw, sw)
    assert packed.backend == "fp32"
    check(g.int8_gemm_rowscaled(qx, sx, packed, bias), qx, sx, qw, sw, packed, bias)


@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("tier", ["fbgemm", "onednn"])
def test_each_tier_alone(monkeypatch, tier, m):
    """Each fast tier checked wherever it runs, whichever leads on this machine (fbgemm without AMX,
    oneDNN with it), across the 256-row chunk boundary."""
    real = g._probe()
    if not real[tier][0]:
        pytest.skip(f"{tier} tier unusable here: {real[tier][2]}")
    monkeypatch.setattr(g, "_probe", lambda: {kind: real[kind] if kind == tier else (False, False, "forced off")
                                              for kind in g._FAST})
    assert g.backend().startswith(tier)
    k, n = 3840, 77
    qx, sx, qw, sw = realistic(m, k, n, seed=31 + m)
    bias = torch.randn(n)
    packed = g.pack_int8_weight(qw, sw)
    assert packed.backend == tier
    check(g.int8_gemm_rowscaled(qx, sx, packed, bias), qx, sx, qw, sw, packed, bias)
    unit = g.pack_int8_weight(qw[:, :1024].contiguous(), torch.ones(n, 1))
    y = g.int8_gemm_rowscaled(qx[:, :1024].contiguous(), torch.ones(m, 1), unit)
    assert torch.equal(y.double(), qx[:, :1024].double() @ qw[:, :1024].double().T)
