"""The main job end to end on the built-in default model: make a Z-Image-shaped bf16 checkpoint,
convert it to INT8 ConvRot, run it through our loader and report speed, memory and error against
the bf16 original.

- With ComfyUI (a tree at `comfyui` / $COMFYUI_PATH): the full-width Z-Image layout (dim 3840, FFN
  10240, the 2 noise + 2 context refiner blocks, `n_layers` main blocks; ComfyUI detects it as
  Z-Image), loaded with ComfyUI's stock loader (bf16) and with the INT8 ConvRot UNET Loader's code
  path, one DiT forward each on the same seeded latent/conditioning.
- Without ComfyUI, the engine alone: every Linear the converter quantized runs as `Int8Linear`
  against its bf16 original on activations of the model's token count.

ComfyUI is imported here only inside `_run_comfyui` (this module stays importable without it).
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .quality import relative_error
from .synthetic import ZIMAGE_TINY, ZImageShape, iter_zimage


def _cos(ref: torch.Tensor, y: torch.Tensor) -> float:
    return F.cosine_similarity(ref.double().flatten(), y.double().flatten(), dim=0).item()


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def convert(src: Path, dst: Path, group_size: int, out) -> None:
    """The converter's streaming convert_file (the same engine as the CLI and the Converter node)."""
    from .convert import convert_file
    summary = convert_file(src, dst, preset="zimage", group_size=group_size, overwrite=True)
    out(summary.to_text())


def _write_source(path: Path, shape: ZImageShape, seed: int) -> None:
    from safetensors.torch import save_file
    save_file(dict(iter_zimage(shape, seed=seed)), str(path))


