"""ComfyUI's stock LoRA loader on models from our loader (in-process, CPU, tiny Z-Image layout).

Exactness: the reference is the float model the INT8 file encodes (codes·scale un-rotated) loaded
with ComfyUI's stock ops and patched by the same stock LoraLoaderModelOnly, all in float32. Ours
keeps the int8 codes and adds each LoRA as a low-rank term (or, for a non-LoRA patch, patches the
dequantized float32 weight), so in w8a16 the two agree up to float32 rounding (rel. error < 1e-5,
measured ~1e-7), while the LoRA itself changes the output by > 1%.
Unpatching must give back the very same codes (bit for bit), and patch/unpatch cycles must not drift.
"""
from __future__ import annotations

import pytest
import torch

import comfy_env
from comfy_env import rel_err

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]


TOKENS = 8
LORA = "tiny_zimage_lora.safetensors"


def make_lora(seed=3, rank=4) -> dict:
    """Plain LoRAs (ComfyUI and diffusers key styles, one onto the q slice of the fused qkv, one on a
    layer the Z-Image preset keeps in float) and one full-weight diff (not low-rank: dense path)."""
    gen = torch.Generator().manual_seed(seed)

    def lora(prefix, out_f, in_f, style="comfy", alpha=None):
        up = 0.2 * torch.randn(out_f, rank, generator=gen)
        down = 0.2 * torch.randn(rank, in_f, generator=gen)
        if style == "comfy":
            d = {f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down}
        else:
            d = {f"{prefix}.lora_B.weight": up, f"{prefix}.lora_A.weight": down}
        if alpha is not None:
            d[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        return d

    sd = {}
    sd |= lora("diffusion_model.layers.0.attention.qkv", 768, 256, alpha=2.0)
    sd |= lora("diffusion_model.layers.0.feed_forward.w1", 704, 256)
    sd |= lora("diffusion_model.noise_refiner.1.feed_forward.w2", 256, 704, style="diffusers")
    sd |= lora("diffusion_model.layers.1.attention.to_q", 256, 256, style="diffusers")   # offset into qkv
    sd |= lora("diffusion_model.x_embedder", 256, 64)                                     # a float layer
    sd["diffusion_model.layers.1.attention.out.diff"] = 0.05 * torch.randn(256, 256, generator=gen)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    import folder_paths
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    d = tmp_path_factory.mktemp("lora")
    sd = dict(iter_zimage(ZIMAGE_TINY, seed=5))
    q, meta = comfy_env.int8_state_dict(sd, "zimage", 64)
    (d / "loras").mkdir()
    comfy_env.save_state_dict(d / "loras" / LORA, make_lora())
    folder_paths.add_model_folder_path("loras", str(d / "loras"))
    q2, meta2 = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY, seed=6)), "zimage", 64)
    return {"int8": comfy_env.save_state_dict(d / "int8.safetensors", q, meta),
            "deq": comfy_env.save_state_dict(d / "deq.safetensors", comfy_env.dequantized_state_dict(q)),
            "int8_b": comfy_env.save_state_dict(d / "int8_b.safetensors", q2, meta2),
            "deq_b": comfy_env.save_state_dict(d / "deq_b.safetensors", comfy_env.dequantized_state_dict(q2))}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.4]), torch.randn(1, TOKENS, 256, generator=gen)


def run(patcher, inputs, load=True):
    import comfy.model_management as mm
    if load:
        mm.load_models_gpu([patcher])
    x, t, ctx = inputs
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, ctx, TOKENS)


def with_lora(model, strength=0.8):
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA, strength)[0]


def int8_layers(patcher):
    from comfyui_int8_convrot.nodes.ops import Int8ConvRotLinear
    return {n: m for n, m in patcher.model.named_modules() if isinstance(m, Int8ConvRotLinear) and m.quant}


def snapshot_codes(patcher):
    return {n: (m.weight, m.weight.detach().clone(), m.weight_scale.detach().clone())
            for n, m in int8_layers(patcher).items()}


