"""A real ComfyUI server (`main.py --cpu`) with the pack in custom_nodes, driven over HTTP.

One server for the module (start-up ~10 s): our nodes are registered, a workflow
"INT8 ConvRot UNET Loader → KSampler (1 step) → SaveLatent" runs and its latent matches the same
workflow on the bf16 original through ComfyUI's stock UNETLoader, Z-Image at full width is detected
and sampled, and the Converter node's output loads in the same server.
Conditioning comes from a test-only node (tests/comfy_test_nodes): Z-Image's text encoder is 8 GB.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse

import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.comfyui, pytest.mark.server]

UNET_DIR = "models/diffusion_models"


def tiny_files(base):
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_TINY, iter_zimage
    sd = dict(iter_zimage(ZIMAGE_TINY, seed=7))
    q, meta = comfy_env.int8_state_dict(sd, "zimage", 64)
    comfy_env.save_state_dict(base / UNET_DIR / "tiny_zimage_bf16.safetensors", sd)
    comfy_env.save_state_dict(base / UNET_DIR / "tiny_zimage_int8.safetensors", q, meta)
    gen = torch.Generator().manual_seed(8)
    lora = {}
    for name, (o, i) in {"layers.0.attention.qkv": (768, 256), "layers.1.feed_forward.w2": (256, 704)}.items():
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.2 * torch.randn(o, 4, generator=gen)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.2 * torch.randn(4, i, generator=gen)
    comfy_env.save_state_dict(base / "models/loras/tiny_lora.safetensors", lora)
    from comfyui_int8_convrot.engine.synthetic import Qwen3Shape, iter_qwen3
    te = dict(iter_qwen3(Qwen3Shape(hidden=256, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=128, ffn=768)))
    tq, tmeta = comfy_env.int8_state_dict(te, "qwen3", 64, include=("embed_tokens",))   # ctq's TE layout
    comfy_env.save_state_dict(base / "models/text_encoders/tiny_qwen3_int8.safetensors", tq, tmeta)


def stock_zimage_int8(path):
    """Z-Image at full width (dim 3840, FFN 10240, the fixed 2+2 refiner blocks, 0 main layers) as an
    INT8 ConvRot file. Quantized layers get random codes and N(0, 1/in)-sized row scales directly (a
    server smoke test needs the layout and magnitudes, not trained weights; quantizing 0.7 B random
    weights would take most of a minute on 2 cores)."""
    from comfyui_int8_convrot.engine.policy import get_policy
    from comfyui_int8_convrot.engine.synthetic import ZIMAGE_STOCK
    s, d = ZIMAGE_STOCK, ZIMAGE_STOCK.dim
    gen = torch.Generator().manual_seed(0)
    policy = get_policy("zimage", group_size=64)
    shapes = {"x_pad_token": (1, d), "cap_pad_token": (1, d), "x_embedder.weight": (d, 64), "x_embedder.bias": (d,),
              "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.0.bias": (1024,),
              "t_embedder.mlp.2.weight": (256, 1024), "t_embedder.mlp.2.bias": (256,),
              "cap_embedder.0.weight": (s.cap_feat_dim,), "cap_embedder.1.weight": (d, s.cap_feat_dim),
              "cap_embedder.1.bias": (d,), "final_layer.linear.weight": (64, d), "final_layer.linear.bias": (64,),
              "final_layer.adaLN_modulation.1.weight": (d, 256), "final_layer.adaLN_modulation.1.bias": (d,)}
    for kind in ("noise_refiner", "context_refiner"):
        for i in range(2):
            p = f"{kind}.{i}"
            shapes |= {f"{p}.attention.qkv.weight": (3 * d, d), f"{p}.attention.out.weight": (d, d),
                       f"{p}.attention.q_norm.weight": (128,), f"{p}.attention.k_norm.weight": (128,),
                       f"{p}.feed_forward.w1.weight": (s.ffn, d), f"{p}.feed_forward.w2.weight": (d, s.ffn),
                       f"{p}.feed_forward.w3.weight": (s.ffn, d)}
            shapes |= {f"{p}.{n}.weight": (d,) for n in ("attention_norm1", "ffn_norm1", "attention_norm2",
                                                          "ffn_norm2")}
            if kind == "noise_refiner":
                shapes |= {f"{p}.adaLN_modulation.0.weight": (4 * d, 256), f"{p}.adaLN_modulation.0.bias": (4 * d,)}
    sd, layers = {}, {}
    for name, shape in shapes.items():
        lq = policy.decide(name, shape, torch.bfloat16)
        if lq is None:
            if len(shape) == 1 and "norm" in name:
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.02)
            sd[name] = t.to(torch.bfloat16)
            continue
        p = name[: -len(".weight")]
        sd[name] = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
        sd[f"{p}.weight_scale"] = torch.full((shape[0], 1), 1.7 / (127 * shape[1] ** 0.5))
        sd[f"{p}.comfy_quant"] = lq.to_tensor()
        layers[p] = lq
    from comfyui_int8_convrot.engine.format import build_metadata
    comfy_env.save_state_dict(path, sd, build_metadata(layers))
    assert len(layers) == 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    srv = comfy_env.ComfyServer(base)
    tiny_files(base)
    stock_zimage_int8(base / UNET_DIR / "zimage_full_width_int8.safetensors")
    srv.start()
    yield srv
    srv.stop()


def sample_workflow(loader: dict, width: int, size: int = 64, seed: int = 0) -> dict:
    return {
        "1": loader,
        "2": {"class_type": "Int8ConvRotTestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": width}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"latents/{seed}"}},
    }


def int8_loader(name, compute="auto", quantize="off"):
    return {"class_type": "Int8ConvRotUNETLoader",
            "inputs": {"unet_name": name, "compute": compute, "quantize_on_load": quantize, "group_size": "64"}}


def saved_latent(server, entry) -> torch.Tensor:
    from safetensors.torch import load_file
    files = entry["outputs"]["5"]["latents"]
    assert len(files) == 1
    f = files[0]
    path = server.base / "output" / f["subfolder"] / f["filename"]
    lat = load_file(str(path))["latent_tensor"]
    assert torch.isfinite(lat).all()
    return lat.float()


def combo_options(spec) -> list:
    """A combo input's options in /object_info: V1 lists them first, V3 as ["COMBO", {"options": ...}]."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_nodes_registered(server):
    info = server.get("/object_info")
    unet, clip = info["Int8ConvRotUNETLoader"], info["Int8ConvRotCLIPLoader"]
    assert unet["display_name"] == "INT8 ConvRot UNET Loader"
    assert clip["display_name"] == "INT8 ConvRot CLIP Loader"
    req = unet["input"]["required"]
    assert "tiny_zimage_int8.safetensors" in combo_options(req["unet_name"])
    assert combo_options(req["compute"]) == ["auto", "w8a8", "w8a16"]
    assert "auto" in combo_options(req["quantize_on_load"])
    assert "lumina2" in combo_options(clip["input"]["required"]["type"])
    assert unet["output"] == ["MODEL"] and clip["output"] == ["CLIP"]


