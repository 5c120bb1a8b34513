"""Files written by ComfyUI's own model-save path (0.27+ saves INT8 ConvRot layers natively, with its
own layer JSON: format + convrot + convrot_groupsize, no orig_dtype/per_row, a full-checkpoint prefix)
load in our loader and inspect and badge as INT8 ConvRot with row scales."""
from __future__ import annotations

import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("comfyui_inference_mode")]


def test_a_file_saved_by_comfyui_loads_inspects_and_badges(comfy, tmp_path):
    if not comfy_env.has_native_int8():
        pytest.skip("this ComfyUI has no native INT8 ConvRot (0.27+): it cannot save such a file")
    import comfy.sd
    from comfyui_int8_convrot.engine.facts import file_facts
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    from comfyui_int8_convrot.nodes.loaders import load_unet
    from comfyui_int8_convrot.nodes.ops import count_quantized
    q, meta = comfy_env.int8_state_dict(dict(iter_zimage(ZIMAGE_TINY)), "zimage", 64)
    src = comfy_env.save_state_dict(tmp_path / "ours.safetensors", q, meta)
    saved = tmp_path / "saved_by_comfyui.safetensors"
    comfy.sd.save_checkpoint(str(saved), comfy.sd.load_diffusion_model(str(src)))   # stock native load + save
    facts = file_facts(saved)
    info, badge = facts["info"], facts["summary"]
    assert info["layers"]["int8_convrot"] == 30 and info["group_sizes"] == {"64": 30}, info
    assert info["scaling"] == {"row": 30}, info            # from the scale's shape: 0.29 writes no per_row
    assert badge["level"] == "ok" and badge["lines"][0] == "INT8 ConvRot · group 64 · row scales", badge
    from safetensors.torch import load_file
    a, b = load_file(str(src)), load_file(str(saved))
    prefix = "model.diffusion_model."
    for k in [k for k in a if k.endswith((".weight_scale",)) or a[k].dtype == torch.int8]:
        assert torch.equal(a[k].reshape(-1), b[prefix + k].reshape(-1)), k     # codes and scales bit for bit
    ours, ref = load_unet(saved, "w8a16", layers="pack"), load_unet(src, "w8a16", layers="pack")
    assert count_quantized(ours.model)[0] == 30
    gen = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 32, 32, generator=gen), torch.tensor([0.6]), torch.randn(1, 8, 256, generator=gen)
    import comfy.model_management as mm
    outs = []
    for p in (ref, ours):
        mm.load_models_gpu([p])
        with torch.no_grad():
            outs.append(p.model.diffusion_model(x, t, ctx, 8).double())
    # The float layers come back in the dtype ComfyUI saved them in; the INT8 ones are identical.
    assert ((outs[0] - outs[1]).norm() / outs[0].norm()).item() < 1e-3