def assert_codes_restored(patcher, snap):
    layers = int8_layers(patcher)
    assert layers.keys() == snap.keys()
    for n, (tensor, codes, scale) in snap.items():
        m = layers[n]
        assert m.is_quantized, n
        assert torch.equal(m.weight, codes) and m.weight.dtype == torch.int8, n
        assert m.weight.data_ptr() == tensor.data_ptr(), n   # the very same storage came back
        assert torch.equal(m.weight_scale, scale), n
        assert m._lowrank == () and not m.weight_function, n


@pytest.fixture
def unloaded(comfy):
    import comfy.model_management as mm
    yield
    mm.unload_all_models()


def test_lora_exact_restore_and_no_drift(files, inputs, unloaded):
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from comfyui_int8_convrot.nodes.ops import Int8ModelPatcher
    import comfy.sd
    ref_base = comfy.sd.load_diffusion_model(str(files["deq"]))
    ref = run(with_lora(ref_base), inputs)

    base = load_unet(files["int8"], "w8a16")
    snap = snapshot_codes(base)
    y_base = run(base, inputs)
    lora = with_lora(base)
    assert isinstance(lora, Int8ModelPatcher)          # LoraLoader's clone keeps our patcher
    y_lora = run(lora, inputs)
    assert rel_err(y_base, y_lora) > 0.01              # the LoRA does something
    assert rel_err(ref, y_lora) < 1e-5, rel_err(ref, y_lora)

    layers = int8_layers(base)
    qkv0, qkv1 = layers["diffusion_model.layers.0.attention.qkv"], layers["diffusion_model.layers.1.attention.qkv"]
    assert qkv0.is_quantized and len(qkv0._lowrank) == 1          # low-rank term, codes kept int8
    assert qkv1.is_quantized and qkv1._lowrank[0].rows == (0, 256)  # to_q onto the q rows of qkv
    out1 = layers["diffusion_model.layers.1.attention.out"]
    assert out1.weight.dtype == torch.float32                      # the diff patch: dense path

    for cycle in range(3):
        y = run(base, inputs)
        assert torch.equal(y, y_base), cycle
        assert_codes_restored(base, snap)
        assert torch.equal(run(lora, inputs), y_lora), cycle


def test_lowvram_offload_and_partial_unload(files, inputs, unloaded):
    """ModelPatcher's lowvram machinery on CPU: layers that do not fit the budget keep their weights
    on the offload device and get LowVramPatch functions; ours turns plain LoRAs into low-rank terms
    per call and runs the rest on the dequantized weight. Results equal the full load."""
    from comfyui_int8_convrot.nodes.loaders import load_unet
    base = load_unet(files["int8"], "w8a16")
    snap = snapshot_codes(base)
    lora = with_lora(base)
    y_full = run(lora, inputs)
    y_base = run(base, inputs)
    base.detach()

    cpu = torch.device("cpu")
    size = lora.model_size()
    int8_bytes = sum(m.weight.nbytes for m in int8_layers(lora).values())
    assert int8_bytes < 0.6 * sum(m.weight.numel() * 2 for m in int8_layers(lora).values())  # vs bf16
    budget = size // 3
    lora.patch_model(device_to=cpu, lowvram_model_memory=budget)
    try:
        assert lora.model.model_lowvram and 0 < lora.loaded_size() <= budget
        offloaded = [m for m in int8_layers(lora).values() if hasattr(m, "prev_comfy_cast_weights")]
        assert offloaded and all(m.is_quantized for m in offloaded)    # codes stay int8 while offloaded
        assert rel_err(y_full, run(lora, inputs, load=False)) < 1e-6
        # Free everything: the fully loaded, LoRA-patched layers give their codes back and get
        # LowVramPatch functions instead, which our Linear turns into per-call low-rank terms.
        freed = lora.partially_unload(cpu, memory_to_free=lora.loaded_size())
        assert freed > 0 and lora.lowvram_patch_counter() > 0
        patched = [m for m in int8_layers(lora).values() if m.weight_function]
        assert len(patched) == 5 and all(m.is_quantized and m._lowrank == () for m in patched)
        assert rel_err(y_full, run(lora, inputs, load=False)) < 1e-6
    finally:
        lora.unpatch_model(cpu)
    assert_codes_restored(base, snap)
    assert torch.equal(run(base, inputs), y_base)
    # Another strength: new LowVramPatch objects over patch lists of the same lengths must not reuse
    # the previous low-rank terms.
    base.detach()
    weaker = with_lora(base, 0.3)
    weaker.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        y_weak_lowvram = run(weaker, inputs, load=False)
    finally:
        weaker.unpatch_model(cpu)
    y_weak = run(weaker, inputs)
    assert rel_err(y_weak, y_weak_lowvram) < 1e-6 and rel_err(y_full, y_weak) > 1e-3


