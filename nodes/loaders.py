"""The loader nodes: "INT8 ConvRot UNET Loader" (diffusion models) and "INT8 ConvRot CLIP Loader"
(text encoders), on ComfyUI's own loading path with our operations class.

ComfyUI detects the architecture exactly as it does for the bf16 original (the file keeps every
key and shape; only `weight_scale` / `comfy_quant` entries are added), builds the model with
`make_ops(mode)` so each Linear holds int8 codes, and returns a patcher that LoraLoader can clone.
"""
from __future__ import annotations

import logging
import time

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..engine.errors import Int8ConvRotError
from ..engine.loading import check_int8_consumed, count_quantizable, int8_tensor_keys, prepare_state_dict
from ..engine.verdict import loader_check
from .errors import shown_as
from .native import dynamic_vram_active, has_native_int8, memory_mode
from .ops import Int8ModelPatcher, count_quantized, load_context, make_ops

log = logging.getLogger(__name__)

COMPUTE_MODES = ["auto", "w8a8", "w8a16"]
COMPUTE_TOOLTIP = ("auto: INT8×INT8 GEMM (w8a8) where the device has fast int8 and the batch is large, else "
                   "w8a16. w8a8: activations quantized per token, int8 GEMM (fastest on RTX 30/40/50 and "
                   "data-center GPUs). w8a16: weights dequantized on the fly, activations stay bf16/fp16 "
                   "(saves memory, not time).")
QUANTIZE_UNET = ["off", "auto", "zimage", "generic"]
QUANTIZE_TE = ["off", "auto", "qwen3", "generic"]
QUANTIZE_TOOLTIP = ("For a bf16/fp16/fp8 file: quantize its Linear layers to INT8 ConvRot while loading (nothing "
                    "is written to disk). 'auto' picks the preset from the tensor names. 'off': the file must "
                    "already be INT8 ConvRot. Ignored for INT8 ConvRot files.")
GROUP_SIZES = ["64", "16", "256"]
LAYERS = ["auto", "pack", "native"]
LAYERS_TOOLTIP = ("Which INT8 layers run the model. pack: this pack's (exact LoRA, INT8 embeddings, every ComfyUI; "
                  "ComfyUI's classic model management). native: ComfyUI's own INT8 ConvRot layers (0.27+: dynamic "
                  "VRAM, ComfyUI's LoRA re-quantization, kernels from this pack where its comfy-kitchen backend is "
                  "on). auto: native where ComfyUI streams the model with dynamic VRAM (NVIDIA, 0.29+), else pack.")


def resolve_layers(layers: str = "auto") -> tuple[str, str]:
    """("pack" | "native", why) for the loaders' `layers` choice on this ComfyUI and device."""
    if layers not in LAYERS:
        raise Int8ConvRotError(f"unknown layers choice {layers!r}", hint=f"choose one of {LAYERS}")
    native = has_native_int8()
    if layers == "native":
        if not native:
            raise Int8ConvRotError("this ComfyUI has no native INT8 ConvRot layers (they arrived in 0.27)",
                                   hint="choose layers 'pack' (or 'auto'), or update ComfyUI")
        return "native", "chosen"
    if layers == "pack":
        return "pack", "chosen"
    if native and dynamic_vram_active():
        return "native", "auto: ComfyUI streams this model with dynamic VRAM, which needs its own layers"
    return "pack", ("auto: no native INT8 in this ComfyUI" if not native else
                    "auto: no dynamic VRAM on this device, and the pack's layers are faster and keep LoRA exact")