def run_model_demo(*, comfyui: str | os.PathLike | None = None, n_layers: int = 0, image_size: int = 256,
                   cap_tokens: int = 32, modes=("w8a16", "w8a8"), group_size: int = 64, seed: int = 0,
                   workdir: str | os.PathLike | None = None, device: str | None = None, out=print) -> dict:
    """Convert the built-in default model and run it through our loader; print and return a report.

    comfyui: a ComfyUI tree (default $COMFYUI_PATH); None/absent → the engine-only path.
    n_layers: main DiT blocks on top of the 4 fixed refiner blocks (Z-Image has 30).
    image_size: pixels per side of the sampled image (latent = size/8, tokens = (size/16)²).
    device: "cuda"/"cpu" (default: cuda if available). Returns {"path": "comfyui"|"engine", "results": [...]}.
    """
    comfy_path = comfyui if comfyui is not None else os.environ.get("COMFYUI_PATH")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        if comfy_path and (Path(comfy_path) / "comfy").is_dir():
            return _run_comfyui(Path(comfy_path), tmp, n_layers, image_size, cap_tokens, modes, group_size, seed,
                                device, out)
        out("ComfyUI not found (set COMFYUI_PATH): running the engine alone on the tiny Z-Image layout")
        return _run_engine(tmp, modes, group_size, seed, (image_size // 16) ** 2, device, out)


def _setup_comfyui(path: Path, device: str):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args
        comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management as mm
    return mm


def _run_comfyui(path, tmp, n_layers, image_size, cap_tokens, modes, group_size, seed, device, out) -> dict:
    mm = _setup_comfyui(path, device)
    import comfy.sd
    from ..nodes.loaders import load_unet

    shape = ZImageShape(n_layers=n_layers)
    src, dst = tmp / "zimage_bf16.safetensors", tmp / "zimage_int8_convrot.safetensors"
    t0 = time.perf_counter()
    _write_source(src, shape, seed)
    out(f"built-in model: Z-Image layout, dim {shape.dim}, FFN {shape.ffn}, {shape.n_layers} main + "
        f"{2 * shape.n_refiner} refiner blocks, {src.stat().st_size / 2**30:.2f} GiB bf16 "
        f"({time.perf_counter() - t0:.1f} s)")
    convert(src, dst, group_size, out)
    out(f"INT8 ConvRot file: {dst.stat().st_size / 2**30:.2f} GiB ({dst.stat().st_size / src.stat().st_size:.2f}x)")

    gen = torch.Generator().manual_seed(seed + 1)
    lat = image_size // 8
    x = torch.randn(1, 16, lat, lat, generator=gen)
    ctx = torch.randn(1, cap_tokens, shape.cap_feat_dim, generator=gen)
    t = torch.tensor([0.5])

    def measure(patcher):
        mm.load_models_gpu([patcher])
        dev = mm.get_torch_device()
        dm = patcher.model.diffusion_model
        dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
        args = (x.to(dev, dtype), t.to(dev), ctx.to(dev, dtype), cap_tokens)
        with torch.no_grad():
            dm(*args)   # warm-up (CPU prepack, kernel autotune)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            y = dm(*args)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else _peak_rss_gb()
        return y.float().cpu(), dt, patcher.model_size() / 2**30, peak, str(dtype).replace("torch.", "")

    results = []
    t0 = time.perf_counter()
    ref_patcher = comfy.sd.load_diffusion_model(str(src))
    kind = type(ref_patcher.model.model_config).__name__
    ref, dt_ref, mem_ref, peak_ref, dtype = measure(ref_patcher)
    results.append({"model": "bf16 file, stock", "seconds": dt_ref, "weights_gib": mem_ref, "peak_gib": peak_ref})
    del ref_patcher
    mm.unload_all_models()
    for mode in modes:
        p = load_unet(dst, mode)
        assert type(p.model.model_config).__name__ == kind
        y, dt, mem, peak, _ = measure(p)
        results.append({"model": f"INT8 ConvRot {mode}", "seconds": dt, "weights_gib": mem, "peak_gib": peak,
                        "rel_error": relative_error(y, ref), "cosine": _cos(ref, y)})
        del p
        mm.unload_all_models()
    tokens = (image_size // 16) ** 2
    out(f"ComfyUI detected: {kind}; one DiT forward at {image_size}x{image_size} ({tokens} image + {cap_tokens} "
        f"caption tokens), compute {dtype} on {mm.get_torch_device()}")
    peak_what = "peak GPU memory" if mm.get_torch_device().type == "cuda" else "process peak RSS (cumulative)"
    out(f"{'model':<24}{'forward s':>10}{'speed-up':>10}{'weights GiB':>13}{peak_what:>32}{'rel. err':>10}"
        f"{'cosine':>9}")
    for r in results:
        out(f"{r['model']:<24}{r['seconds']:>10.2f}{dt_ref / r['seconds']:>9.2f}x{r['weights_gib']:>13.3f}"
            f"{r['peak_gib']:>32.2f}{r.get('rel_error', 0):>10.4f}{r.get('cosine', 1):>9.5f}")
    out(f"total {time.perf_counter() - t0:.1f} s")
    return {"path": "comfyui", "detected": kind, "dtype": dtype, "results": results}


def _run_engine(tmp, modes, group_size, seed, tokens, device, out) -> dict:
    from .linear import Int8Linear
    from .loading import quantize_state_dict
    from .format import QUANT_SUFFIX, SCALE_SUFFIX, parse_layer_tensor
    dev = torch.device(device)
    src = dict(iter_zimage(ZIMAGE_TINY, seed=seed))
    t0 = time.perf_counter()
    q, rep = quantize_state_dict(dict(src), "zimage", group_size)
    out(f"quantized {rep['quantized']} Linear layers (preset zimage, g={group_size}) in "
        f"{time.perf_counter() - t0:.2f} s")
    gen = torch.Generator().manual_seed(seed + 1)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {m: {"seconds": 0.0, "errs": []} for m in modes}
    t_ref = 0.0
    bf16_bytes = int8_bytes = 0
    for key, w in src.items():
        qk = f"{key[: -len('.weight')]}{QUANT_SUFFIX}"
        if qk not in q:
            continue
        lq = parse_layer_tensor(q[qk])
        x = torch.randn(tokens, w.shape[1], generator=gen).to(dev, dtype)
        wf = w.to(dev, dtype)
        bf16_bytes += w.numel() * 2
        int8_bytes += q[key].numel() + q[f"{key[: -len('.weight')]}{SCALE_SUFFIX}"].numel() * 4
        t1 = time.perf_counter()
        ref = F.linear(x, wf)
        t_ref += time.perf_counter() - t1
        for mode in modes:
            lin = Int8Linear(q[key].to(dev), q[f"{key[: -len('.weight')]}{SCALE_SUFFIX}"].to(dev), None,
                             lq.group_size, mode)
            lin(x)
            t1 = time.perf_counter()
            y = lin(x)
            results[mode]["seconds"] += time.perf_counter() - t1
            results[mode]["errs"].append(relative_error(y, ref))
    out(f"{'Linear layers':<24}{'time s':>10}{'weights MiB':>13}{'mean rel. err':>15}{'worst':>10}")
    out(f"{'bf16 weights (' + str(dtype).replace('torch.', '') + ')':<24}{t_ref:>10.4f}{bf16_bytes / 2**20:>13.2f}")
    rows = []
    for mode, r in results.items():
        e = r["errs"]
        out(f"{'INT8 ConvRot ' + mode:<24}{r['seconds']:>10.4f}{int8_bytes / 2**20:>13.2f}"
            f"{sum(e) / len(e):>15.4f}{max(e):>10.4f}")
        rows.append({"model": f"INT8 ConvRot {mode}", "seconds": r["seconds"], "mean_rel_error": sum(e) / len(e),
                     "worst_rel_error": max(e)})
    return {"path": "engine", "results": rows, "bf16_seconds": t_ref, "bf16_bytes": bf16_bytes,
            "int8_bytes": int8_bytes}
