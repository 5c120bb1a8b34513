"""The loaders' `layers` choice: the pack's INT8 layers or ComfyUI's native ones (0.27+), which decides
whether ComfyUI's dynamic VRAM can manage the model. A LoRA is applied on every path."""
from __future__ import annotations

import pytest
import torch

import comfy_env
from comfy_env import rel_err

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]

TOKENS = 8


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    d = tmp_path_factory.mktemp("layers")
    sd = dict(iter_zimage(ZIMAGE_TINY))
    q, meta = comfy_env.int8_state_dict(sd, "zimage", 64)
    gen = torch.Generator().manual_seed(8)
    lora = {}
    for name, (o, i) in {"layers.0.attention.qkv": (768, 256), "layers.1.feed_forward.w2": (256, 704)}.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.2 * torch.randn(o, 4, generator=gen)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.2 * torch.randn(4, i, generator=gen)
    return {"int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
            "deq": comfy_env.save_state_dict(d / "deq.safetensors", comfy_env.dequantized_state_dict(q)),
            "lora": lora}


def forward(patcher, seed=1):
    import comfy.model_management as mm
    gen = torch.Generator().manual_seed(seed)
    x, t, ctx = torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.6]), torch.randn(1, TOKENS, 256, generator=gen)
    mm.load_models_gpu([patcher])
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    with torch.no_grad():
        return patcher.model.diffusion_model(x.to(dtype), t, ctx.to(dtype), TOKENS).float()


def with_lora(patcher, lora):
    import comfy.lora
    p = patcher.clone()
    p.add_patches(comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(p.model, {})), 1.0)
    return p


def test_auto_on_cpu_is_the_pack(files):
    """No dynamic VRAM on the CPU (0.29 reroutes CPUs to the classic patcher): the pack's faster, exact layers."""
    from comfyui_int8_convrot.nodes.loaders import load_unet, resolve_layers
    from comfyui_int8_convrot.nodes.ops import Int8ModelPatcher
    choice, why = resolve_layers("auto")
    assert choice == "pack" and why.startswith("auto:")
    assert isinstance(load_unet(files["int8"], "w8a16"), Int8ModelPatcher)


def test_native_layers_where_comfyui_has_them(files):
    from comfyui_int8_convrot.engine.errors import Int8ConvRotError
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from comfyui_int8_convrot.nodes.native import has_native_int8
    from comfyui_int8_convrot.nodes.ops import Int8ConvRotLinear
    if not has_native_int8():
        with pytest.raises(Int8ConvRotError, match="no native INT8 ConvRot layers.*choose layers 'pack'"):
            load_unet(files["int8"], layers="native")
        return
    native = load_unet(files["int8"], layers="native")
    assert not any(isinstance(m, Int8ConvRotLinear) for m in native.model.modules())
    ref = forward(comfy_env_stock(files["deq"]))
    assert rel_err(ref, forward(native)) < 0.05       # native W8A8 (activations 8-bit too) on the same codes
    # LoRA on the native path: ComfyUI's own (re-quantized) application, never dropped.
    ref_l = forward(with_lora(comfy_env_stock(files["deq"]), files["lora"]))
    y_l = forward(with_lora(native, files["lora"]))
    assert rel_err(ref, ref_l) > 0.05 and rel_err(ref_l, y_l) < 0.06


def comfy_env_stock(path):
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})


def test_pack_layers_honour_the_dynamic_patchers_lowvram_function(files):
    """0.29's dynamic patcher puts a layer's LoRA in `weight_lowvram_function` (not weight_function):
    the pack's layers apply it (exactly, as a low-rank term) instead of dropping it."""
    import comfy.model_patcher
    from comfyui_int8_convrot.nodes.loaders import load_unet
    base = load_unet(files["int8"], "w8a16")
    y0 = forward(base)
    ref = forward(with_lora(load_unet(files["int8"], "w8a16"), files["lora"]))   # our full-load LoRA path
    p = with_lora(base, files["lora"])
    import comfy.model_management as mm
    mm.load_models_gpu([base])
    n = 0
    for key in p.patches:
        layer = comfy.utils.get_attr(p.model, key[: -len(".weight")])
        layer.weight_lowvram_function = comfy.model_patcher.LowVramPatch(key, p.patches)
        n += 1
    assert n == 2
    try:
        with torch.no_grad():
            y = forward(base)
    finally:
        for key in p.patches:
            comfy.utils.get_attr(p.model, key[: -len(".weight")]).weight_lowvram_function = None
    assert rel_err(y0, y) > 0.01 and rel_err(ref, y) < 1e-5


@pytest.mark.gpu
def test_auto_on_cuda_gets_dynamic_vram_with_lora(files):
    """GPU tier (bench/gpu_check.sh): on 0.29+ with NVIDIA, auto picks ComfyUI's native layers, the model
    gets ModelPatcherDynamic, and a LoRA changes the output as on the float model."""
    import comfy.model_patcher
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from comfyui_int8_convrot.nodes.native import dynamic_vram_active
    if not dynamic_vram_active():
        pytest.skip("this ComfyUI/device has no dynamic VRAM")
    p = load_unet(files["int8"])
    assert isinstance(p, comfy.model_patcher.ModelPatcherDynamic)
    y0, y1 = forward(p), forward(with_lora(p, files["lora"]))
    assert rel_err(y0, y1) > 0.05
