"""ConvRot INT8 kernels: Hadamard construction, group-wise rotation, per-row quantization and
INT8 linear (W8A16 and W8A8), on CPU in torch and on CUDA with Triton. No ComfyUI imports."""
from .backends import select_gemm_backend, triton_status, use_backend
from .embedding import embedding_lookup
from .hadamard import VALID_GROUP_SIZES, check_group_size, hadamard, is_power_of_4
from .linear import MODES, fuses_lora, int8_linear, lora_operand_dtype, prepack, resolve_mode
from .quantize import (NonFiniteError, check_finite, dequantize_weight, quantize_rowwise, quantize_tensorwise,
                       quantize_weight)
from .rotation import rotate, rotate_fwht, rotate_matmul

__all__ = [
    "VALID_GROUP_SIZES", "MODES", "NonFiniteError", "check_finite", "check_group_size", "dequantize_weight",
    "embedding_lookup", "fuses_lora", "lora_operand_dtype",
    "hadamard", "int8_linear", "is_power_of_4", "prepack", "quantize_rowwise", "quantize_tensorwise",
    "quantize_weight", "resolve_mode", "rotate", "rotate_fwht", "rotate_matmul", "select_gemm_backend",
    "triton_status", "use_backend",
]
