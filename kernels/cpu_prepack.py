"""A layer's prepacked CPU weight (`PrepackCache`) and the CPU W8A8 GEMM as a torch custom op.

The packed weight (fbgemm params, a oneDNN tensor, a sparse residual) is nothing torch.compile can hold,
and checking that it still matches the codes reads storage pointers and version counters, which dynamo
cannot trace: both stay inside the op `int8_convrot::cpu_int8_gemm`. The layer names its cache by an
integer handle (a constant in the traced graph); the op finds the cache by that handle, so an eager call
and a compiled one share the same pack, and a cache that is gone just means packing for this one call.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from .cpu_int8_gemm import int8_gemm_rowscaled, pack_int8_weight
from .custom_ops import caller, define

_HANDLES = itertools.count(1)
_LIVE: "weakref.WeakValueDictionary[int, PrepackCache]" = weakref.WeakValueDictionary()
NO_CACHE = 0


def row_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    """float32 (n, 1) per-row scales from per-row or per-tensor ones."""
    return scale.float().reshape(-1, 1).expand(n, 1) if scale.numel() == 1 else scale.float().reshape(n, 1)


class PrepackCache:
    """The CPU backend's packed copy of a weight, rebuilt when the codes/scales change or move.

    It keys on storage pointer, version counter and device, not on object identity, because
    `Module.to()` swaps `.data` under the same Parameter. It holds the storages it packed, so while the
    pack lives no other tensor can be allocated at the addresses its key names: same address then means
    same storage, and the version counter says whether that storage was written since (ComfyUI's
    inference-mode tensors have none; nothing in ComfyUI writes int8 codes in place: see nodes/ops.py)."""

    def __init__(self):
        self._key = None
        self._packed = None
        self._held = None      # the packed codes' and scales' storages (see above)
        self.handle = next(_HANDLES)
        _LIVE[self.handle] = self

    # A copied layer (copy.deepcopy, pickle) gets a cache of its own: a shared handle would make two layers
    # repack each other's weights on every call.
    def __reduce__(self):
        return PrepackCache, ()

    @staticmethod
    def _version(t: torch.Tensor) -> int:
        return -1 if t.is_inference() else t._version

    @classmethod
    def _codes_key(cls, codes: torch.Tensor):
        return (codes.device, codes.dtype, codes.data_ptr(), tuple(codes.shape), codes.stride(), cls._version(codes))

    @classmethod
    def _key_of(cls, codes: torch.Tensor, scale: torch.Tensor):
        return cls._codes_key(codes) + (scale.device, scale.data_ptr(), tuple(scale.shape), cls._version(scale))

    def get(self, codes: torch.Tensor, scale: torch.Tensor):
        """The pack of these codes and (per-row or per-tensor) scales, built on first use; None off the CPU."""
        if codes.device.type != "cpu":
            return None
        key = self._key_of(codes, scale)
        if key != self._key:
            self.clear()
            self._packed = pack_int8_weight(codes, row_scales(scale, codes.shape[0]))
            self._key = key
            self._held = (codes.untyped_storage(), scale.untyped_storage())
        return self._packed

    def packed_from(self, codes) -> bool:
        """Whether `codes` is the very tensor this pack was built from, unwritten since: same storage,
        view and version. Cheap (no pass over the data), so a weight re-assigned by ComfyUI's unpatch
        keeps its pack."""
        if self._key is None or not isinstance(codes, torch.Tensor):
            return False
        return self._codes_key(codes) == self._key[:6]

    def clear(self) -> None:
        self._key = self._packed = self._held = None

    @property
    def is_packed(self) -> bool:
        return self._packed is not None


def _cpu_int8_gemm_impl(qx: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype, cache_handle: int) -> torch.Tensor:
    cache = _LIVE.get(cache_handle)
    packed = cache.get(codes, scale) if cache is not None else \
        pack_int8_weight(codes, row_scales(scale, codes.shape[0]))
    return int8_gemm_rowscaled(qx, sx, packed, bias, out_dtype)


def _cpu_int8_gemm_fake(qx, sx, codes, scale, bias, out_dtype, cache_handle):
    return qx.new_empty((qx.shape[0], codes.shape[0]), dtype=out_dtype)


cpu_int8_gemm_op = caller(define("cpu_int8_gemm", _cpu_int8_gemm_impl, _cpu_int8_gemm_fake), _cpu_int8_gemm_impl)


def cpu_int8_gemm(qx: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, cache: PrepackCache | None = None):
    """y = (qx · codesᵀ) · sx · scaleᵀ (+ bias) on the CPU GEMM, with the weight packed once per `cache`
    (None: packed for this call)."""
    return cpu_int8_gemm_op(qx, sx, codes, scale, bias, out_dtype, NO_CACHE if cache is None else cache.handle)
