"""One verdict for the loaders and the badge (engine/verdict.py): every bad-file kind of
test_bad_inputs.py, the damaged INT8 ConvRot files of issue 18 and the native formats of newer
ComfyUI are red exactly when the loaders' check refuses them, with the loaders' own message; files they
read are never red. The loader side here is the engine's whole loading path (header check, then the
tensors through prepare_state_dict); tests/nodes/test_verdicts.py runs the nodes and the route in ComfyUI."""
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_int8_convrot.cli import main
from comfyui_int8_convrot.engine.convert import convert_file
from comfyui_int8_convrot.engine.errors import FileFormatError, Int8ConvRotError
from comfyui_int8_convrot.engine.facts import NOT_INT8_WARNING, file_facts
from comfyui_int8_convrot.engine.loading import prepare_state_dict
from comfyui_int8_convrot.engine.verdict import NATIVE_FORMATS, loader_check, native_format_text
from verdict_files import GOOD, NATIVE, UNREADABLE, build

BAD = ("bf16", "no_scales", "one_scale_removed", "nan_scale", "format_version_2", "nan_weights_bf16",
       "scaled_fp8_missing_scale", "comfy_fp8_no_scale", "int8_without_comfy_quant") + NATIVE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build(tmp_path_factory.mktemp("verdicts"))


def full_load(path):
    """What the loaders do without ComfyUI: the header check, then every tensor validated."""
    loader_check(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    prepare_state_dict(load_file(str(path)), metadata, path=path)


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_files_fail_the_same_way(files, kind):
    path = files[kind]
    with pytest.raises(FileFormatError) as facts_error:
        file_facts(path, kind)
    with pytest.raises(FileFormatError) as load_error:
        loader_check(path)
    assert str(facts_error.value) == str(load_error.value)


@pytest.mark.parametrize("kind", GOOD + BAD)
def test_red_iff_the_loaders_refuse(files, kind):
    path = files[kind]
    summary = file_facts(path, f"diffusion_models/{kind}.safetensors")["summary"]
    try:
        full_load(path)
        refused = None
    except Int8ConvRotError as exc:
        refused = str(exc)
    assert (summary["level"] == "bad") == (refused is not None), (kind, summary, refused)
    assert (kind in BAD) == (refused is not None)
    if refused:   # the badge carries the loaders' own message, path shown as the listed name
        with pytest.raises(Int8ConvRotError) as exc:
            loader_check(path)
        assert summary["refusal"] == str(exc.value).replace(str(path), f"diffusion_models/{kind}.safetensors")
        assert str(path) not in repr(summary)


@pytest.mark.parametrize("kind", ["no_scales", "one_scale_removed", "nan_scale"])
def test_damaged_int8_file_is_red_with_the_reason(files, kind):
    s = file_facts(files[kind], kind)["summary"]
    assert s["level"] == "bad" and s["lines"][0] == "refused by the loaders: INT8 ConvRot"
    assert "weight_scale" in s["warnings"][0] and "re-convert" in s["warnings"][0]


def test_good_files(files):
    assert file_facts(files["int8"])["summary"]["level"] == "ok"
    assert file_facts(files["int8_tensorwise"])["summary"]["level"] == "warn"
    meta_only = file_facts(files["int8_metadata_only"])["summary"]
    assert meta_only["level"] == "ok" and meta_only["lines"][0] == "INT8 ConvRot · group 64 · row scales"


@pytest.mark.parametrize("fmt", NATIVE)
def test_native_formats_are_named_with_their_loader(files, fmt, tmp_path, capsys):
    path, native = files[fmt], NATIVE_FORMATS[fmt]
    s = file_facts(path, fmt)["summary"]
    assert s["level"] == "bad" and s["lines"][0] == f"not INT8 ConvRot: {fmt}" and s["native_format"] == fmt
    assert s["warnings"][0] == native_format_text(fmt) and native.reader in s["warnings"][0]
    assert NOT_INT8_WARNING not in s["warnings"] and "convert" not in " ".join(s["lines"] + s["warnings"])
    with pytest.raises(FileFormatError) as load_error:   # the loaders: the same words
        loader_check(path, quantize="auto")
    assert native_format_text(fmt) in str(load_error.value) and f"load it with {native.reader}" in str(load_error.value)
    with pytest.raises(FileFormatError) as conv_error:   # the converter: refused as input, naming the format
        convert_file(path, tmp_path / "out.safetensors")
    assert f"already quantized ({fmt!r}" in str(conv_error.value) and native.reader in str(conv_error.value)
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "verdict (bad)" in out and native.reader in out


def test_cli_shows_the_loaders_reason(files, capsys):
    assert main(["inspect", str(files["one_scale_removed"])]) == 0
    out = capsys.readouterr().out
    assert "verdict (bad)" in out and "INT8 layer without its weight_scale" in out
    assert main(["inspect", str(files["int8"]), "--json"]) == 0
    import json
    assert json.loads(capsys.readouterr().out)["verdict"]["level"] == "ok"


@pytest.mark.parametrize("edit", ["codes_f16", "codes_3d", "scale_count", "group_not_dividing", "inf_scale"])
def test_verdict_and_state_dict_check_say_the_same(tmp_path, edit):
    """A damaged INT8 layer: the header-only verdict and the loaders' tensor check (prepare_state_dict,
    without loader_check first) refuse with the same message: both are linear.check_layer."""
    import torch
    from safetensors.torch import save_file
    from comfyui_int8_convrot import kernels
    from comfyui_int8_convrot.engine.format import LayerQuant
    codes, scale = kernels.quantize_weight(torch.randn(96, 128, generator=torch.Generator().manual_seed(0)), 64)
    group = 64
    if edit == "codes_f16":
        codes = codes.half()
    elif edit == "codes_3d":
        codes = codes.reshape(2, 48, 128)
    elif edit == "scale_count":
        scale = scale[:95]
    elif edit == "group_not_dividing":
        group = 256          # a power of 4 that does not divide in = 128
    elif edit == "inf_scale":
        scale = scale.clone()
        scale[3] = float("inf")
    sd = {"blk.proj.weight": codes, "blk.proj.weight_scale": scale,
          "blk.proj.comfy_quant": LayerQuant(group_size=group).to_tensor()}
    path = tmp_path / f"{edit}.safetensors"
    save_file(sd, str(path))
    with pytest.raises(FileFormatError) as verdict:
        loader_check(path)
    with pytest.raises(FileFormatError) as tensors:
        prepare_state_dict(load_file(str(path)), None, path=path)
    assert str(verdict.value) == str(tensors.value)
