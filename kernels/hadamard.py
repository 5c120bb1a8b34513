"""Regular (ConvRot) Hadamard matrices: H_g = (H4 ⊗ H4 ⊗ …) / sqrt(g) for g = 4**k.

H4 is the *regular* Hadamard (every row and column sums to 2), not Sylvester's: a Sylvester
matrix has an all-ones column that concentrates row outliers instead of spreading them.
H_g is orthonormal and symmetric, hence involutory: the same matrix rotates and un-rotates.
Every entry is ±2**-k, so the matrix is exact in every float dtype.
"""
from __future__ import annotations

import torch

# Every power of 4 is a valid group (as in comfy-kitchen, which builds H_g for any of them); these are
# the ones offered as choices. Z-Image's files use 64, ComfyUI's own default is 256.
VALID_GROUP_SIZES = (4, 16, 64, 256, 1024, 4096)

H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))

_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def is_power_of_4(g: int) -> bool:
    return isinstance(g, int) and g >= 4 and g & (g - 1) == 0 and (g.bit_length() - 1) % 2 == 0


def check_group_size(group_size, what: str = "group size") -> int:
    """Return `group_size` as an int, or raise a ValueError that lists the valid sizes."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not is_power_of_4(group_size):
        hint = " (a power of 2 but not of 4: a Sylvester Hadamard is a different matrix)" if (
            isinstance(group_size, int) and group_size > 0 and group_size & (group_size - 1) == 0
            and not is_power_of_4(group_size)) else ""
        raise ValueError(
            f"invalid ConvRot {what} {group_size!r}{hint}; valid sizes are powers of 4: "
            f"{', '.join(map(str, VALID_GROUP_SIZES))}, ... (64 for Z-Image files)")
    return group_size


def hadamard(group_size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized regular Hadamard matrix of size `group_size`, cached per (g, device, dtype)."""
    g = check_group_size(group_size)
    device = torch.device(device if device is not None else "cpu")
    key = (g, str(device), dtype)
    h = _CACHE.get(key)
    if h is None:
        base = torch.tensor(H4, dtype=torch.float64)
        h = base
        while h.shape[0] < g:
            h = torch.kron(h, base)
        h = (h / g ** 0.5).to(device=device, dtype=dtype)  # exact: entries are ±2**-k
        _CACHE[key] = h
    return h
