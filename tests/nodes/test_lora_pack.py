"""The CPU packed copy of the int8 codes (w8a8) across LoRA changes, in-process on real ComfyUI.

A LoRA change, swap, removal or unpatch gives back the very same codes, so the pack must survive it
(re-packing costs several forwards); any real change of the codes must drop it, and the output must
then equal a fresh model's bit for bit (a stale pack would be silent garbage). ComfyUI's unload
(free memory) drops it.
"""
from __future__ import annotations

import pytest
import torch

import comfy_env
from test_lora import TOKENS, make_lora, run

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]

LORA_A, LORA_B = "pack_lora_a.safetensors", "pack_lora_b.safetensors"


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    import folder_paths
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    from comfyui_int8_convrot import kernels
    if not kernels.cpu_int8_gemm.fast_backend_available():
        pytest.skip("no fast CPU int8 GEMM on this machine: w8a8 keeps no pack")
    d = tmp_path_factory.mktemp("lora_pack")
    (d / "loras").mkdir()
    comfy_env.save_state_dict(d / "loras" / LORA_A, make_lora(seed=3))
    comfy_env.save_state_dict(d / "loras" / LORA_B, make_lora(seed=4))
    folder_paths.add_model_folder_path("loras", str(d / "loras"))
    q, meta = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY, seed=5)), "zimage", 64)
    q2, meta2 = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY, seed=6)), "zimage", 64)
    return {"int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
            "int8_b": comfy_env.save_state_dict(d / "int8_b.safetensors", q2, meta2)}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.4]), torch.randn(1, TOKENS, 256, generator=gen)


@pytest.fixture
def unloaded(comfy):
    import comfy.model_management as mm
    yield
    mm.unload_all_models()


def load(path):
    from comfyui_int8_convrot.nodes.loaders import load_unet
    return load_unet(path, "w8a8", layers="pack")


def lora(model, name, strength):
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def int8_layers(patcher):
    from comfyui_int8_convrot.nodes.ops import Int8ConvRotLinear
    return {n: m for n, m in patcher.model.named_modules() if isinstance(m, Int8ConvRotLinear) and m.quant}


def packs(patcher):
    return {n: m._pack._packed for n, m in int8_layers(patcher).items()}


def assert_same_packs(patcher, before):
    now = packs(patcher)
    assert all(p is not None for p in now.values())
    assert {n for n in now if now[n] is not before[n]} == set()


def test_pack_survives_lora_change_swap_removal(files, inputs, unloaded):
    base = load(files["int8"])
    y_base = run(base, inputs)
    before = packs(base)
    assert all(p is not None for p in before.values())          # w8a8 on CPU ran on the packs
    steps = [lora(base, LORA_A, 0.8), lora(base, LORA_A, 0.3),              # add, strength change
             lora(base, LORA_B, 0.8),                                       # swap
             lora(lora(base, LORA_A, 0.5), LORA_B, 0.7)]                    # stack
    ys = []
    for p in steps:
        ys.append(run(p, inputs))
        assert_same_packs(base, before)
    assert torch.equal(run(base, inputs), y_base)                           # removal
    assert_same_packs(base, before)
    for p, y in zip(steps, ys):                                             # re-runs are bit-identical
        assert torch.equal(run(p, inputs), y)
    # The same LoRA on a freshly loaded model (its packs built with the LoRA active) gives the same bits.
    fresh = load(files["int8"])
    assert torch.equal(run(lora(fresh, LORA_A, 0.8), inputs), ys[0])


def test_pack_dropped_on_unload(files, inputs, unloaded):
    import comfy.model_management as mm
    base = load(files["int8"])
    p = lora(base, LORA_A, 0.8)
    y = run(p, inputs)
    mm.unload_all_models()                                   # ComfyUI frees memory: the packs go
    assert all(v is None for v in packs(base).values())
    assert torch.equal(run(p, inputs), y)                    # and are rebuilt, same bits


def test_real_code_changes_drop_the_pack(files, inputs, unloaded):
    """Each way the codes can change: a state dict load (outputs equal the other file's model), an
    in-place copy_ and a new Parameter (outputs equal the same model with its packs rebuilt), bit for bit."""
    import comfy.utils
    other = load(files["int8_b"])
    y_other, y_other_lora = run(other, inputs), run(lora(other, LORA_A, 0.8), inputs)
    other_codes = {n: m.weight for n, m in int8_layers(other).items()}

    # load_state_dict of another file's weights into a loaded, packed model (unpatched: a LoRA's unpatch
    # would put its backup of the old codes back, as ComfyUI does for any weight)
    m = load(files["int8"])
    run(m, inputs)
    sd = comfy.utils.load_torch_file(str(files["int8_b"]))
    prefix = "model.diffusion_model."
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    result = m.model.diffusion_model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    assert torch.equal(run(m, inputs), y_other)
    assert torch.equal(run(lora(m, LORA_A, 0.8), inputs), y_other_lora)

    # an in-place write into the codes (a normal tensor: torch bumps its version)
    m = load(files["int8"])
    y0 = run(m, inputs)
    with torch.inference_mode(False):
        for layer in int8_layers(m).values():
            layer.weight = torch.nn.Parameter(layer.weight.clone(), requires_grad=False)   # a normal tensor
            assert not layer._pack.is_packed                     # other storage: the pack went
    assert torch.equal(run(m, inputs), y0)                       # same codes, new packs
    with torch.inference_mode(False), torch.no_grad():
        for n, layer in int8_layers(m).items():
            layer.weight.copy_(other_codes[n])
    y = run(m, inputs)
    assert not torch.equal(y, y0) and torch.equal(y, fresh_pack_output(m, inputs))

    # a new Parameter holding other codes (as a loader or another node would set it)
    m = load(files["int8"])
    y0 = run(m, inputs)
    for n, layer in int8_layers(m).items():
        layer.weight = torch.nn.Parameter(other_codes[n].clone(), requires_grad=False)
    y = run(m, inputs)
    assert not torch.equal(y, y0) and torch.equal(y, fresh_pack_output(m, inputs))


def fresh_pack_output(m, inputs):
    """The model's output with every pack rebuilt from the codes it holds now."""
    from comfyui_int8_convrot.nodes.ops import drop_packs
    assert drop_packs(m.model) > 0
    return run(m, inputs)


def test_dense_patch_keeps_codes_and_pack_exact(files, inputs, unloaded):
    """A non-LoRA patch (the full-weight diff in make_lora) is applied to the dequantized weight and
    stored densely; the codes stay in the backup and their pack stays valid for the unpatch."""
    base = load(files["int8"])
    y_base = run(base, inputs)
    before = packs(base)
    p = lora(base, LORA_A, 0.8)
    y = run(p, inputs)
    out = int8_layers(base)["diffusion_model.layers.1.attention.out"]
    assert out.weight.dtype != torch.int8 and out._pack.is_packed       # dense now, pack kept for the codes
    assert torch.equal(run(base, inputs), y_base)
    assert_same_packs(base, before)
    assert torch.equal(run(p, inputs), y)