class _Progress:
    """ComfyUI progress bar over load phases: quantized tensors (quantize on load) and loaded layers."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.done = 0

    def tick(self):
        self.done += 1
        self.bar.update_absolute(self.done)

    def finish(self):
        self.bar.update_absolute(self.bar.total)


def _quant_device():
    dev = comfy.model_management.get_torch_device()
    return dev if dev.type == "cuda" else torch.device("cpu")


def _read(path, quantize, group_size, kind: str):
    # The badge's own check (engine/verdict.py), before reading gigabytes: a file it shows red is refused here.
    summary = loader_check(path, quantize)
    t0 = time.perf_counter()
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    to_quantize = count_quantizable(sd, quantize, group_size) if summary.int8_layers == 0 and quantize not in (
        None, "off") else 0
    n_linear = sum(1 for k, t in sd.items() if k.endswith(".weight") and t.dim() == 2)
    progress = _Progress(to_quantize + n_linear)
    sd, report = prepare_state_dict(sd, metadata, path=path, quantize=quantize, group_size=group_size,
                                    device=_quant_device(), on_tensor=progress.tick)
    report["read_s"] = time.perf_counter() - t0
    report["int8_keys"] = int8_tensor_keys(sd)   # checked after the build: every one read by an INT8 layer
    if report["quantized_on_load"]:
        log.info("INT8 ConvRot: quantized %d %s layers on load (preset %s, group size %d) in %.1f s",
                 report["quantized_on_load"], kind, report["preset"], group_size, report["read_s"])
    return sd, metadata, progress, report


def _check_loaded(model: torch.nn.Module, path, report):
    q, n = count_quantized(model)
    if q == 0:
        raise Int8ConvRotError("no INT8 ConvRot layer reached the model (the file's layer names do not match "
                               "the detected architecture)", path=path)
    if q < report.get("int8_layers", q):
        log.warning("INT8 ConvRot: %s: %d INT8 layers in the file, %d used by the model", path,
                    report["int8_layers"], q)
    return q, n


def load_unet(path, mode: str = "auto", quantize: str | None = None, group_size: int = 64,
              layers: str = "auto"):
    """Load a diffusion model from an INT8 ConvRot file (or quantize a float one on load) with the pack's
    layers or ComfyUI's native ones (`layers`, see LAYERS_TOOLTIP); returns a ModelPatcher."""
    choice, why = resolve_layers(layers)
    ops = make_ops(mode)
    sd, metadata, progress, report = _read(path, quantize, group_size, "diffusion model")
    options = {"custom_operations": ops} if choice == "pack" else {}
    with load_context(path, progress.tick) as ctx:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata)
    if patcher is None:
        raise Int8ConvRotError("ComfyUI could not detect the model type", path=path,
                               hint="is this a diffusion model (not a text encoder, VAE or LoRA)?")
    if choice == "pack":
        check_int8_consumed(report["int8_keys"], ctx.consumed, path)
        q, n = _check_loaded(patcher.model, path, report)
        patcher = _adopt(patcher)
        what = f"{q}/{n} layers int8 (pack layers, compute {mode})"
    else:
        what = f"ComfyUI's native INT8 layers (compute chosen by ComfyUI; '{mode}' applies to pack layers only)"
    progress.finish()
    log.info("INT8 ConvRot: loaded %s as %s: %s, %.2f GB; layers %s (%s); memory: %s", path,
             type(patcher.model.model_config).__name__, what, patcher.model_size() / 1e9, choice, why,
             memory_mode(patcher))
    return patcher


def _adopt(patcher) -> Int8ModelPatcher:
    """Our patcher (exact LoRA on pack layers) in place of ComfyUI's; it is a classic ModelPatcher, so a
    dynamic-VRAM patcher is replaced on purpose and the log says so."""
    if dynamic_vram_active(patcher.load_device) and not isinstance(patcher, Int8ModelPatcher):
        log.info("INT8 ConvRot: pack layers use ComfyUI's classic model management instead of dynamic VRAM "
                 "(choose layers 'native' or 'auto' for dynamic VRAM)")
    return Int8ModelPatcher.adopt(patcher)


def _forget_loaded(patcher) -> None:
    """Unload `patcher` from ComfyUI's loaded-model list before a new patcher takes over its model."""
    loaded = getattr(comfy.model_management, "current_loaded_models", [])
    for i in reversed(range(len(loaded))):
        if loaded[i].model is patcher:
            loaded.pop(i).model_unload()


def clip_types() -> list[str]:
    """The CLIP type list of the running ComfyUI's own CLIPLoader (so both stay in sync)."""
    import nodes
    return list(nodes.CLIPLoader.INPUT_TYPES()["required"]["type"][0])


