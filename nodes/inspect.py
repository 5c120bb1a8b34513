"""The "INT8 ConvRot Inspect" node: what a file (or a loaded MODEL) is and how good its INT8 layers
are, as a text report and a per-layer error chart. The numbers come from engine/quality.py, the
chart from engine/plot.py; this module only picks the inputs and renders.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..engine.errors import Int8ConvRotError
from ..engine.facts import badge_text, file_facts
from ..engine.plot import plot_quality
from ..engine.quality import analyze, count_file_layers, iter_file_layers, iter_module_layers, SourceWeights
from .errors import shown_as

FOLDERS = ("diffusion_models", "text_encoders")
NONE = "none"
MODES = ["w8a8", "w8a16"]


def file_options() -> list[str]:
    """Every model file of the folders, as 'folder/name' (the web badge splits it the same way)."""
    return [f"{folder}/{name}" for folder in FOLDERS for name in folder_paths.get_filename_list(folder)]


def resolve(value: str) -> str:
    folder, _, name = value.partition("/")
    if folder not in FOLDERS or not name:
        raise Int8ConvRotError(f"{value!r} is not 'folder/file' with folder one of {', '.join(FOLDERS)}")
    return folder_paths.get_full_path_or_raise(folder, name)


def from_file_name(name: str) -> str:
    """'folder/name' for a bare file name from the Converter, found in the first folder that lists it."""
    for folder in FOLDERS:
        if name in folder_paths.get_filename_list(folder):
            return f"{folder}/{name}"
    raise Int8ConvRotError(f"{name!r} is in none of {', '.join(FOLDERS)}")


def image_tensor(img) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one: float32 [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


class _Progress:
    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int, name: str):
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(max(1, total))
        self.bar.update_absolute(done, max(1, total))


class Int8ConvRotInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = file_options()
        return io.Schema(
            node_id="Int8ConvRotInspect",
            display_name="INT8 ConvRot Inspect",
            category="loaders/INT8 ConvRot",
            description="What a model file is (format, group size, scaling, layers, size vs bf16) and how much each "
                        "INT8 layer loses: a text report and a per-layer error chart. Without the bf16 source the "
                        "errors are estimated from the codes and scales; with it they are measured, plus the output "
                        "error on random activations.",
            inputs=[
                io.Combo.Input("file", options=[NONE] + files, default=files[0] if files else NONE,
                               tooltip="The file to inspect (diffusion_models/ or text_encoders/). 'none': inspect "
                                       "the connected MODEL instead."),
                io.Combo.Input("bf16_source", options=[NONE] + files, default=NONE, optional=True,
                               tooltip="The bf16/fp16 original the file was converted from: measures the real "
                                       "weight error and the output error on random activations (slower: reads "
                                       "both files)."),
                io.Model.Input("model", optional=True,
                               tooltip="A MODEL from INT8 ConvRot UNET Loader; inspected when file is 'none'."),
                io.String.Input("file_name", optional=True, force_input=True,
                                tooltip="A file name as the Converter's file_name output gives it (looked up in "
                                        "diffusion_models, then text_encoders); when connected it replaces 'file', "
                                        "so a graph can convert and then inspect the new file."),
                io.Int.Input("tokens", default=64, min=1, max=4096, optional=True,
                             tooltip="Random activation rows per layer for the output error (with a source)."),
                io.Combo.Input("compute", options=MODES, default="w8a8", optional=True,
                               tooltip="w8a8: activations quantized per token too (what 'auto' uses for images on "
                                       "RTX 30+ GPUs); w8a16: the weight error alone."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True, control_after_generate=False,
                             tooltip="Seed of the random activations."),
            ],
            outputs=[io.String.Output("report", display_name="report"),
                     io.Image.Output("plot", display_name="plot")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, file=NONE, bf16_source=NONE, **kwargs):
        """Re-run when a chosen file changes on disk under the same name (a connected file_name comes from
        a Converter upstream, whose own re-run re-runs this node)."""
        out = []
        for value in (file, bf16_source):
            try:
                st = os.stat(resolve(value)) if value and value != NONE else None
            except (Int8ConvRotError, OSError, FileNotFoundError):
                st = None
            out.append((value, st.st_size, st.st_mtime_ns) if st else (value,))
        return tuple(out)

    @classmethod
    def execute(cls, file=NONE, bf16_source=NONE, model=None, tokens=64, compute="w8a8", seed=0,
                file_name=None) -> io.NodeOutput:
        if file_name:
            file = from_file_name(file_name)
        names = {}
        for value in (file, bf16_source):
            if value and value != NONE and "/" in value:
                try:
                    names[resolve(value)] = value
                except (Int8ConvRotError, FileNotFoundError):
                    pass
        with shown_as(names):
            return cls._run(file, bf16_source, model, tokens, compute, seed)

    @classmethod
    def _run(cls, file, bf16_source, model, tokens, compute, seed) -> io.NodeOutput:
        progress = _Progress()
        source = SourceWeights(resolve(bf16_source)) if bf16_source and bf16_source != NONE else None
        level = None
        try:
            kwargs = dict(source_name=bf16_source if source else None, tokens=tokens, mode=compute, seed=seed,
                          progress=progress)
            if file and file != NONE:
                path = resolve(file)
                facts = file_facts(path, file)
                summary = facts["summary"]
                header = [facts["report"], "  verdict: " + badge_text(summary).replace("\n", "\n    ")]
                level = summary["level"]
                # A file the loaders refuse (the badge's red) is not analysed: its layers may be incomplete.
                layers = iter(()) if summary["refusal"] else iter_file_layers(path)
                total = 0 if summary["refusal"] else count_file_layers(path)
                report = analyze(layers, source, total=total, **kwargs)
                title = file
            elif model is not None:
                diffusion_model = getattr(model.model, "diffusion_model", model.model)
                layers = list(iter_module_layers(diffusion_model))
                header = [f"MODEL ({type(model.model).__name__}): {len(layers)} INT8 layers as loaded "
                          "(LoRA patches are not part of the codes)"]
                report = analyze(iter(layers), source, total=len(layers), **kwargs)
                title = f"MODEL {type(model.model).__name__}"
            else:
                raise Int8ConvRotError("choose a file, or set file to 'none' and connect a MODEL from INT8 ConvRot "
                                       "UNET Loader")
        finally:
            if source is not None:
                source.close()
        text = "\n".join(header + [report.to_text()])
        image = image_tensor(plot_quality(report, title))
        preview = ui.PreviewImage(image, cls=cls).as_dict()
        if level is None:   # a loaded MODEL: the loaders took it, so never red
            level = "warn" if any(r.scaling == "tensor" for r in report.layers) or not report.layers else "ok"
        if report.layers or not (file and file != NONE):
            lines = report.headline()
        else:   # nothing measured (refused, or no INT8 layers): the verdict and the loaders' reason instead
            lines = summary["lines"][:1] + summary["warnings"][:1]
        badge = {"level": level, "lines": lines}
        return io.NodeOutput(text, image, ui={**preview, "text": [text], "int8_convrot": [badge]})


NODES = [Int8ConvRotInspect]

__all__ = ["NODES", "Int8ConvRotInspect", "file_options"]
