"""Which INT8 GEMM tile configs the autotuner may try on a given GPU (no Triton launch needed to decide).

Every config kept here for a target is compiled for sm_80/86/89/90 by bench/aot_check.py (CI, no GPU):
it must use integer MMA, fit the target's shared memory and not spill registers. Compiled with Triton 3.8:
- sm_8x (mma.sync m16n8k32, 64K registers per SM, ≤ 255 per thread): a 128×128 int32 accumulator is 128
  registers per thread with 4 warps, and every 4-warp 128×128 config spilled 260–900 B per thread in the
  K loop; with 8 warps (64 accumulator registers) 128×128 uses ~244 registers and no spills. 128×256 and
  256×128 spill at 8 warps (640–990 B) and at 16 warps (ptxas caps them at 128 registers: 1 KB+), so the
  biggest sm_8x tile is 128×128, pipelined 3–4 deep with BLOCK_K 128 (64–96 KB) or 64 (48 KB).
- sm_90 (wgmma m64n128k32, accumulators in registers of a whole warpgroup): no config spills (187–222
  registers for 128×256 / 256×128 with 8 warps), and 227 KB of shared memory take 3–4 stages of 128-deep
  tiles. BLOCK_M ≤ 32 cannot use wgmma (64-row minimum) and compiles to mma.sync: fine for M ≤ 64.
- Small M (≤ 16, weight-streaming GEMV) shares one list: BLOCK_M = 16, narrow BLOCK_N for many CTAs.
Configs whose shared memory exceeds the device's opt-in limit are dropped before the autotuner sees
them, so it never compiles a config that cannot launch (consumer Ampere/Ada have 99 KB, A100 163 KB).
"""
from __future__ import annotations

import functools

import triton


def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


SM8X_LARGE = [
    _cfg(128, 128, 128, 4, 8),  # 96 KB: the compute-bound Z-Image shapes (M ≥ 4096)
    _cfg(128, 128, 128, 3, 8),  # 64 KB
    _cfg(128, 128, 64, 4, 8),   # 48 KB: shallower K step, more CTAs resident
    _cfg(128, 64, 128, 4, 4),   # 72 KB
    _cfg(64, 128, 128, 4, 4),   # 72 KB
    _cfg(64, 64, 128, 4, 4),    # 48 KB: medium M
    _cfg(32, 64, 256, 3, 4),    # 48 KB: M in 17..64
]
SM90_LARGE = [
    _cfg(128, 256, 128, 3, 8),  # 144 KB
    _cfg(256, 128, 128, 3, 8),  # 144 KB
    _cfg(128, 128, 128, 4, 4),  # 128 KB
    _cfg(128, 128, 64, 4, 4),   # 64 KB
    _cfg(128, 64, 128, 4, 4),   # 96 KB
    _cfg(64, 128, 128, 4, 4),   # 96 KB
    _cfg(64, 64, 128, 4, 4),    # 64 KB
    _cfg(32, 64, 256, 3, 4),    # 48 KB (mma.sync)
]
SMALL = [
    _cfg(16, 32, 256, 4, 4, 1),
    _cfg(16, 64, 256, 4, 4, 1),
    _cfg(16, 64, 128, 5, 4, 1),
    _cfg(16, 128, 128, 4, 4, 1),
]
INTERPRETER = [_cfg(16, 32, 32, 1, 4)]  # numpy runs every program: one small config keeps the tests fast
# Opt-in shared memory per block by capability, for devices whose properties do not report it.
SMEM_OPTIN = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}
SMEM_DEFAULT = 101376  # the smallest of the sm_80+ GPUs


def smem_bytes(cfg, capability: tuple[int, int]) -> int:
    """Shared memory a config needs, as Triton 3.8 allocates it (checked against the compiled kernels by
    bench/aot_check.py): the software pipeline keeps num_stages − 1 A+B tiles on sm_8x (num_stages with
    wgmma on sm_90), and the epilogue's layout change of the fp32 tile can reuse that memory."""
    kw = cfg.kwargs
    buffers = cfg.num_stages if capability[0] == 9 else max(1, cfg.num_stages - 1)
    return max((kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * buffers, kw["BLOCK_M"] * kw["BLOCK_N"] * 4)


def lora_fits(cfg, capability: tuple[int, int], rank: int) -> bool:
    """Whether a config keeps the fused LoRA epilogue (z·upᵀ at padded rank 16..128) free of spills. On sm_8x
    the BLOCK_M×R and R×BLOCK_N operands join the accumulator in registers (bench/aot_check.py, Triton 3.8):
    128×128 with 8 warps is clean at rank ≤ 64 and spills 240 B at 128; 128×64 and 64×128 with 4 warps
    spill 32–40 B at 64; 64×64 and narrower are clean at 128. sm_90 (wgmma): 128×256 / 256×128 (8 warps)
    spill 84–108 B at rank 64 and 128×128 (4 warps) 40–120 B; 128×64, 64×128 and smaller are clean at 128,
    except the mma.sync tiles (BLOCK_M < 64) with BLOCK_N·R > 64·64 (16×128 at 64, 32×64 at 128: 8–12 B).
    Triton 3.3 (sm_90): 128×64 (4 warps) spills 76/88 B at rank 128, so ranks above 64 keep BLOCK_M ≤ 64."""
    kw = cfg.kwargs
    tile = kw["BLOCK_M"] * kw["BLOCK_N"]
    if rank == 0:
        return True
    if capability[0] == 9:
        return (tile <= 128 * 64 and (kw["BLOCK_M"] >= 64 or kw["BLOCK_N"] * rank <= 64 * 64)
                and (rank <= 64 or kw["BLOCK_M"] <= 64))
    if tile <= 64 * 64:
        return True
    return rank <= 64 and tile <= 128 * 128 and cfg.num_warps >= 8


def configs_for(capability: tuple[int, int], smem_limit: int | None = None, lora_rank: int = 0):
    """(large-M configs, small-M configs) to autotune on a GPU of this capability and opt-in shared memory,
    for the GEMM with a fused LoRA of this padded rank (0: none).
    Hopper gets its wgmma table; Ampere, Ada and anything newer the mma.sync one (it compiles everywhere
    from sm_80; newer GPUs are not compile-checked here)."""
    limit = smem_limit or SMEM_OPTIN.get(tuple(capability), SMEM_DEFAULT)
    large = SM90_LARGE if capability[0] == 9 else SM8X_LARGE
    fit = [c for c in large if smem_bytes(c, capability) <= limit and lora_fits(c, capability, lora_rank)]
    small = [c for c in SMALL if smem_bytes(c, capability) <= limit and lora_fits(c, capability, lora_rank)]
    return fit or large[-1:], small or SMALL[:1]


@functools.lru_cache(maxsize=None)   # asked on every LoRA'd Linear call
def lora_keeps_best_tile(capability: tuple[int, int], smem_limit: int | None, rank: int) -> bool:
    """Whether the fused LoRA epilogue at this rank still gets the large-M list's first (largest) tile.
    Where it does not (sm_90 at any rank, sm_8x above 64) the GEMM would run on smaller tiles, which can
    cost more than adding the update after the GEMM: unmeasured, so those stay unfused."""
    best = configs_for(capability, smem_limit)[0][0]
    return best in configs_for(capability, smem_limit, rank)[0]


def device_smem_limit(device) -> int:
    """The device's opt-in shared memory per block (torch reports it), else the table above."""
    import torch
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return int(optin) or SMEM_OPTIN.get((props.major, props.minor), SMEM_DEFAULT)