def load_text_encoder(path, clip_type: str = "lumina2", mode: str = "auto", quantize: str | None = None,
                      group_size: int = 64, device: str = "default", model_options: dict | None = None,
                      layers: str = "auto"):
    """Load a text encoder (CLIP object) from an INT8 ConvRot file (or quantize a float one on load) with
    the pack's layers or ComfyUI's native ones (`layers`).

    `model_options` adds to what ComfyUI's text-encoder loading accepts (e.g. `qwen3_4b_model_config`)."""
    choice, why = resolve_layers(layers)
    ctype = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
    if ctype is None:
        raise Int8ConvRotError(f"unknown CLIP type {clip_type!r}", hint=f"choose one of {clip_types()}")
    model_options = dict(model_options or {})
    if device == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    if choice == "pack":
        model_options["custom_operations"] = make_ops(mode)
        # Built on the offload device: the patcher is replaced below, before anything is loaded.
        model_options["initial_device"] = model_options.get("offload_device",
                                                            comfy.model_management.text_encoder_offload_device())
    sd, _metadata, progress, report = _read(path, quantize, group_size, "text encoder")
    with load_context(path, progress.tick) as ctx:
        clip = comfy.sd.load_text_encoder_state_dicts([sd], embedding_directory=folder_paths.get_folder_paths(
            "embeddings"), clip_type=ctype, model_options=model_options)
    if choice == "pack":
        check_int8_consumed(report["int8_keys"], ctx.consumed, path)
        q, n = _check_loaded(clip.cond_stage_model, path, report)
        _forget_loaded(clip.patcher)  # CLIP() may have loaded it already (load device == initial device)
        clip.patcher = _adopt(clip.patcher)
        what = f"{q}/{n} layers int8 (pack layers, compute {mode})"
    else:
        what = "ComfyUI's native INT8 layers"
    progress.finish()
    log.info("INT8 ConvRot: loaded text encoder %s: %s; layers %s (%s); memory: %s", path, what, choice, why,
             memory_mode(clip.patcher))
    return clip


class Int8ConvRotUNETLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Int8ConvRotUNETLoader",
            display_name="INT8 ConvRot UNET Loader",
            category="loaders/INT8 ConvRot",
            description="Loads an INT8 ConvRot diffusion model (Z-Image, Lumina2, ...) from models/diffusion_models "
                        "with INT8 compute; LoRA loaders work on its output.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models")),
                io.Combo.Input("compute", options=COMPUTE_MODES, default="auto", tooltip=COMPUTE_TOOLTIP),
                io.Combo.Input("quantize_on_load", options=QUANTIZE_UNET, default="off", tooltip=QUANTIZE_TOOLTIP),
                io.Combo.Input("group_size", options=GROUP_SIZES, default="64",
                               tooltip="ConvRot group size for quantize on load (64 for Z-Image)."),
                io.Combo.Input("layers", options=LAYERS, default="auto", tooltip=LAYERS_TOOLTIP, optional=True),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, compute="auto", quantize_on_load="off", group_size="64",
                layers="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        with shown_as({path: unet_name}):
            return io.NodeOutput(load_unet(path, compute, quantize_on_load, int(group_size), layers))


class Int8ConvRotCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        types = clip_types()
        return io.Schema(
            node_id="Int8ConvRotCLIPLoader",
            display_name="INT8 ConvRot CLIP Loader",
            category="loaders/INT8 ConvRot",
            description="Loads an INT8 ConvRot text encoder (e.g. Z-Image's Qwen3-4B) from models/text_encoders; "
                        "its Linear layers run in INT8.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders")),
                io.Combo.Input("type", options=types, default="lumina2" if "lumina2" in types else types[0]),
                io.Combo.Input("compute", options=COMPUTE_MODES, default="auto", tooltip=COMPUTE_TOOLTIP),
                io.Combo.Input("quantize_on_load", options=QUANTIZE_TE, default="off", tooltip=QUANTIZE_TOOLTIP),
                io.Combo.Input("group_size", options=GROUP_SIZES, default="64",
                               tooltip="ConvRot group size for quantize on load (64 for Qwen3-4B)."),
                io.Combo.Input("device", options=["default", "cpu"], default="default", optional=True),
                io.Combo.Input("layers", options=LAYERS, default="auto", tooltip=LAYERS_TOOLTIP, optional=True),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name, type="lumina2", compute="auto", quantize_on_load="off", group_size="64",
                device="default", layers="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        with shown_as({path: clip_name}):
            return io.NodeOutput(load_text_encoder(path, type, compute, quantize_on_load, int(group_size), device,
                                                   layers=layers))


NODES = [Int8ConvRotUNETLoader, Int8ConvRotCLIPLoader]

__all__ = ["NODES", "Int8ConvRotCLIPLoader", "Int8ConvRotUNETLoader", "clip_types", "load_text_encoder", "load_unet"]