def test_unet_loader_ksampler_savelatent(server):
    ours = saved_latent(server, server.run(sample_workflow(int8_loader("tiny_zimage_int8.safetensors"), 256, seed=11)))
    stock = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_zimage_bf16.safetensors",
                                                       "weight_dtype": "default"}}
    ref = saved_latent(server, server.run(sample_workflow(stock, 256, seed=11)))
    assert ours.shape == ref.shape == (1, 16, 8, 8)
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, cos   # one Euler step of the INT8 model vs its bf16 original (measured > 0.999)


def test_quantize_on_load_in_server(server):
    lat = saved_latent(server, server.run(sample_workflow(
        int8_loader("tiny_zimage_bf16.safetensors", "w8a16", "auto"), 256, seed=12)))
    assert lat.shape == (1, 16, 8, 8)


def test_full_width_zimage(server):
    """Z-Image's real widths: ComfyUI detects it as Z-Image from the INT8 file and samples one step."""
    entry = server.run(sample_workflow(int8_loader("zimage_full_width_int8.safetensors", "w8a16"), 2560, size=64,
                                       seed=13), timeout=300)
    assert saved_latent(server, entry).shape == (1, 16, 8, 8)
    assert "as ZImage" in server.log_tail(200_000)


def test_bad_file_reports_a_clear_error(server):
    with pytest.raises(RuntimeError, match="not an INT8 ConvRot file"):
        server.run(sample_workflow(int8_loader("tiny_zimage_bf16.safetensors"), 256, seed=14))


def failed_node(server, workflow: dict, timeout: float = 120) -> dict:
    """The execution_error ComfyUI recorded for a workflow that must fail (its exception_type/_message
    are what the UI shows)."""
    import time
    import uuid
    pid = server.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{pid}").get(pid)
        if entry is not None:
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            assert entry["status"]["status_str"] == "error" and errors, entry["status"]
            return errors[0]
        time.sleep(0.25)
    raise TimeoutError(server.log_tail())


