"""A streaming safetensors writer: the header first (every name, dtype and shape is known before any
tensor is computed), then each tensor's bytes in header order, possibly in several pieces.

The file is written to a hidden temporary file in the target folder and renamed over the target
(os.replace) only when every byte is there and has been flushed and fsync-ed once: an interrupted
or failed run (exception, KeyboardInterrupt, ComfyUI's Cancel) leaves no output file behind.
Header layout as the safetensors library writes it: 8-byte little-endian length, JSON with
`__metadata__` first and contiguous data_offsets in order, padded with spaces to a multiple of 8.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass

import torch

from .errors import OutputPathError
from .safetensors_header import DTYPE_SIZES

TORCH_TO_ST = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def st_dtype(dtype) -> str:
    """safetensors dtype string for a torch dtype (or a string already in that form)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # safetensors dtype string: "BF16", "I8", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for s in self.shape:
            n *= s
        return n


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; bad keys: {bad[:3]}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"tensor name {spec.name!r} appears twice")
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def check_output_path(dst, *, sources=(), overwrite: bool = False) -> str:
    """Refuse an output that is an input, a folder, missing its folder, or exists without overwrite."""
    dst = os.path.abspath(os.fspath(dst))
    folder = os.path.dirname(dst)
    for src in sources:
        src = os.path.abspath(os.fspath(src))
        same = src == dst or (os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst))
        if same:
            raise OutputPathError("the output file is the input file", path=dst,
                                  hint="choose another output name; the input is never modified")
    if os.path.isdir(dst):
        raise OutputPathError("the output path is a folder", path=dst, hint="give a file name ending in .safetensors")
    if not dst.endswith(".safetensors"):
        raise OutputPathError("the output name must end in .safetensors", path=dst,
                              hint="ComfyUI lists only files with a model extension")
    if not os.path.isdir(folder):
        raise OutputPathError("the output folder does not exist", path=dst, hint="create it first")
    if os.path.exists(dst) and not overwrite:
        raise OutputPathError("the output file exists already", path=dst,
                              hint="choose another name, or allow overwriting")
    return dst


