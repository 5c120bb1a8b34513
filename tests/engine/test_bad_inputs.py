"""Every bad input ends in one clear error naming the file, the tensor and what to do, and no failed
or interrupted run leaves an output (or temp) file behind or touches the input."""
import errno
import json

import pytest
import torch

from comfyui_int8_convrot.engine import convert as convert_mod
from comfyui_int8_convrot.engine import safetensors_writer as sw
from comfyui_int8_convrot.engine.convert import convert_file
from comfyui_int8_convrot.engine.errors import FileFormatError, Int8ConvRotError, OutputPathError
from comfyui_int8_convrot.engine.format import METADATA_KEY
from convert_helpers import leftovers, sha, write, zimage_sd


@pytest.fixture
def zfile(tmp_path):
    return write(tmp_path / "z.safetensors", zimage_sd())


def convert_fails(src, dst, exc_type, pattern, **kw):
    with pytest.raises(exc_type, match=pattern) as info:
        convert_file(src, dst, **kw)
    assert not dst.exists() and not leftovers(dst.parent)
    return str(info.value)


def test_truncated_file(zfile, tmp_path):
    raw = zfile.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    msg = convert_fails(bad, tmp_path / "out.safetensors", FileFormatError, "truncated")
    assert str(bad) in msg and "re-download" in msg


