"""The converter nodes inside the real ComfyUI (in-process, CPU): dropdown, names, folders, progress,
Cancel, the loaders' file list, and saving a patched MODEL (float or loaded from INT8) as INT8 ConvRot."""
from __future__ import annotations

import pytest
import torch

import comfy_env
from comfyui_int8_convrot.engine import synthetic

pytestmark = pytest.mark.comfyui


@pytest.fixture
def folders(comfy, tmp_path, monkeypatch):
    import folder_paths
    dirs = {}
    for name in ("diffusion_models", "text_encoders"):
        d = tmp_path / name
        d.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(d)], {".safetensors"}))
        folder_paths.filename_list_cache.pop(name, None)
        dirs[name] = d
    yield dirs
    for name in dirs:
        folder_paths.filename_list_cache.pop(name, None)


@pytest.fixture
def node(comfy):
    from comfyui_int8_convrot.nodes import converter
    return converter


def zimage(path):
    return comfy_env.save_state_dict(path, dict(synthetic.iter_zimage(synthetic.ZIMAGE_TINY)))


def convert(node, model, **kw):
    args = dict(preset="auto", group_size="64", scaling="row", output_name="", overwrite=False, device="auto") | kw
    return node.Int8ConvRotConverter.execute(model=model, **args)


def partials(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


def test_registered_with_a_dropdown_of_both_folders(node, folders):
    from comfyui_int8_convrot.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    assert NODE_DISPLAY_NAME_MAPPINGS["Int8ConvRotConverter"] == "INT8 ConvRot Converter"
    assert NODE_DISPLAY_NAME_MAPPINGS["Int8ConvRotSaveModel"] == "INT8 ConvRot Save Model"
    assert NODE_CLASS_MAPPINGS["Int8ConvRotConverter"] is node.Int8ConvRotConverter
    zimage(folders["diffusion_models"] / "z.safetensors")
    comfy_env.save_state_dict(folders["text_encoders"] / "qwen.safetensors", dict(synthetic.iter_qwen3()))
    schema = node.Int8ConvRotConverter.GET_SCHEMA()
    options = schema.inputs[0].options
    assert options == ["diffusion_models/z.safetensors", "text_encoders/qwen.safetensors"]
    assert schema.is_output_node and [o.id for o in schema.outputs] == ["file_name", "summary"]


def test_converts_beside_the_input_and_the_loaders_see_it(node, folders):
    import folder_paths
    src = zimage(folders["diffusion_models"] / "z.safetensors")
    assert folder_paths.get_filename_list("diffusion_models") == ["z.safetensors"]   # cache filled
    out = convert(node, "diffusion_models/z.safetensors")
    assert out.args[0] == "z_int8_convrot.safetensors"
    assert "30 quantized" in out.args[1] and "preset zimage (detected" in out.args[1]
    assert out.ui.as_dict()["text"] == (out.args[1],)
    assert (src.parent / "z_int8_convrot.safetensors").exists()
    assert "z_int8_convrot.safetensors" in folder_paths.get_filename_list("diffusion_models")
    te = comfy_env.save_state_dict(folders["text_encoders"] / "qwen.safetensors", dict(synthetic.iter_qwen3()))
    out = convert(node, "text_encoders/qwen.safetensors", output_name="qwen int8")
    assert out.args[0] == "qwen int8.safetensors" and (te.parent / "qwen int8.safetensors").exists()
    assert "preset qwen3" in out.args[1]
    from safetensors import safe_open
    with safe_open(str(te.parent / "qwen int8.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"      # kept by default
    convert(node, "text_encoders/qwen.safetensors", output_name="qwen_emb", quantize_embeddings=True)
    with safe_open(str(te.parent / "qwen_emb.safetensors"), "pt") as f:       # ctq's layout for the table
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "I8"
        assert "model.embed_tokens.weight_scale" in f.keys() and "model.embed_tokens.comfy_quant" in f.keys()


@pytest.mark.parametrize("name", ["../escape", "sub/dir.safetensors", "..", ".hidden.safetensors", "a\\b",
                                  "model.ckpt", "nul\x00.safetensors"])
def test_output_names_are_sanitised(node, folders, name):
    from comfyui_int8_convrot.engine.errors import OutputPathError
    zimage(folders["diffusion_models"] / "z.safetensors")
    with pytest.raises(OutputPathError):
        convert(node, "diffusion_models/z.safetensors", output_name=name)
    assert sorted(p.name for p in folders["diffusion_models"].parent.rglob("*") if p.is_file()) == ["z.safetensors"]


def test_no_overwrite_without_the_toggle(node, folders):
    from comfyui_int8_convrot.engine.errors import OutputPathError
    zimage(folders["diffusion_models"] / "z.safetensors")
    convert(node, "diffusion_models/z.safetensors", output_name="z8")
    with pytest.raises(OutputPathError, match="exists already"):
        convert(node, "diffusion_models/z.safetensors", output_name="z8")
    with pytest.raises(OutputPathError, match="the output file is the input file"):
        convert(node, "diffusion_models/z.safetensors", output_name="z.safetensors", overwrite=True)
    assert convert(node, "diffusion_models/z.safetensors", output_name="z8", overwrite=True).args[0] == "z8.safetensors"


def test_progress_and_cancel(node, folders, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils
    zimage(folders["diffusion_models"] / "z.safetensors")
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, total, preview, node_id=None: seen.append((v, total)))
    convert(node, "diffusion_models/z.safetensors", output_name="ok")
    assert seen[-1] == (1000, 1000) and [v for v, _ in seen] == sorted(v for v, _ in seen)

    def cancel_half_way(v, total, preview, node_id=None):
        if v > 400:
            mm.interrupt_current_processing(True)       # the Cancel button
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", cancel_half_way)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            convert(node, "diffusion_models/z.safetensors", output_name="cancelled")
    finally:
        flagged = mm.processing_interrupted()
        mm.interrupt_current_processing(False)     # never leak a Cancel into the next test
    assert not flagged, "the interrupt was left set: the converter did not consume it"
    assert not (folders["diffusion_models"] / "cancelled.safetensors").exists()
    assert not partials(folders["diffusion_models"])


def test_bad_input_is_a_clear_error(node, folders):
    from comfyui_int8_convrot.engine.errors import FileFormatError
    (folders["diffusion_models"] / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(FileFormatError, match="broken.safetensors: not a safetensors file"):
        convert(node, "diffusion_models/broken.safetensors")


def test_save_model_with_a_lora_patch(node, folders):
    """A float MODEL with a weight patch: the patched layer is quantized from the patched weight."""
    import comfy.sd
    from comfyui_int8_convrot.kernels import quantize_weight
    from convert_helpers_nodes import load
    sd = dict(synthetic.iter_zimage(synthetic.ZIMAGE_TINY))
    model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    key = "layers.0.attention.qkv.weight"
    diff = 0.01 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(3))
    model = model.clone()
    model.add_patches({f"diffusion_model.{key}": (diff,)}, 1.0)
    out = node.Int8ConvRotSaveModel.execute(model=model, file_name="patched", preset="auto", group_size="64",
                                            scaling="row", overwrite=False)
    assert out.args[0] == "patched.safetensors" and "preset zimage (detected" in out.args[1]
    saved, _ = load(folders["diffusion_models"] / "patched.safetensors")
    dtype = model.model.diffusion_model.state_dict()[key].dtype
    patched = (sd[key].to(dtype).float() + diff).to(dtype)
    assert torch.equal(saved[key], quantize_weight(patched, 64)[0])
    other = "layers.1.feed_forward.w1.weight"
    assert torch.equal(saved[other], quantize_weight(sd[other].to(dtype), 64)[0])


def test_save_model_loaded_from_int8_keeps_the_codes(node, folders):
    """A MODEL from the INT8 ConvRot loader saves its unpatched layers' codes unchanged."""
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from convert_helpers_nodes import load
    src = zimage(folders["diffusion_models"] / "z.safetensors")
    convert(node, "diffusion_models/z.safetensors", output_name="z8")
    model = load_unet(str(src.parent / "z8.safetensors"))
    node.Int8ConvRotSaveModel.execute(model=model, file_name="resaved", preset="zimage", group_size="64",
                                      scaling="row", overwrite=False)
    a, _ = load(src.parent / "z8.safetensors")
    b, _ = load(src.parent / "resaved.safetensors")
    for k in a:
        if a[k].dtype == torch.int8:
            assert torch.equal(a[k], b[k]), k