class SafetensorsWriter:
    """Write tensors in the order of `specs`; commit on a clean exit, remove the temp file otherwise.

        with SafetensorsWriter(dst, specs, metadata) as w:
            for spec in specs:
                w.write(spec.name, tensor_or_bytes)      # or several pieces of one tensor in a row

    With `background=True` (the default) the bytes are written by a thread while the caller goes on
    computing (at most `max_pending` bytes wait in memory); a write error surfaces at the next
    write() or at commit. Dirty pages are handed to the kernel's writeback as the file grows, so the
    single fsync before the rename has little left to flush.
    """

    def __init__(self, path, specs: list[TensorSpec], metadata: dict[str, str] | None = None, *,
                 overwrite: bool = False, sources=(), background: bool = True, max_pending: int = 64 << 20):
        self.path = check_output_path(path, sources=sources, overwrite=overwrite)
        self.specs = list(specs)
        self._header = build_header(self.specs, metadata)
        self.total_bytes = len(self._header) + sum(s.nbytes for s in self.specs)
        self._index = 0          # spec being written
        self._left = self.specs[0].nbytes if self.specs else 0
        self._written = 0        # bytes the OS accepted
        self._kicked = 0         # bytes handed to background writeback so far
        self._fd: int | None = None
        self.tmp_path: str | None = None
        self._background, self._max_pending = background, max_pending
        self._queue: deque = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "SafetensorsWriter":
        folder = os.path.dirname(self.path)
        free = shutil.disk_usage(folder).free
        if free < self.total_bytes:
            raise OutputPathError(
                f"not enough disk space: the output needs {human_bytes(self.total_bytes)}, "
                f"{human_bytes(free)} are free in {folder}", path=self.path,
                hint="free some space or write to another disk")
        self._fd, self.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".partial",
                                                   dir=folder)
        try:
            if self._background:
                self._thread = threading.Thread(target=self._drain, name="int8-convrot-writer", daemon=True)
                self._thread.start()
            self._submit(memoryview(self._header))
            self._skip_empty()
        except BaseException:
            self.abort()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        if self._index < len(self.specs):
            raise RuntimeError(f"{self.path}: tensor {self.specs[self._index].name!r} and "
                               f"{len(self.specs) - self._index - 1} more were never written")
        self._stop_thread()
        self._check_error()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._raise_disk_error(exc)
        os.close(self._fd)
        self._fd = None
        os.chmod(self.tmp_path, 0o644 & ~_UMASK)
        os.replace(self.tmp_path, self.path)
        self.tmp_path = None
        try:  # make the rename durable; not every platform can open a folder
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        """Stop writing and remove the temp file (safe to call twice)."""
        with self._cond:
            self._queue.clear()
            self._pending = 0
        self._stop_thread()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
            self.tmp_path = None

    # -- writing -----------------------------------------------------------------------------
    @property
    def current(self) -> TensorSpec | None:
        return self.specs[self._index] if self._index < len(self.specs) else None

    def write(self, name: str, data) -> None:
        """Append `data` (a tensor, or bytes-like) to tensor `name`, which must be the next one due.
        The data must not be modified afterwards (it may still be waiting to be written)."""
        spec = self.current
        if spec is None or spec.name != name:
            due = spec.name if spec else "nothing (all tensors written)"
            raise RuntimeError(f"{self.path}: wrote {name!r} but {due!r} is due next")
        if isinstance(data, torch.Tensor):
            if st_dtype(data.dtype) != spec.dtype:
                raise RuntimeError(f"{name}: dtype {data.dtype} does not match the header's {spec.dtype}")
            mv = tensor_bytes(data)
        else:
            mv = memoryview(data).cast("B")
        if mv.nbytes > self._left:
            raise RuntimeError(f"{name}: {mv.nbytes} bytes given but only {self._left} left of {spec.nbytes}")
        if mv.nbytes:
            self._submit(mv)
        self._left -= mv.nbytes
        if self._left == 0:
            self._index += 1
            self._left = self.current.nbytes if self.current else 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self.current is not None and self._left == 0:
            self._index += 1
            self._left = self.current.nbytes if self.current else 0

    def _submit(self, mv: memoryview) -> None:
        self._check_error()
        if self._thread is None:
            self._write_out(mv)
            return
        with self._cond:
            while self._pending and self._pending + mv.nbytes > self._max_pending and self._error is None:
                self._cond.wait()
            self._queue.append(mv)
            self._pending += mv.nbytes
            self._cond.notify_all()
        self._check_error()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                mv = self._queue[0]
            try:
                if self._error is None:
                    self._write_out(mv)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            with self._cond:
                if self._queue and self._queue[0] is mv:
                    self._queue.popleft()
                    self._pending -= mv.nbytes
                self._cond.notify_all()

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._thread = None

    def _check_error(self) -> None:
        if self._error is not None:   # kept: every later call fails the same way
            raise self._error

    def _write_out(self, mv: memoryview) -> None:
        try:
            self._raw_write(mv)
            self._written += mv.nbytes
            if _START_WRITEBACK is not None and self._written - self._kicked >= WRITEBACK_EVERY:
                _START_WRITEBACK(self._fd, self._kicked, self._written - self._kicked)
                self._kicked = self._written
        except OSError as exc:
            self._raise_disk_error(exc)

    def _raw_write(self, mv: memoryview) -> None:
        """The one place bytes reach the OS (tests replace it to simulate a full disk)."""
        done = 0
        while done < mv.nbytes:
            done += os.write(self._fd, mv[done:])

    def _raise_disk_error(self, exc: OSError):
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            free = shutil.disk_usage(os.path.dirname(self.path)).free
            raise OutputPathError(
                f"the disk is full: the output needs {human_bytes(self.total_bytes)} and ran out of space after "
                f"{human_bytes(self._written)} ({human_bytes(free)} free now); the partial file was removed",
                path=self.path, hint=f"free at least {human_bytes(self.total_bytes)} or write to another disk") from exc
        raise OutputPathError(f"cannot write the output ({exc.strerror or exc})", path=self.path) from exc


WRITEBACK_EVERY = 64 << 20


def _sync_file_range():
    """Linux's sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): start writing dirty pages back
    without waiting, so the one fsync at the end has little left to do. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_START_WRITEBACK = _sync_file_range()


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import: os.umask can only be read by setting it
    os.umask(mask)
    return mask


_UMASK = _read_umask()