def test_node_error_names_the_class_and_the_listed_file(server):
    """ComfyUI names a node's exception by module + class; a custom node's module is its folder's
    absolute path. The pack's node errors read 'FileFormatError' and the file as the list shows it."""
    import shutil
    damaged = server.base / UNET_DIR / "sub" / "damaged_int8.safetensors"
    damaged.parent.mkdir(exist_ok=True)
    shutil.copy(server.base / UNET_DIR / "tiny_zimage_int8.safetensors", damaged)
    raw = damaged.read_bytes()
    damaged.write_bytes(raw[: len(raw) // 2])
    for name, words in [("tiny_zimage_bf16.safetensors", "not an INT8 ConvRot file"),
                        ("sub/damaged_int8.safetensors", "file is truncated")]:
        err = failed_node(server, sample_workflow(int8_loader(name), 256, seed=16))
        assert err["exception_type"] == "FileFormatError", err["exception_type"]
        assert err["exception_message"].startswith(f"{name}: ") and words in err["exception_message"]
        assert str(server.base) not in err["exception_message"]
        # The badge says the same: red, with the same reason.
        q = urllib.parse.urlencode({"folder": "diffusion_models", "name": name})
        try:
            status, payload = 200, server.get(f"/int8_convrot/inspect?{q}")
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, json.loads(exc.read())
        if status == 200:
            assert payload["summary"]["level"] == "bad"
        else:
            assert status == 422 and payload["error"] == err["exception_message"].strip()   # ComfyUI adds a newline


def test_converter_then_loader(server):
    """The Converter node writes an INT8 ConvRot file from the bf16 one; the UNET loader then samples
    from it in the same server, exactly as from the file made by the same engine outside ComfyUI."""
    info = server.get("/object_info")
    if "Int8ConvRotConverter" not in info:
        pytest.skip("converter node not yet available")
    conv = {"1": {"class_type": "Int8ConvRotConverter", "inputs": {
        "model": "diffusion_models/tiny_zimage_bf16.safetensors", "preset": "auto", "group_size": "64",
        "scaling": "row", "output_name": "converted_in_server.safetensors", "overwrite": False, "device": "auto"}}}
    server.run(conv)
    assert (server.base / UNET_DIR / "converted_in_server.safetensors").is_file()
    a = saved_latent(server, server.run(sample_workflow(int8_loader("converted_in_server.safetensors", "w8a16"),
                                                         256, seed=15)))
    b = saved_latent(server, server.run(sample_workflow(int8_loader("tiny_zimage_int8.safetensors", "w8a16"),
                                                         256, seed=15)))
    assert torch.equal(a, b)


def test_lora_then_save_model_then_load(server):
    """UNET loader → stock LoraLoaderModelOnly → sample; the same LoRA'd model written by the
    "INT8 ConvRot Save Model" node (patches folded, then re-quantized) loads and samples alike."""
    info = server.get("/object_info")
    if "Int8ConvRotSaveModel" not in info:
        pytest.skip("save-model node not yet available")
    with_lora = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["10", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
    wf = sample_workflow(with_lora, 256, seed=16)
    wf["10"] = int8_loader("tiny_zimage_int8.safetensors", "w8a16")
    lat_lora = saved_latent(server, server.run(wf))
    lat_base = saved_latent(server, server.run(sample_workflow(int8_loader("tiny_zimage_int8.safetensors", "w8a16"),
                                                                256, seed=16)))
    save = {"10": wf["10"], "1": with_lora,
            "2": {"class_type": "Int8ConvRotSaveModel", "inputs": {
                "model": ["1", 0], "file_name": "tiny_with_lora.safetensors", "preset": "zimage",
                "group_size": "64", "scaling": "row", "overwrite": True}}}
    server.run(save)
    lat_saved = saved_latent(server, server.run(sample_workflow(int8_loader("tiny_with_lora.safetensors", "w8a16"),
                                                                 256, seed=16)))

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos(lat_lora, lat_saved) > 0.999 and cos(lat_lora, lat_base) < cos(lat_lora, lat_saved)


# -- ComfyUI with native INT8 (0.27+): the stock loaders and ours side by side on the same files ----

def text_workflow(te_loader: dict, unet_loader: dict, lora: bool, seed: int) -> dict:
    """TE loader → CLIPTextEncode → KSampler on the tiny Z-Image (caption width 256 = the tiny TE's)."""
    model = ["1", 0]
    wf = {
        "1": unet_loader,
        "6": te_loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 0], "text": "a photo of a cat on a mat"}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"latents/t{seed}"}},
    }
    if lora:
        wf["7"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
        model = ["7", 0]
    wf["4"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}}
    return wf


@pytest.mark.parametrize("lora", [False, True])
def test_stock_and_our_loaders_side_by_side(server, lora):
    """On a ComfyUI that reads INT8 ConvRot itself, its stock UNETLoader + CLIPLoader and our two loaders
    sample the same files (INT8 DiT, INT8 text encoder with an INT8 embedding table) alike, with a LoRA too."""
    if not comfy_env.has_native_int8():
        pytest.skip("this ComfyUI has no native INT8 ConvRot (0.27+): nothing to compare against")
    stock = text_workflow({"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny_qwen3_int8.safetensors",
                                                                  "type": "lumina2", "device": "default"}},
                          {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_zimage_int8.safetensors",
                                                                  "weight_dtype": "default"}}, lora, seed=21)
    ours = text_workflow({"class_type": "Int8ConvRotCLIPLoader", "inputs": {
        "clip_name": "tiny_qwen3_int8.safetensors", "type": "lumina2", "compute": "auto", "quantize_on_load": "off",
        "group_size": "64"}}, int8_loader("tiny_zimage_int8.safetensors"), lora, seed=21)
    a, b = saved_latent(server, server.run(stock)), saved_latent(server, server.run(ours))
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > 0.99, cos
    if lora:
        base = saved_latent(server, server.run(text_workflow(ours["6"], ours["1"], False, seed=21)))
        assert torch.nn.functional.cosine_similarity(base.flatten(), b.flatten(), dim=0).item() < 0.9995
