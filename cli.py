"""`int8-convrot`: convert checkpoints to INT8 ConvRot and inspect safetensors files.

    int8-convrot convert IN.safetensors OUT.safetensors [--preset zimage|qwen3|generic]
                 [--group-size 64] [--scaling row|tensor] [--device auto|cpu|cuda]
                 [--include REGEX]... [--exclude REGEX]... [--overwrite] [--quiet] [--json]
    int8-convrot inspect FILE [--json]

Exit codes: 0 ok, 2 bad input or option (one line on stderr saying what and what to do),
130 interrupted (no output file is left behind), 1 unexpected error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PROG = "int8-convrot"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exit code is 2 as well; keep its one-line style
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="INT8 ConvRot checkpoints: convert (file-compatible with convert-to-quant) "
                                       "and inspect.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("convert", help="convert a bf16/fp16/fp32/fp8 checkpoint to INT8 ConvRot",
                       description="Convert a bf16/fp16/fp32/fp8 safetensors checkpoint (or a ComfyUI full "
                                   "checkpoint's diffusion model) to INT8 ConvRot, one tensor at a time.")
    c.add_argument("input", help="input .safetensors file (never modified)")
    c.add_argument("output", help="output .safetensors file (written to a temp file, renamed when complete)")
    c.add_argument("--preset", choices=("zimage", "qwen3", "generic"),
                   help="which layers to quantize (default: detected from the tensor names)")
    c.add_argument("--group-size", type=int, default=64, help="ConvRot group size, a power of 4 (default 64)")
    c.add_argument("--scaling", choices=("row", "tensor"), default="row",
                   help="one scale per output row (default, recommended) or per matrix")
    c.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda[:N]")
    c.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="also quantize Linear weights matching REGEX that the preset keeps (repeatable)")
    c.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep tensors matching REGEX as they are (repeatable; wins over --include)")
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    i = sub.add_parser("inspect", help="report what a safetensors file holds",
                       description="Report a safetensors file's format, layers, group sizes, dtypes and size.")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _progress_bar(quiet: bool):
    """A tqdm bar in input bytes, created on the first report (nothing shows for a refused input)."""
    if quiet:
        return None, (lambda: None)
    from tqdm import tqdm
    state: dict = {}

    def update(done: int, total: int, name: str):
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                                      file=sys.stderr, dynamic_ncols=True, mininterval=0.25)
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(done - bar.n)

    def close():
        if "bar" in state:
            state["bar"].close()
    return update, close


def _convert(args) -> int:
    from .engine.convert import convert_file
    from .engine.policy import TENSOR_SCALING_WARNING
    if args.scaling == "tensor":
        print(f"{PROG}: warning: {TENSOR_SCALING_WARNING}", file=sys.stderr)
    progress, close = _progress_bar(args.quiet or args.json)
    try:
        summary = convert_file(args.input, args.output, preset=args.preset, group_size=args.group_size,
                               scaling=args.scaling, device=args.device, include=args.include,
                               exclude=args.exclude, overwrite=args.overwrite, progress=progress)
    finally:
        close()
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.to_text())
    return 0


def _inspect(args) -> int:
    from .engine.facts import badge_text, file_facts
    facts = file_facts(args.file, args.file)
    if args.json:
        print(json.dumps({**facts["info"], "verdict": facts["summary"]}, indent=2))
    else:   # the badge's verdict: the same check the loaders run (engine/verdict.py)
        verdict = badge_text(facts["summary"]).replace("\n", "\n    ")
        print(facts["report"] + f"\n  verdict ({facts['summary']['level']}): " + verdict)
    return 0


def main(argv=None) -> int:
    """Run the CLI. Called with argv=None (the installed command), it ends the process itself with
    os._exit once the output is flushed: torch's and the CUDA libraries' teardown would add about a
    second and touch ~180 MB of library pages for nothing. Called with a list (tests), it returns."""
    if argv is None:
        code = _main(None)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return _main(argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from .engine.errors import Int8ConvRotError
    try:
        return _convert(args) if args.command == "convert" else _inspect(args)
    except Int8ConvRotError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output file was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
