"""The pack's example_workflows/*.json (what ComfyUI's template browser lists for the pack), on a real
ComfyUI server whose model folders hold small stand-ins under the names the workflows use:

- the Z-Image Turbo / Base DiTs: the tiny Z-Image layout (dim 256; the test nodes complete its config),
  INT8 ConvRot, group 64; the bf16 original for the converter example;
- the Qwen3-4B text encoder: Qwen3's layout at width 256, 3 layers, the full 151936-token vocabulary,
  INT8 ConvRot with an INT8 embedding table (the seed's recipe);
- ae.safetensors: the Z-Image (Flux) VAE's real layout (16 latent channels), random weights;
- a small LoRA on two of the DiT's layers.

Each workflow loads in the real frontend with no missing node and nothing lost (its widgets_values
come back unchanged, and the frontend's own API conversion equals tests/workflow_api.py's), then runs
on the server: the JSON keeps the templates' settings, the test shrinks resolution and steps.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import browser
import comfy_env
import workflow_api

pytestmark = [pytest.mark.comfyui, pytest.mark.server]

WORKFLOWS = sorted((comfy_env.REPO / "example_workflows").glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
APP = "window.comfyAPI.app.app"
SCREENSHOTS = comfy_env.REPO / ".cache" / "screenshots"
# What the test changes before running (the JSON keeps the real settings): 64² instead of 1024², 2 steps.
SMALL = {"EmptySD3LatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}


def load(name: str) -> dict:
    return json.loads((comfy_env.REPO / "example_workflows" / f"{name}.json").read_text())


def flux_vae_state_dict() -> dict:
    """The Z-Image VAE's keys and shapes (Flux's AutoencoderKL: ch 128, ch_mult 1-2-4-4, 16 latent
    channels), from ComfyUI's own Encoder/Decoder, filled with small random weights."""
    comfy_env.setup_in_process()
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    cfg = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for prefix, module in (("encoder", Encoder(**cfg)), ("decoder", Decoder(**cfg))):
        for k, v in module.state_dict().items():
            if k.endswith("weight") and v.ndim > 1:
                t = torch.randn(v.shape, generator=gen) * (v[0].numel() ** -0.5)
            elif k.endswith("weight"):
                t = torch.ones(v.shape)      # norms
            else:
                t = torch.zeros(v.shape)
            sd[f"{prefix}.{k}"] = t.to(torch.bfloat16)
    return sd


