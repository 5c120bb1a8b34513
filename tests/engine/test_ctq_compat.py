"""Bit-exact compatibility with the real convert-to-quant CLI (`ctq`, 1.3.4) on the same inputs.

ctq runs with the flags of the Z-Image INT8 ConvRot files in the wild:
    --int8 --scaling_mode row --simple --convrot --convrot-group-size 64 --comfy_quant --save-quant-metadata
plus `--zimage` for the Z-Image file, and `--exclude-layers "embed_tokens|lm_head"` (what our qwen3 preset
keeps) for the Qwen3 file; `--device cpu` so both sides use the same float32 GEMM.

The Qwen3 file is the real key layout in bf16: every tensor, dtype, shape, JSON field and metadata
entry must match. The Z-Image file is the real layout plus four extras, each pinning down one
behaviour, and the differences they produce are listed exactly (EXPECTED_ZIMAGE_DIFFERENCES):
- `layers.0.attention.out.bias`: a bias on a quantized layer. With these flags ctq still runs its
  "Residual Bias Calibration" (converters/learned_rounding.py, phase 4): it adds the mean output
  error of the quantized layer on *random* Gaussian inputs to the bias. With random inputs the mean
  error is noise, not a correction, so we keep the bias exactly (Z-Image's and Qwen3's quantized
  layers have no bias, so real files are unaffected).
- `layers.0.adapter.weight` (32×96: 96 is not divisible by 64): quantized without rotation by both,
  with ctq's TensorWiseINT8Layout formula: identical codes.
- `layers.1.attention.out.weight` in fp16: ctq records `orig_dtype` "torch.bfloat16" (its
  --output-dtype default) whatever the input; we record the source's "torch.float16". Codes identical.
- `x_embedder.weight` in fp16 (a kept layer): ctq casts unquantized 2-D weights to bf16; we keep
  every tensor we do not quantize in its own dtype.
Besides these, our header carries one extra key, `int8_convrot_converter` (provenance).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from comfyui_int8_convrot.engine.convert import PROVENANCE_KEY, convert_file
from comfyui_int8_convrot.engine.format import METADATA_KEY
from convert_helpers import layer_json, load, qwen3_sd, write, zimage_sd

pytestmark = pytest.mark.slow

SEED_FLAGS = ["--int8", "--scaling_mode", "row", "--simple", "--convrot", "--convrot-group-size", "64",
              "--comfy_quant", "--save-quant-metadata", "--device", "cpu"]
EXPECTED_ZIMAGE_DIFFERENCES = {
    ("layers.0.attention.out.bias", "values"),
    ("layers.1.attention.out.comfy_quant", "orig_dtype torch.bfloat16 vs torch.float16"),
    ("_quantization_metadata:layers.1.attention.out", "orig_dtype torch.bfloat16 vs torch.float16"),
    ("x_embedder.weight", "dtype torch.bfloat16 vs torch.float16"),
    ("__metadata__", f"extra key {PROVENANCE_KEY}"),
}


def zimage_with_extras() -> dict:
    sd = zimage_sd()
    gen = torch.Generator().manual_seed(7)
    sd["layers.0.attention.out.bias"] = (0.02 * torch.randn(256, generator=gen)).bfloat16()
    sd["layers.0.adapter.weight"] = (torch.randn(32, 96, generator=gen) / 10).bfloat16()
    sd["layers.1.attention.out.weight"] = sd["layers.1.attention.out.weight"].half()
    sd["x_embedder.weight"] = sd["x_embedder.weight"].half()
    return sd


def differences(ctq_path, ours_path) -> set:
    a, ma = load(ctq_path)
    b, mb = load(ours_path)
    diff = set()
    assert a.keys() == b.keys(), f"tensor names differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        if k.endswith(".comfy_quant"):
            ja, jb = layer_json(a[k]), layer_json(b[k])
            if ja != jb:
                assert {x: y for x, y in ja.items() if x != "orig_dtype"} == \
                       {x: y for x, y in jb.items() if x != "orig_dtype"}, f"{k}: {ja} vs {jb}"
                diff.add((k, f"orig_dtype {ja['orig_dtype']} vs {jb['orig_dtype']}"))
            else:
                assert torch.equal(a[k], b[k]), f"{k}: same JSON, different bytes"
        elif a[k].shape != b[k].shape:
            diff.add((k, f"shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"))
        elif a[k].dtype != b[k].dtype:
            diff.add((k, f"dtype {a[k].dtype} vs {b[k].dtype}"))
            assert torch.equal(a[k], b[k].to(a[k].dtype)), f"{k}: values differ beyond the cast"
        elif not torch.equal(a[k], b[k]):
            diff.add((k, "values"))
    la, lb = json.loads(ma.pop(METADATA_KEY))["layers"], json.loads(mb.pop(METADATA_KEY))["layers"]
    assert la.keys() == lb.keys()
    for layer in la:
        if la[layer] != lb[layer]:
            diff.add((f"{METADATA_KEY}:{layer}", f"orig_dtype {la[layer]['orig_dtype']} vs {lb[layer]['orig_dtype']}"))
    for key in ma.keys() ^ mb.keys():
        diff.add(("__metadata__", f"extra key {key}" if key in mb else f"missing key {key}"))
    for key in ma.keys() & mb.keys():
        if ma[key] != mb[key]:
            diff.add(("__metadata__", f"value of {key}"))
    return diff


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    ctq = shutil.which("ctq", path=os.path.dirname(sys.executable)) or shutil.which("ctq")
    if ctq is None:
        pytest.fail("convert-to-quant (ctq) is a test dependency: pip install -e .[test]")
    d = tmp_path_factory.mktemp("ctq")
    cases = {
        "zimage": (zimage_with_extras(), ["--zimage"], "zimage", {"modelspec.title": "tiny z"}),
        "qwen3": (qwen3_sd(lm_head=True), ["--exclude-layers", "embed_tokens|lm_head"], "qwen3", None),
    }
    procs = {}
    for name, (sd, flags, _, meta) in cases.items():   # both ctq runs at once: each takes ~20 s of one core
        src = write(d / f"{name}.safetensors", sd, meta)
        procs[name] = subprocess.Popen([ctq, "-i", str(src), "-o", str(d / f"{name}_ctq.safetensors"), *SEED_FLAGS,
                                        *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, (_, _, preset, _) in cases.items():
        convert_file(d / f"{name}.safetensors", d / f"{name}_ours.safetensors", preset=preset, device="cpu")
    for name, p in procs.items():
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0 and (d / f"{name}_ctq.safetensors").exists(), f"ctq failed:\n{log[-3000:]}"
    return d


def test_qwen3_identical(converted):
    assert differences(converted / "qwen3_ctq.safetensors", converted / "qwen3_ours.safetensors") == {
        ("__metadata__", f"extra key {PROVENANCE_KEY}")}


def test_zimage_identical_but_the_listed_differences(converted):
    assert differences(converted / "zimage_ctq.safetensors", converted / "zimage_ours.safetensors") == \
        EXPECTED_ZIMAGE_DIFFERENCES
    a, ma = load(converted / "zimage_ctq.safetensors")
    b, mb = load(converted / "zimage_ours.safetensors")
    src, _ = load(converted / "zimage.safetensors")
    assert ma["modelspec.title"] == mb["modelspec.title"] == "tiny z"    # both keep the input's header keys
    assert layer_json(b["layers.0.adapter.comfy_quant"]) == layer_json(a["layers.0.adapter.comfy_quant"]) == {
        "format": "int8_tensorwise", "orig_dtype": "torch.bfloat16", "per_row": True}
    bias = "layers.0.attention.out.bias"
    assert torch.equal(b[bias], src[bias])                       # ours: untouched
    shift = (a[bias].float() - src[bias].float()).abs().max().item()
    assert 0 < shift < 0.05                                      # ctq: random-calibration noise added


def test_inspect_reads_ctq_files(converted):
    from comfyui_int8_convrot.engine.inspect import inspect_file
    info = inspect_file(converted / "zimage_ctq.safetensors")
    assert info["format"] == "int8_convrot" and info["written_by"] is None and not info["problems"]
    assert info["layers"]["int8_convrot"] == 30 and info["layers"]["int8_unrotated"] == 1
    assert info["group_sizes"] == {"64": 30}
