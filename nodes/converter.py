"""The converter nodes: "INT8 ConvRot Converter" (a model file in the models folders -> an INT8
ConvRot file beside it) and "INT8 ConvRot Save Model" (a MODEL, e.g. with LoRAs applied -> a file in
diffusion_models). Both run engine/convert.py; this module only maps ComfyUI's world onto it:
folders and names, the progress bar, the Cancel button, the file list cache.
"""
from __future__ import annotations

import logging
import os
import re

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..engine.convert import convert_file, save_state_dict
from ..engine.errors import OutputPathError
from ..engine.policy import EMBEDDINGS_INCLUDE, TENSOR_SCALING_WARNING, detect_preset, get_policy
from ..kernels.hadamard import VALID_GROUP_SIZES
from .errors import shown_as

log = logging.getLogger(__name__)

CATEGORY = "loaders/INT8 ConvRot"
FOLDERS = ("diffusion_models", "text_encoders")
SUFFIX = "_int8_convrot.safetensors"
PRESETS = ["auto", "zimage", "qwen3", "generic"]
DEVICES = ["auto", "cpu", "gpu"]
PROGRESS_STEPS = 1000
PRESET_TOOLTIP = ("Which layers become INT8: 'zimage' (the same choice as convert-to-quant --zimage), 'qwen3' (the "
                  "Z-Image text encoder: embeddings and head kept), 'generic' (every Linear whose input divides by "
                  "the group size). 'auto' detects it from the tensor names.")
GROUP_TOOLTIP = "ConvRot group size (a power of 4). 64 is what Z-Image INT8 ConvRot files use."
SCALING_TOOLTIP = "row: one scale per output row (recommended). tensor: one per matrix, " + TENSOR_SCALING_WARNING


def model_choices() -> list[str]:
    """'diffusion_models/<name>' and 'text_encoders/<name>' for every .safetensors file in those folders."""
    out = []
    for folder in FOLDERS:
        out += [f"{folder}/{n}" for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors")]
    return out


def split_choice(choice: str) -> tuple[str, str]:
    folder, _, name = choice.partition("/")
    if folder not in FOLDERS or not name:
        raise OutputPathError(f"{choice!r} is not a model of {' or '.join(FOLDERS)}",
                              hint="pick a file from the list (refresh it with R)")
    return folder, name


_BAD_NAME = re.compile(r'[\x00-\x1f<>:"|?*]')


def sanitize_name(name: str, default: str) -> str:
    """A bare file name ending in .safetensors: no folders, no '..', no hidden or control characters."""
    name = (name or "").strip() or default
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name) or os.sep in name:
        raise OutputPathError(f"the output name {name!r} contains a path separator",
                              hint="give a plain file name; the file goes into the model's own folder")
    if name in (".", "..") or name.startswith(".") or _BAD_NAME.search(name) or len(name) > 200:
        raise OutputPathError(f"the output name {name!r} is not a valid file name",
                              hint="use letters, digits, spaces, '-', '_' and '.'; no leading dot")
    stem, ext = os.path.splitext(name)
    if ext.lower() != ".safetensors":
        if ext.lower() in (".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft"):
            raise OutputPathError(f"the output name {name!r} must end in .safetensors")
        name += ".safetensors"
    return name


def output_path(src: str, folder: str, name: str) -> str:
    """The output beside the input; refuse anything that would land outside the models folder."""
    dst = os.path.join(os.path.dirname(src), name)
    roots = [os.path.realpath(p) for p in folder_paths.get_folder_paths(folder)]
    real = os.path.realpath(os.path.dirname(dst))
    if not any(real == r or real.startswith(r + os.sep) for r in roots):
        raise OutputPathError("the output would be written outside the models folder", path=dst)
    return dst


def list_name(folder: str, path: str) -> str:
    """The name under which the loaders list `path` (relative to its models folder)."""
    real = os.path.realpath(path)
    for root in folder_paths.get_folder_paths(folder):
        root = os.path.realpath(root)
        if real.startswith(root + os.sep):
            return os.path.relpath(real, root).replace(os.sep, "/")
    return os.path.basename(path)


def refresh_file_list(folder: str) -> None:
    """Make a new file show in the loaders' lists at once (the cache keys on folder mtimes)."""
    folder_paths.filename_list_cache.pop(folder, None)


def resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    dev = comfy.model_management.get_torch_device()
    if device == "gpu" and dev.type != "cuda":
        raise OutputPathError("'gpu' was chosen but ComfyUI runs without a CUDA device", hint="choose auto or cpu")
    return str(dev) if dev.type == "cuda" else "cpu"


class ComfyProgress:
    """The converter's byte progress on a ComfyUI progress bar; Cancel raises from here, and the
    converter then removes its temp file."""

    def __init__(self):
        self.bar = comfy.utils.ProgressBar(PROGRESS_STEPS)
        self.last = -1

    def __call__(self, done: int, total: int, name: str) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        step = PROGRESS_STEPS * done // total if total else PROGRESS_STEPS
        if step != self.last:
            self.last = step
            self.bar.update_absolute(step)
            # A Cancel pressed during this update (the last one included) still stops the conversion.
            comfy.model_management.throw_exception_if_processing_interrupted()


def _group_options():
    return [str(g) for g in VALID_GROUP_SIZES]


