"""Interfaces of newer ComfyUI that reach our ops (issue 17 item 5), on the real tree in COMFYUI_PATH.

- Saving: 0.29+ `save_checkpoint` loads the model without `force_patch_weights` and reads
  `ModelPatcher.model_state_dict_for_saving`, whose lazy cast calls `patch_weight_to_device(...,
  return_weight=True)`. A pack model with a LoRA must save the LoRA baked in (0.8.0 folds through
  `force_patch_weights`; the same test covers both).
- `comfy.ops.linear_input_act` (0.30+, used by Wan, LTX, MiniMax and merged Qwen MLPs): on our layer it
  must give what our forward gives; 0.36+ casts a plain Linear's weight itself for fp16 accumulation
  unless the layer says `_full_precision_mm`, which ours do.
"""
from __future__ import annotations

import pytest
import torch

import comfy_env
from comfy_env import rel_err

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]

LORA = "iface_zimage_lora.safetensors"
QKV = "layers.0.attention.qkv"
OUT = "layers.0.attention.out"


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    import folder_paths
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    d = tmp_path_factory.mktemp("iface")
    q, meta = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY, seed=5)), "zimage", 64)
    gen = torch.Generator().manual_seed(3)
    lora = {f"diffusion_model.{QKV}.lora_up.weight": 0.2 * torch.randn(768, 4, generator=gen),
            f"diffusion_model.{QKV}.lora_down.weight": 0.2 * torch.randn(4, 256, generator=gen)}
    (d / "loras").mkdir()
    comfy_env.save_state_dict(d / "loras" / LORA, {k: v.to(torch.bfloat16) for k, v in lora.items()})
    folder_paths.add_model_folder_path("loras", str(d / "loras"))
    return {"int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
            "deq": comfy_env.save_state_dict(d / "deq.safetensors", comfy_env.dequantized_state_dict(q)),
            "dir": d}


@pytest.fixture
def unloaded(comfy):
    import comfy.model_management as mm
    yield
    mm.unload_all_models()


def with_lora(model):
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA, 0.8)[0]


def saved(path) -> dict:
    import safetensors.torch
    sd = safetensors.torch.load_file(str(path))
    return {k.split("diffusion_model.", 1)[1]: v for k, v in sd.items() if "diffusion_model." in k}


def test_save_checkpoint_bakes_the_lora(files, unloaded):
    """What ComfyUI's checkpoint save writes for a pack model with a LoRA: the patched layer as its folded
    float weight (equal to the stock float model's save), the unpatched ones still INT8 ConvRot."""
    import comfy.sd
    from comfyui_int8_convrot.nodes.loaders import load_unet
    comfy.sd.save_checkpoint(str(files["dir"] / "ref.safetensors"),
                             with_lora(comfy.sd.load_diffusion_model(str(files["deq"]))))
    base = load_unet(files["int8"], "w8a16")
    codes = base.model.diffusion_model.get_submodule(QKV).weight
    comfy.sd.save_checkpoint(str(files["dir"] / "ours.safetensors"), with_lora(base))
    ref, ours = saved(files["dir"] / "ref.safetensors"), saved(files["dir"] / "ours.safetensors")
    w = ours[f"{QKV}.weight"]
    assert w.is_floating_point(), w.dtype                          # the LoRA baked in, not the bare codes
    assert f"{QKV}.weight_scale" not in ours and f"{QKV}.comfy_quant" not in ours
    assert rel_err(ref[f"{QKV}.weight"].float(), w.float()) < 1e-5
    assert ours[f"{OUT}.weight"].dtype == torch.int8 and f"{OUT}.comfy_quant" in ours   # untouched layer
    import comfy.model_patcher
    if hasattr(comfy.model_patcher.ModelPatcher, "model_state_dict_for_saving"):   # 0.29+: lazy, model untouched
        assert base.model.diffusion_model.get_submodule(QKV).weight is codes          # (0.8.0 folds until unpatch)


def test_state_dict_for_saving_while_offloaded(files, unloaded):
    """Offloaded (lowvram) layers go through ComfyUI's lazy cast in 0.29+ (patch_weight_to_device with
    return_weight): every entry materialises, the LoRA'd layer folded, the others as stored."""
    import comfy.model_patcher
    from comfyui_int8_convrot.nodes.loaders import load_unet
    if not hasattr(comfy.model_patcher.ModelPatcher, "model_state_dict_for_saving"):
        pytest.skip("this ComfyUI saves through force_patch_weights (covered by test_lora)")
    base = load_unet(files["int8"], "w8a16")
    lora = with_lora(base)
    cpu = torch.device("cpu")
    lora.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        sd = {k: v.to("cpu") for k, v in lora.model_state_dict_for_saving(
            lora.model.diffusion_model, "diffusion_model.").items()}
    finally:
        lora.unpatch_model(cpu)
    layer = base.model.diffusion_model.get_submodule(QKV)
    deq = layer._dequantized(layer.weight, layer.weight_scale)
    assert sd[f"{QKV}.weight"].is_floating_point() and f"{QKV}.weight_scale" not in sd
    assert rel_err(deq, sd[f"{QKV}.weight"].float()) > 1e-3        # the LoRA is in it
    assert sd[f"{OUT}.weight"].dtype == torch.int8 and f"{OUT}.weight_scale" in sd


def test_linear_input_act_runs_our_forward(files, unloaded):
    import comfy.ops
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from comfyui_int8_convrot.nodes.ops import Int8ConvRotLinear
    layer = load_unet(files["int8"], "w8a16").model.diffusion_model.get_submodule("layers.0.feed_forward.w2")
    assert isinstance(layer, Int8ConvRotLinear) and layer.is_quantized and layer._full_precision_mm is True
    if not hasattr(comfy.ops, "linear_input_act"):
        pytest.skip("this ComfyUI has no comfy.ops.linear_input_act (0.30+)")
    x = torch.randn(2, 5, 2 * layer.in_features, generator=torch.Generator().manual_seed(1))
    gate, up = x.chunk(2, dim=-1)
    ref = layer(torch.nn.functional.silu(gate) * up)
    assert rel_err(ref, comfy.ops.linear_input_act(layer, x, "swiglu")) < 1e-6
