"""What the fused Triton LoRA takes (kernels/triton): the rotate+quant pass computes z = x·down_t up to 256
columns wide, the GEMM epilogue adds R ≤ 128 of them per output column, and row slices (q/k/v of a fused
qkv) each get their own z columns when aligned to LORA_SLICE_ALIGN, the widest BLOCK_N of any GEMM config
(the epilogue reads one z offset per output block). Constants only: linear.py, the engine and the Triton
modules all read them from here."""
LORA_Z_RANKS = (16, 32, 64, 128, 256)
LORA_UP_RANKS = (16, 32, 64, 128)
LORA_SLICE_ALIGN = 256