@pytest.mark.parametrize("content", [b"", b"hello, world: not a model", b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2]   "])
def test_not_a_safetensors_file(tmp_path, content):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    msg = convert_fails(bad, tmp_path / "out.safetensors", FileFormatError, "safetensors file")
    assert str(bad) in msg


def test_missing_input(tmp_path):
    convert_fails(tmp_path / "nope.safetensors", tmp_path / "out.safetensors", FileFormatError, "file not found")


@pytest.mark.parametrize("g", [32, 100, 0])
def test_group_size_not_a_power_of_4(zfile, tmp_path, g):
    convert_fails(zfile, tmp_path / "out.safetensors", Int8ConvRotError, "powers of 4", group_size=g)


def test_unknown_format_version(tmp_path):
    path = write(tmp_path / "v2.safetensors", zimage_sd(),
                 {METADATA_KEY: json.dumps({"format_version": "2.0", "layers": {}})})
    msg = convert_fails(path, tmp_path / "out.safetensors", FileFormatError, "unknown INT8 ConvRot format_version '2.0'")
    assert "update ComfyUI-INT8-ConvRot" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    sd = zimage_sd()
    sd["layers.1.feed_forward.w1.weight"][5, 17] = bad
    path = write(tmp_path / "nan.safetensors", sd)
    msg = convert_fails(path, tmp_path / "out.safetensors", Int8ConvRotError, "1 NaN/Inf value")
    assert str(path) in msg and "tensor 'layers.1.feed_forward.w1.weight'" in msg and "--exclude" in msg


def test_missing_scale(tmp_path):
    sd = {"layers.0.attention.qkv.weight": torch.randn(768, 256).to(torch.float8_e4m3fn),
          "layers.0.attention.out.weight": torch.randn(256, 256).to(torch.float8_e4m3fn),
          "layers.0.attention.out.scale_weight": torch.tensor([0.01]),
          "scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn)}
    path = write(tmp_path / "fp8.safetensors", sd)
    msg = convert_fails(path, tmp_path / "out.safetensors", FileFormatError, "missing scale")
    assert "tensor 'layers.0.attention.qkv.weight'" in msg and str(path) in msg


def test_comfy_fp8_layer_without_weight_scale(tmp_path):
    sd = {"blk.fc.weight": torch.randn(64, 64).to(torch.float8_e4m3fn),
          "blk.fc.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)}
    path = write(tmp_path / "fp8.safetensors", sd)
    convert_fails(path, tmp_path / "out.safetensors", FileFormatError, "has no blk.fc.weight_scale")


def test_already_int8_convrot_is_refused(zfile, tmp_path):
    convert_file(zfile, tmp_path / "int8.safetensors")
    msg = convert_fails(tmp_path / "int8.safetensors", tmp_path / "again.safetensors", FileFormatError,
                        r"already INT8 ConvRot \(group size 64\)")
    assert "convert the bf16/fp16 original" in msg
    sd = {"blk.fc.weight": torch.zeros(4, 64, dtype=torch.uint8),                # another quantized format
          "blk.fc.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}
    convert_fails(write(tmp_path / "fp4.safetensors", sd), tmp_path / "o.safetensors", FileFormatError,
                  "already quantized \\('nvfp4'")
    plain_int8 = write(tmp_path / "i8.safetensors", {"blk.fc.weight": torch.zeros(4, 64, dtype=torch.int8)})
    convert_fails(plain_int8, tmp_path / "o.safetensors", FileFormatError, "already INT8")


def test_output_paths(zfile, tmp_path):
    before = sha(zfile)
    with pytest.raises(OutputPathError, match="the output file is the input file"):
        convert_file(zfile, zfile, overwrite=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(zfile)
    with pytest.raises(OutputPathError, match="the output file is the input file"):
        convert_file(zfile, link, overwrite=True)
    with pytest.raises(OutputPathError, match="folder does not exist"):
        convert_file(zfile, tmp_path / "nowhere" / "out.safetensors")
    with pytest.raises(OutputPathError, match=r"must end in \.safetensors"):
        convert_file(zfile, tmp_path / "out.ckpt")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="exists already"):
        convert_file(zfile, existing)
    assert existing.read_bytes() == b"keep me" and sha(zfile) == before
    convert_file(zfile, existing, overwrite=True)
    assert existing.stat().st_size > 1000


def test_nothing_to_quantize(tmp_path):
    path = write(tmp_path / "norms.safetensors", {"a.norm.weight": torch.ones(64), "b.bias": torch.zeros(64)})
    convert_fails(path, tmp_path / "out.safetensors", Int8ConvRotError, "no layer would be quantized")


def test_full_disk_removes_the_temp_file(zfile, tmp_path, monkeypatch):
    real = sw.SafetensorsWriter._raw_write

    def write_then_fail(self, mv):
        if self._written > 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, mv)
    monkeypatch.setattr(sw.SafetensorsWriter, "_raw_write", write_then_fail)
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"previous version")
    msg = str(pytest.raises(OutputPathError, convert_file, zfile, existing, overwrite=True).value)
    assert "the disk is full" in msg and "needs 7.6" in msg and "free at least" in msg
    assert existing.read_bytes() == b"previous version" and not leftovers(tmp_path)


def test_not_enough_space_up_front(zfile, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    convert_fails(zfile, tmp_path / "out.safetensors", OutputPathError, r"not enough disk space: .*needs 7\.6.* MB")


@pytest.mark.parametrize("exc", [RuntimeError("simulated crash"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_no_file(zfile, tmp_path, monkeypatch, exc):
    real, calls = convert_mod.quantize_rows, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(*a, **kw)
    monkeypatch.setattr(convert_mod, "quantize_rows", crash_on_third)
    before = sha(zfile)
    with pytest.raises(type(exc)):
        convert_file(zfile, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and not leftovers(tmp_path) and sha(zfile) == before
    assert torch.get_num_threads() >= 1   # threads restored by compute_threads


def test_interrupt_from_progress_callback(zfile, tmp_path):
    """ComfyUI's Cancel raises from the progress callback: same clean-up."""
    class Interrupted(Exception):
        pass

    def progress(done, total, name):
        if done > total // 2:
            raise Interrupted()
    with pytest.raises(Interrupted):
        convert_file(zfile, tmp_path / "out.safetensors", progress=progress)
    assert not list(tmp_path.glob("out*")) and not leftovers(tmp_path)
