"""The main job inside a real ComfyUI: the full-width Z-Image layout (dim 3840, FFN 10240, the 2 noise +
2 context refiner blocks, `n_layers` main blocks; ComfyUI detects it as Z-Image), converted with the
streaming converter, then one DiT forward each on the same seeded latent/conditioning: the bf16 file
through ComfyUI's stock loader, the INT8 file through the stock loader where this ComfyUI reads INT8
ConvRot natively, and through the INT8 ConvRot UNET Loader in each compute mode.

It sits above the nodes (it imports them); the engine-only half is `demo.engine_run`.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

import torch.nn.functional as F

from ..engine.quality import relative_error
from ..engine.synthetic import ZImageShape
from ..kernels.backends import cpu_has_amx
from .engine_run import build_and_convert

# Up to this many tokens the demo also times comfy-kitchen's own CPU path (without the pack's kernels).
CPU_STOCK_TOKENS = 64


def cosine(ref: torch.Tensor, y: torch.Tensor) -> float:
    return F.cosine_similarity(ref.double().flatten(), y.double().flatten(), dim=0).item()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _setup_comfyui(path: Path, device: str):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args
        comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management as mm
    return mm


def run_comfyui_demo(path, tmp, *, n_layers: int = 0, image_size: int = 256, cap_tokens: int = 32,
                     modes=("w8a16", "w8a8"), group_size: int = 64, seed: int = 0, device: str = "cpu",
                     out=print) -> dict:
    """Convert the full-width built-in model in `tmp` and run it in the ComfyUI tree at `path`."""
    mm = _setup_comfyui(Path(path), device)
    import comfy.sd
    from ..nodes.loaders import load_unet
    from ..nodes.native import has_native_int8

    shape = ZImageShape(n_layers=n_layers)
    src, dst, _ = build_and_convert(Path(tmp), shape, group_size, seed, out)

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
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else peak_rss_gb()
        return y.float().cpu(), dt, patcher.model_size() / 2**30, peak, str(dtype).replace("torch.", "")

    results = []
    t0 = time.perf_counter()
    ref_patcher = comfy.sd.load_diffusion_model(str(src))
    kind = type(ref_patcher.model.model_config).__name__
    ref, dt_ref, mem_ref, peak_ref, dtype = measure(ref_patcher)
    results.append({"model": "bf16 file, stock", "seconds": dt_ref, "weights_gib": mem_ref, "peak_gib": peak_ref})
    del ref_patcher
    mm.unload_all_models()
    if has_native_int8():
        # What this ComfyUI does with the same file by itself (its stock loader, native INT8 on comfy-kitchen's
        # own kernels), and the same with the pack's comfy-kitchen backend serving it.
        from ..nodes import ck_registration
        registered = ck_registration.state()["registered"]
        tokens = (image_size // 16) ** 2 + cap_tokens
        for label, pack in (("INT8 file, stock loader", False), ("stock loader + pack kernels", True)):
            if pack and not registered:
                continue
            if (not pack and registered and mm.get_torch_device().type == "cpu" and tokens > CPU_STOCK_TOKENS
                    and not cpu_has_amx()):
                # comfy-kitchen's CPU int8 GEMM (torch._int_mm) runs at ~1 GOP/s without AMX: minutes per forward.
                out(f"(stock comfy-kitchen CPU row skipped at {tokens} tokens: its torch._int_mm GEMM takes minutes "
                    f"per forward on a CPU; --image-size 64 includes it)")
                continue
            if registered:
                ck_registration.set_enabled(pack)
            p = comfy.sd.load_diffusion_model(str(dst))
            y, dt, mem, peak, _ = measure(p)
            results.append({"model": label, "seconds": dt, "weights_gib": mem, "peak_gib": peak,
                            "rel_error": relative_error(y, ref), "cosine": cosine(ref, y)})
            del p
            mm.unload_all_models()
        if registered:
            ck_registration.set_enabled(True)
    for mode in modes:
        p = load_unet(dst, mode)
        assert type(p.model.model_config).__name__ == kind
        y, dt, mem, peak, _ = measure(p)
        results.append({"model": f"INT8 ConvRot loader {mode}", "seconds": dt, "weights_gib": mem, "peak_gib": peak,
                        "rel_error": relative_error(y, ref), "cosine": cosine(ref, y)})
        del p
        mm.unload_all_models()
    tokens = (image_size // 16) ** 2
    out(f"ComfyUI detected: {kind}; one DiT forward at {image_size}x{image_size} ({tokens} image + {cap_tokens} "
        f"caption tokens), compute {dtype} on {mm.get_torch_device()}")
    peak_what = "peak GPU memory" if mm.get_torch_device().type == "cuda" else "process peak RSS (cumulative)"
    out(f"{'model':<28}{'forward s':>10}{'speed-up':>10}{'weights GiB':>13}{peak_what:>32}{'rel. err':>10}"
        f"{'cosine':>9}")
    for r in results:
        out(f"{r['model']:<28}{r['seconds']:>10.2f}{dt_ref / r['seconds']:>9.2f}x{r['weights_gib']:>13.3f}"
            f"{r['peak_gib']:>32.2f}{r.get('rel_error', 0):>10.4f}{r.get('cosine', 1):>9.5f}")
    out(f"total {time.perf_counter() - t0:.1f} s")
    return {"path": "comfyui", "detected": kind, "dtype": dtype, "results": results}
