"""Fused Triton kernels for W8A8 ConvRot linears, exposed as torch custom ops.

- `rotate_quantize(x2d, group_size) -> (qx int8 (M, K), sx fp32 (M, 1))`: group-wise H_g rotation and
  per-token quantization in one kernel (rotate_quant.py).
- `int8_gemm_rescale(qx, sx, codes, sw, bias, out_dtype) -> y (M, N)`: int8 GEMM with the rescale,
  bias and cast fused into the epilogue (int8_gemm.py).

Both are `torch.library.custom_op`s in the `int8_convrot` namespace with fake (meta) kernels, so
torch.compile traces through them as opaque ops instead of graph-breaking on a Triton launch.
Triton itself is imported only when a kernel runs: importing this package never fails without it, and
a kernel that fails to compile or launch falls back to torch with one warning (fallback.py).
"""
from __future__ import annotations

import torch

from ..act_quant import rotate_quantize_rows
from ..backends import triton_status
from ..custom_ops import caller, define
from . import fallback


def _kernels():
    """The kernel modules, or a clear error saying why Triton cannot run here."""
    try:
        from . import int8_gemm, rotate_quant
    except Exception as exc:  # ImportError, or a broken install raising anything
        raise RuntimeError(
            f"the Triton INT8 kernels need Triton ({triton_status()[1]}; import failed: {exc}); install it "
            "with `pip install triton` (Linux) or `triton-windows`, or use another backend") from exc
    return rotate_quant, int8_gemm


def _rotate_quantize_impl(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    def torch_path():
        return rotate_quantize_rows(x, group_size)

    # The fallback lives in the op, not its callers, so it also runs inside a torch.compile'd graph.
    return fallback.run("rotate_quantize", x.device, (x.dtype, x.shape[-1], group_size),
                        lambda: _kernels()[0].rotate_quantize_triton(x, group_size), torch_path)


def _rotate_quantize_fake(x, group_size):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _torch_rescale(qx, sx, codes, sw, bias) -> torch.Tensor:
    """The Triton epilogue's roundings before its cast (fp32 ·sx, ·sw, +bias), so the torch fallbacks of
    both GEMM ops stay bit-identical to the kernels."""
    y = fallback.int_mm(qx, codes).float() * sx.reshape(-1, 1).float() * sw.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.reshape(1, -1).float()
    return y


def _int8_gemm_rescale_impl(qx: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, sw: torch.Tensor,
                            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    def torch_path():
        return _torch_rescale(qx, sx, codes, sw, bias).to(out_dtype)

    return fallback.run("int8_gemm", qx.device, (tuple(codes.shape), qx.shape[0] <= 16, out_dtype, bias is not None),
                        lambda: _kernels()[1].int8_gemm_rescale_triton(qx, sx, codes, sw, bias, out_dtype),
                        torch_path)


def _int8_gemm_rescale_fake(qx, sx, codes, sw, bias, out_dtype):
    return qx.new_empty((qx.shape[0], codes.shape[0]), dtype=out_dtype)


def _rotate_quantize_down_impl(x: torch.Tensor, group_size: int,
                               down_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def torch_path():
        q, s = rotate_quantize_rows(x, group_size)
        return q, s, x.to(down_t.dtype).float() @ down_t.float()   # the kernel's operands, fp32 sums

    return fallback.run("rotate_quantize_down", x.device, (x.dtype, x.shape[-1], group_size, down_t.shape[1]),
                        lambda: _kernels()[0].rotate_quantize_triton(x, group_size, down_t), torch_path)


def _rotate_quantize_down_fake(x, group_size, down_t):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32),
            x.new_empty((x.shape[0], down_t.shape[1]), dtype=torch.float32))


def _int8_gemm_rescale_lora_impl(qx: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, sw: torch.Tensor,
                                 bias: torch.Tensor | None, z: torch.Tensor, up: torch.Tensor, zcol: torch.Tensor,
                                 out_dtype: torch.dtype) -> torch.Tensor:
    def torch_path():   # the kernel's epilogue: fp32 rescale (+ bias), + z·upᵀ with z in up's dtype, one cast
        y = _torch_rescale(qx, sx, codes, sw, bias)
        r = up.shape[1]
        zq = z.to(up.dtype).float()
        for c0 in torch.unique(zcol).tolist():    # one z column block per q/k/v slice
            cols = zcol == c0
            y[:, cols] += zq[:, c0:c0 + r] @ up[cols].float().t()
        return y.to(out_dtype)

    return fallback.run("int8_gemm_lora", qx.device, (tuple(codes.shape), tuple(z.shape[1:]), up.shape[1], out_dtype,
                                                      bias is not None),
                        lambda: _kernels()[1].int8_gemm_rescale_triton(qx, sx, codes, sw, bias, out_dtype, z, up,
                                                                       zcol),
                        torch_path)


def _int8_gemm_rescale_lora_fake(qx, sx, codes, sw, bias, z, up, zcol, out_dtype):
    return qx.new_empty((qx.shape[0], codes.shape[0]), dtype=out_dtype)


rotate_quantize_op = caller(define("rotate_quantize", _rotate_quantize_impl, _rotate_quantize_fake),
                            _rotate_quantize_impl)
int8_gemm_rescale_op = caller(define("int8_gemm_rescale", _int8_gemm_rescale_impl, _int8_gemm_rescale_fake),
                              _int8_gemm_rescale_impl)
rotate_quantize_down_op = caller(define("rotate_quantize_down", _rotate_quantize_down_impl,
                                        _rotate_quantize_down_fake), _rotate_quantize_down_impl)
int8_gemm_rescale_lora_op = caller(define("int8_gemm_rescale_lora", _int8_gemm_rescale_lora_impl,
                                          _int8_gemm_rescale_lora_fake), _int8_gemm_rescale_lora_impl)


# The fused kernel's largest group (H_1024 = H4 ⊗ H4 ⊗ H_64 stages); larger powers of 4 (4096, ...)
# are valid files and take the torch rotation, with the same codes.
MAX_FUSED_GROUP = 1024


def rotate_quantize(x2d: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row of x2d group-wise by H_g (None/0: no rotation) and quantize it per row."""
    if group_size and group_size > MAX_FUSED_GROUP:
        return rotate_quantize_rows(x2d, group_size)
    return rotate_quantize_op(x2d, int(group_size or 0))


def int8_gemm_rescale(qx: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, sw: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = (qx · codesᵀ) · sx · swᵀ (+ bias), computed in int32/fp32 and cast to out_dtype."""
    return int8_gemm_rescale_op(qx, sx, codes, sw, bias, out_dtype)


def linear_lora(x2d: torch.Tensor, codes: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                group_size: int, out_dtype: torch.dtype, down_t: torch.Tensor, up: torch.Tensor,
                zcol: torch.Tensor) -> torch.Tensor:
    """W8A8 with a LoRA fused in: the down-projection in the rotate+quant pass, the up-projection in the
    GEMM epilogue (no extra pass over x or y). down_t (K, RZ) in the rotation's dot dtype, up (N, R),
    zcol int32 (N,): where in z each output column's R LoRA columns start."""
    qx, sx, z = rotate_quantize_down_op(x2d, int(group_size), down_t)
    return int8_gemm_rescale_lora_op(qx, sx, codes, sw, bias, z, up, zcol, out_dtype)


__all__ = ["int8_gemm_rescale", "int8_gemm_rescale_op", "int8_gemm_rescale_lora_op", "linear_lora",
           "rotate_quantize", "rotate_quantize_down_op", "rotate_quantize_op"]