def _finish(folder: str, dst: str, summary) -> io.NodeOutput:
    refresh_file_list(folder)
    comfy.model_management.soft_empty_cache()
    text = summary.to_text()
    log.info("%s", text)
    return io.NodeOutput(list_name(folder, dst), text, ui=ui.PreviewText(text))


class Int8ConvRotConverter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Int8ConvRotConverter",
            display_name="INT8 ConvRot Converter",
            category=CATEGORY,
            description="Convert a bf16/fp16/fp32/fp8 model file to INT8 ConvRot, one tensor at a time, into the "
                        "same folder. The file is the one convert-to-quant writes (identical codes).",
            inputs=[
                io.Combo.Input("model", options=model_choices(),
                               tooltip="A model in diffusion_models or text_encoders (ComfyUI full checkpoints: "
                                       "only the diffusion model is converted)."),
                io.Combo.Input("preset", options=PRESETS, default="auto", tooltip=PRESET_TOOLTIP),
                io.Combo.Input("group_size", options=_group_options(), default="64", tooltip=GROUP_TOOLTIP),
                io.Combo.Input("scaling", options=["row", "tensor"], default="row", tooltip=SCALING_TOOLTIP),
                io.String.Input("output_name", default="",
                                tooltip=f"File name in the model's folder; empty: <model name>{SUFFIX}"),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace the output file if it exists."),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="auto: ComfyUI's GPU when there is one, else the CPU."),
                io.Boolean.Input("quantize_embeddings", default=False, optional=True,
                                 tooltip="Also quantize the token-embedding table (Qwen3's embed_tokens: 0.39 GB "
                                         "instead of 0.78 GB; convert-to-quant's layout). Off: kept in bf16."),
            ],
            outputs=[io.String.Output("file_name", tooltip="The new file, as the INT8 ConvRot loaders list it"),
                     io.String.Output("summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, preset, group_size, scaling, output_name, overwrite, device,
                quantize_embeddings=False) -> io.NodeOutput:
        folder, name = split_choice(model)
        src = folder_paths.get_full_path_or_raise(folder, name)
        stem = os.path.splitext(os.path.basename(name))[0]
        dst = output_path(src, folder, sanitize_name(output_name, stem + SUFFIX))
        with shown_as({src: name, dst: os.path.basename(dst)}):
            summary = convert_file(src, dst, preset=None if preset == "auto" else preset,
                                   group_size=int(group_size), scaling=scaling, device=resolve_device(device),
                                   overwrite=overwrite, include=(EMBEDDINGS_INCLUDE,) if quantize_embeddings else (),
                                   progress=ComfyProgress())
        return _finish(folder, dst, summary)


def _save_folder() -> str:
    paths = folder_paths.get_folder_paths("diffusion_models")
    for p in paths:
        if os.path.basename(os.path.normpath(p)) == "diffusion_models" and os.path.isdir(p):
            return p
    for p in paths:
        if os.path.isdir(p):
            return p
    os.makedirs(paths[0], exist_ok=True)
    return paths[0]


def model_state_dict(model) -> dict:
    """The diffusion model's weights with every patch (LoRA, merges) applied, as ComfyUI saves a
    checkpoint. INT8 ConvRot layers loaded by this pack come back as int8 codes with their scale and
    comfy_quant (or, when a patch touched them, dense): the engine keeps or re-quantizes them."""
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    return model.model.diffusion_model.state_dict()


class Int8ConvRotSaveModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Int8ConvRotSaveModel",
            display_name="INT8 ConvRot Save Model",
            category=CATEGORY,
            description="Write a MODEL (for instance after LoRAs were applied) as an INT8 ConvRot file in "
                        "diffusion_models, with the converter's engine.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("file_name", default="model" + SUFFIX,
                                tooltip="File name in the diffusion_models folder"),
                io.Combo.Input("preset", options=["auto", "zimage", "generic"], default="auto", tooltip=PRESET_TOOLTIP),
                io.Combo.Input("group_size", options=_group_options(), default="64", tooltip=GROUP_TOOLTIP),
                io.Combo.Input("scaling", options=["row", "tensor"], default="row", tooltip=SCALING_TOOLTIP),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace the file if it exists."),
            ],
            outputs=[io.String.Output("file_name"), io.String.Output("summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, file_name, preset, group_size, scaling, overwrite) -> io.NodeOutput:
        folder = "diffusion_models"
        dst = os.path.join(_save_folder(), sanitize_name(file_name, "model" + SUFFIX))
        with shown_as({dst: os.path.basename(dst)}):
            if os.path.exists(dst) and not overwrite:   # before the (long) patching of the model
                raise OutputPathError("the output file exists already", path=dst,
                                      hint="choose another name, or allow overwriting")
            sd = model_state_dict(model)
            reason = "chosen"
            if preset == "auto":
                preset, reason = detect_preset(sd.keys())
                reason = f"detected: {reason}"
            summary = save_state_dict(sd, dst, get_policy(preset, int(group_size), scaling),
                                      device=resolve_device("auto"), overwrite=overwrite, progress=ComfyProgress(),
                                      preset_reason=reason)
        return _finish(folder, dst, summary)


NODES = [Int8ConvRotConverter, Int8ConvRotSaveModel]