def test_force_patch_weights_folds_and_restores(files, inputs, unloaded):
    """Saving a model asks for patches baked into the weights: our patcher folds them densely there."""
    from comfyui_int8_convrot.nodes.loaders import load_unet
    base = load_unet(files["int8"], "w8a16")
    snap = snapshot_codes(base)
    lora = with_lora(base)
    y_lora = run(lora, inputs)
    base.detach()
    lora.detach()
    lora.patch_model(device_to=torch.device("cpu"), force_patch_weights=True)
    try:
        qkv = int8_layers(lora)["diffusion_model.layers.0.attention.qkv"]
        assert qkv.weight.dtype == torch.float32 and qkv._lowrank == ()
        sd = lora.model.diffusion_model.state_dict()
        assert "layers.0.attention.qkv.weight_scale" not in sd and "layers.0.attention.qkv.comfy_quant" not in sd
        assert sd["layers.0.attention.out.weight"].dtype == torch.int8        # no patch: still INT8 ConvRot
        assert "layers.0.attention.out.comfy_quant" in sd
        assert rel_err(y_lora, run(lora, inputs, load=False)) < 1e-5
    finally:
        lora.unpatch_model(torch.device("cpu"))
    assert_codes_restored(base, snap)


def test_weight_wrapper_sees_the_patched_weight(files, inputs, unloaded):
    """A weight wrapper (ModelPatcher.add_weight_wrapper, used by custom nodes) gets the LoRA-patched
    weight, as with ComfyUI's own layers: same output as the float reference with the same wrapper."""
    import comfy.sd
    from comfyui_int8_convrot.nodes.loaders import load_unet
    key = "diffusion_model.layers.0.attention.qkv.weight"

    def wrapped(patcher):
        p = with_lora(patcher)
        p.add_weight_wrapper(key, lambda w: w * 0.5)
        return p
    ref = run(wrapped(comfy.sd.load_diffusion_model(str(files["deq"]))), inputs)
    base = load_unet(files["int8"], "w8a16")
    snap = snapshot_codes(base)
    y = run(wrapped(base), inputs)
    assert rel_err(ref, y) < 1e-5, rel_err(ref, y)
    run(base, inputs)
    assert_codes_restored(base, snap)


def test_model_merge_of_two_int8_models(files, inputs, unloaded):
    """Stock ModelMergeSimple on two INT8 models: each side is dequantized with its own scales (the
    merged layers are dense), exactly like merging the two float models they encode."""
    import comfy.sd
    from comfy_extras.nodes_model_merging import ModelMergeSimple
    from comfyui_int8_convrot.nodes.loaders import load_unet

    def merge(a, b):
        return ModelMergeSimple().merge(a, b, 0.3)[0]
    ref = run(merge(comfy.sd.load_diffusion_model(str(files["deq"])),
                    comfy.sd.load_diffusion_model(str(files["deq_b"]))), inputs)
    a, b = load_unet(files["int8"], "w8a16"), load_unet(files["int8_b"], "w8a16")
    snap = snapshot_codes(a)
    y = run(merge(a, b), inputs)
    assert rel_err(ref, y) < 1e-5, rel_err(ref, y)
    run(a, inputs)
    assert_codes_restored(a, snap)