def stand_ins(models: Path) -> None:
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, Qwen3Shape, iter_qwen3, iter_zimage
    for d in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / d).mkdir(parents=True, exist_ok=True)
    for name, seed in (("z_image_turbo", 7), ("z_image", 9)):
        sd = dict(iter_zimage(ZIMAGE_TINY, seed=seed))
        q, meta = comfy_env.int8_state_dict(sd, "zimage", 64)
        comfy_env.save_state_dict(models / "diffusion_models" / f"{name}_int8_convrot.safetensors", q, meta)
        if name == "z_image_turbo":
            comfy_env.save_state_dict(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", sd)
    te = dict(iter_qwen3(Qwen3Shape(hidden=256, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=128, ffn=768)))
    tq, tmeta = comfy_env.int8_state_dict(te, "qwen3", 64, include=("embed_tokens",))
    comfy_env.save_state_dict(models / "text_encoders" / "qwen_3_4b_int8_convrot.safetensors", tq, tmeta)
    comfy_env.save_state_dict(models / "vae" / "ae.safetensors", flux_vae_state_dict())
    gen = torch.Generator().manual_seed(8)
    lora = {}
    for name, (o, i) in {"layers.0.attention.qkv": (768, 256), "layers.1.feed_forward.w2": (256, 704)}.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.2 * torch.randn(o, 4, generator=gen)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.2 * torch.randn(4, i, generator=gen)
    comfy_env.save_state_dict(models / "loras" / "z_image_turbo_lora.safetensors", lora)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("wf_base")
    srv = comfy_env.ComfyServer(base)
    (base / "models" / "vae").mkdir(parents=True, exist_ok=True)
    stand_ins(base / "models")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    srv.start()
    srv.object_info = srv.get("/object_info")
    try:
        yield srv
    finally:
        srv.stop()


def shrink(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
    return prompt


# -- on the server ------------------------------------------------------------------------------

def test_template_browser_lists_the_examples(server):
    """ComfyUI serves a pack's example_workflows/ to its template browser, under the pack's folder name."""
    assert sorted(server.get("/workflow_templates")["ComfyUI-INT8-ConvRot"]) == NAMES
    for name in NAMES:
        assert server.get(f"/api/workflow_templates/ComfyUI-INT8-ConvRot/{name}.json") == load(name)


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_on_a_real_server(server, name):
    prompt = shrink(workflow_api.to_api(load(name), server.object_info))
    entry = server.run(prompt, timeout=600)
    outputs = entry["outputs"]
    if name == "convert_and_inspect":
        inspect_id = next(k for k, v in prompt.items() if v["class_type"] == "Int8ConvRotInspect")
        text = outputs[inspect_id]["text"][0]
        assert "diffusion_models/z_image_turbo_bf16_int8_convrot.safetensors" in text and "group 64" in text, text
        assert (server.base / "models/diffusion_models/z_image_turbo_bf16_int8_convrot.safetensors").is_file()
        assert outputs[inspect_id]["images"]
    else:
        save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
        images = outputs[save_id]["images"]
        assert len(images) == 1
        from PIL import Image
        img = Image.open(server.base / "output" / images[0]["subfolder"] / images[0]["filename"])
        assert img.size == (64, 64)


# -- in the real frontend -----------------------------------------------------------------------

@pytest.mark.browser
@pytest.mark.skipif(browser.chromium_path() is None, reason=browser.skip_reason())
def test_examples_load_in_the_real_frontend(server, tmp_path):
    ch = browser.Chromium(tmp_path / "profile", width=1600, height=1000)
    ch.start()
    try:
        asyncio.run(_load_each(server, ch, tmp_path))
    finally:
        ch.stop()


async def _load_each(server, chromium, out):
    async with chromium.page() as page:
        await page.navigate(server.url + "/")
        # Node types come in two waves: the server's, then the frontend's own (Note, ...) from its extensions.
        await page.wait_for(f"!!({APP}?.graph && window.LiteGraph?.registered_node_types?.Int8ConvRotUNETLoader "
                            "&& window.LiteGraph.registered_node_types.Note)", 120)
        for name in NAMES:
            wf = load(name)
            missing = await page.evaluate(f"{json.dumps(sorted({n['type'] for n in wf['nodes']}))}"
                                          ".filter(t => !window.LiteGraph.registered_node_types[t])")
            assert missing == [], (name, missing)
            # As the template browser opens it: fetched from the pack's template folder, then loaded.
            await page.evaluate(f"fetch('/api/workflow_templates/ComfyUI-INT8-ConvRot/{name}.json')"
                                f".then(r => r.json()).then(wf => {APP}.loadGraphData(wf, true, true, {json.dumps(name)}))"
                                ".then(() => true)")
            saved = json.loads(await page.evaluate(f"JSON.stringify({APP}.graph.serialize())"))
            got = {n["id"]: (n["type"], n.get("widgets_values") or []) for n in saved["nodes"]}
            want = {n["id"]: (n["type"], n.get("widgets_values") or []) for n in wf["nodes"]}
            assert got == want, name
            assert sorted(tuple(link[:5]) for link in saved["links"]) == sorted(tuple(link[:5]) for link in wf["links"])
            errors = await page.evaluate(f"{APP}.graph.nodes.filter(n => n.has_errors).map(n => n.type)")
            assert errors == [], (name, errors)
            # The frontend's own conversion ("Queue" builds it) is the helper's.
            theirs = json.loads(await page.evaluate(f"{APP}.graphToPrompt().then(p => JSON.stringify(p.output))"))
            theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in theirs.items()}
            assert theirs == workflow_api.to_api(wf, server.object_info), name
            await page.evaluate(f"(() => {{ const c = {APP}.canvas; c.ds.offset = [40, 60]; c.ds.scale = 0.8; "
                                "c.setDirty(true, true); return true; })()")
            await asyncio.sleep(0.5)
            shot = await page.screenshot(out / f"example_{name}.png")
            with contextlib.suppress(OSError):   # for people to look at
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, SCREENSHOTS / shot.name)
        ours = [e for e in page.errors if "int8_convrot" in e]
        assert not ours, ours
