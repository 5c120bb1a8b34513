"""Input checkpoints, read one tensor at a time with plain positioned reads (no mmap: mapped pages
stay in the process's resident set, so mmap-reading a 12 GB model shows 12 GB RSS).

Handled here, so the converter sees plain float weights:
- bf16 / fp16 / fp32 / fp8 (e4m3, e5m2) tensors;
- ComfyUI "scaled fp8" files (`P.scale_weight` beside an fp8 `P.weight`, a `scaled_fp8` marker):
  the scale is applied when the weight is read, and the scales, `scale_input`s and the marker are
  dropped from the output (a layer kept in high precision is written dequantized, in bf16);
- comfy_quant FP8 files (`float8_e4m3fn`, `float8_e4m3fn_rowwise` with `P.weight_scale`): same;
- ComfyUI full checkpoints: only tensors under `model.diffusion_model.` are converted (the policy
  sees their names without the prefix); VAE and text-encoder tensors pass through unchanged.
Refused with a clear message: files that are already INT8 (ConvRot or not) or in another
quantized format, damaged files, unknown `_quantization_metadata` versions, missing scales.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import torch

from .errors import FileFormatError
from .format import INT8_FORMAT, METADATA_KEY, QUANT_SUFFIX, SCALE_SUFFIX, SUPPORTED_FORMAT_VERSIONS, convrot_group_size
from .safetensors_header import Header, TensorEntry, read_header
from .safetensors_writer import ST_TO_TORCH
from .verdict import NATIVE_FORMATS, native_format_text

DM_PREFIX = "model.diffusion_model."
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_COMFY_FORMATS = ("float8_e4m3fn", "float8_e4m3fn_rowwise", "float8_e5m2")
LEGACY_SCALE = ".scale_weight"
DROPPED_SUFFIXES = (".scale_weight", ".scale_input", ".input_scale", ".weight_scale", QUANT_SUFFIX)
READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class SourceTensor:
    name: str                      # name in the input (and output) file
    model_name: str | None         # name the layer policy sees (prefix stripped); None: outside the model part
    entry: TensorEntry
    scale: TensorEntry | None = None   # fp8 weight scale applied on read

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape


def _group(cfg: dict):
    return convrot_group_size(cfg)


def _refuse_quantized(path, name: str, fmt: str, group_size=None):
    if fmt == INT8_FORMAT:
        what = f"INT8 ConvRot (group size {group_size})" if group_size else "INT8"
        raise FileFormatError(f"the file is already {what}: layer {name} is quantized", path=path,
                              hint="it needs no conversion; load it with the INT8 ConvRot loaders. To change the "
                                   "group size or preset, convert the bf16/fp16 original")
    native = NATIVE_FORMATS.get(fmt)
    if native is not None:   # a format ComfyUI reads natively: say what it is and who loads it
        raise FileFormatError(f"the file is already quantized ({fmt!r}: layer {name}): {native_format_text(fmt)}",
                              path=path, hint=f"it needs no conversion: load it with {native.reader}; for INT8 "
                                              "ConvRot, convert the bf16/fp16 original checkpoint")
    raise FileFormatError(f"the file is already quantized ({fmt!r}: layer {name})", path=path,
                          hint="convert from the bf16/fp16 original checkpoint")


class Source:
    """An input checkpoint: its header, what each tensor is, and positioned reads of its bytes."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.header: Header = read_header(self.path)
        tensors = self.header.tensors
        self._fd = os.open(self.path, os.O_RDONLY)
        self._local = threading.local()
        try:
            self._check_metadata()
            self.prefix = DM_PREFIX if any(k.startswith(DM_PREFIX) for k in tensors) else ""
            comfy_fp8 = self._comfy_quant_layers()
            legacy = any(k.endswith(LEGACY_SCALE) or k.split(".")[-1] == "scaled_fp8" for k in tensors)
            self.kind = ("scaled fp8" if legacy else "comfy fp8" if comfy_fp8 else
                         "checkpoint" if self.prefix else "plain")
            self.items: list[SourceTensor] = []
            self.dropped: list[str] = []
            for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.name)):
                self._add(entry, legacy, comfy_fp8)
            if self.prefix and not any(t.model_name for t in self.items):
                raise FileFormatError("the checkpoint has no diffusion-model tensors", path=self.path)
        except BaseException:
            self.close()
            raise

    # -- classification ----------------------------------------------------------------------
    def _in_model(self, name: str) -> str | None:
        if not self.prefix:
            return name
        return name[len(self.prefix):] if name.startswith(self.prefix) else None

    def _check_metadata(self):
        raw = self.header.metadata.get(METADATA_KEY)
        if raw is None:
            return
        try:
            obj = json.loads(raw)
            version = str(obj.get("format_version", ""))
            layers = obj.get("layers", {}) or {}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise FileFormatError(f"{METADATA_KEY} in the header is not valid JSON ({exc})", path=self.path,
                                  hint="the file was written by an incompatible tool") from None
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise FileFormatError(f"unknown INT8 ConvRot format_version {version!r} in {METADATA_KEY} (this pack "
                                  f"reads {', '.join(SUPPORTED_FORMAT_VERSIONS)})", path=self.path,
                                  hint="update ComfyUI-INT8-ConvRot, or convert the bf16/fp16 original")
        for name, cfg in layers.items():
            cfg = cfg or {}
            fmt = cfg.get("format", "?")
            if fmt not in FP8_COMFY_FORMATS:
                _refuse_quantized(self.path, name, fmt, _group(cfg))

    def _comfy_quant_layers(self) -> dict[str, str]:
        """comfy_quant layers (prefix kept) -> format; refuses every format but FP8."""
        out = {}
        for name, entry in self.header.tensors.items():
            if not name.endswith(QUANT_SUFFIX):
                continue
            layer = name[: -len(QUANT_SUFFIX)]
            try:
                cfg = json.loads(bytes(self.read_raw(entry).tolist()).decode("utf-8"))
                fmt = cfg.get("format", "?")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                raise FileFormatError("comfy_quant is not valid JSON", path=self.path, tensor=name,
                                      hint="the file is damaged or was written by an incompatible tool") from None
            if fmt not in FP8_COMFY_FORMATS:
                _refuse_quantized(self.path, layer, fmt, _group(cfg))
            out[layer] = fmt
        for name, entry in self.header.tensors.items():
            if name.endswith(".weight") and entry.dtype == "I8":
                _refuse_quantized(self.path, name[: -len(".weight")], INT8_FORMAT)
        return out

    def _add(self, entry: TensorEntry, legacy: bool, comfy_fp8: dict[str, str]):
        name, tensors = entry.name, self.header.tensors
        model_name = self._in_model(name)
        if model_name is None:
            self.items.append(SourceTensor(name, None, entry))
            return
        if (legacy and (name.endswith((".scale_weight", ".scale_input")) or model_name == "scaled_fp8")) or \
                (comfy_fp8 and name.endswith(DROPPED_SUFFIXES)):
            self.dropped.append(name)
            return
        scale = None
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and legacy and (base + LEGACY_SCALE) in tensors:
            scale = tensors[base + LEGACY_SCALE]
        elif base is not None and base in comfy_fp8:
            scale = tensors.get(base + SCALE_SUFFIX)
            if scale is None:
                raise FileFormatError(f"FP8 layer ({comfy_fp8[base]}) has no {base + SCALE_SUFFIX}", path=self.path,
                                      tensor=name, hint="the file is incomplete; re-download or re-export it")
        if scale is None and entry.dtype in FP8_DTYPES and legacy and len(entry.shape) >= 2:
            raise FileFormatError(f"scaled-fp8 weight has no {LEGACY_SCALE} (missing scale)", path=self.path,
                                  tensor=name, hint="the file is incomplete or not a ComfyUI scaled-fp8 file; "
                                                    "re-export it")
        if scale is not None and entry.dtype not in FP8_DTYPES + ("BF16", "F16", "F32"):
            raise FileFormatError(f"a scaled weight must be fp8, not {entry.dtype}", path=self.path, tensor=name)
        self.items.append(SourceTensor(name, model_name, entry, scale))

    # -- reading -----------------------------------------------------------------------------
    def read_raw(self, entry: TensorEntry, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Bytes [start, start+length) of a tensor's data as a fresh uint8 tensor (positioned reads)."""
        length = entry.nbytes - start if length is None else length
        buf = torch.empty(length, dtype=torch.uint8)
        self._pread(buf, entry.begin + start, entry.name)
        return buf

    def _pread(self, buf: torch.Tensor, pos: int, name: str) -> None:
        mv, length, done = memoryview(buf.numpy()), buf.numel(), 0
        while done < length:
            n = os.preadv(self._fd, [mv[done: done + min(length - done, 1 << 30)]], pos + done)
            if n <= 0:
                raise FileFormatError(f"file ended while reading (byte {pos + done})", path=self.path,
                                      tensor=name, hint="the file is truncated or changed during conversion")
            done += n

    def iter_raw(self, entry: TensorEntry, chunk: int = READ_CHUNK):
        """The tensor's bytes as memoryviews of at most `chunk` bytes (for copying unchanged)."""
        for start in range(0, entry.nbytes, chunk):
            yield memoryview(self.read_raw(entry, start, min(chunk, entry.nbytes - start)).numpy())

    def read(self, item: SourceTensor) -> torch.Tensor:
        """The tensor's values; an fp8 weight with a scale comes back dequantized in float32."""
        dtype = ST_TO_TORCH.get(item.dtype)
        if dtype is None:
            raise FileFormatError(f"dtype {item.dtype} cannot be converted", path=self.path, tensor=item.name)
        t = self.read_raw(item.entry).view(dtype).reshape(item.shape)
        if item.scale is None:
            return t
        s = self.read_raw(item.scale).view(ST_TO_TORCH[item.scale.dtype]).reshape(item.scale.shape).float()
        if s.numel() not in (1, t.shape[0]):
            raise FileFormatError(f"scale shape {tuple(s.shape)} does not fit weight {tuple(t.shape)}",
                                  path=self.path, tensor=item.scale.name)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (t.dim() - 1)))
        return t.float().mul_(s)

    def row_reader(self, item: SourceTensor):
        """(start, stop) -> rows of a 2-D weight, read on demand (thread-safe: positioned reads into a
        per-thread buffer); an fp8 weight with a scale comes back dequantized in float32."""
        dtype = ST_TO_TORCH.get(item.dtype)
        if dtype is None or len(item.shape) != 2:
            raise FileFormatError(f"dtype {item.dtype} {list(item.shape)} cannot be converted", path=self.path,
                                  tensor=item.name)
        in_f = item.shape[1]
        row_bytes = in_f * dtype.itemsize
        scale = None
        if item.scale is not None:
            scale = self.read_raw(item.scale).view(ST_TO_TORCH[item.scale.dtype]).float()
            if scale.numel() not in (1, item.shape[0]):
                raise FileFormatError(f"scale shape {list(item.scale.shape)} does not fit weight {list(item.shape)}",
                                      path=self.path, tensor=item.scale.name)
            scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
        local = self._local

        def read(start: int, stop: int) -> torch.Tensor:
            n = (stop - start) * row_bytes
            buf = getattr(local, "buf", None)
            if buf is None or buf.numel() < n:
                buf = local.buf = torch.empty(n, dtype=torch.uint8)
            self._pread(buf[:n], item.entry.begin + start * row_bytes, item.name)
            rows = buf[:n].view(dtype).view(stop - start, in_f)
            if scale is None:
                return rows
            return rows.float().mul_(scale if scale.dim() == 0 else scale[start:stop])
        return read

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_source(path) -> Source:
    return Source(path)
