"""How torch.compile sees an INT8 ConvRot Linear on this stack: graphs and graph breaks per case (dynamo's
explain), one line each and a summary line. Every case should be 1 graph, 0 breaks: ComfyUI's
TorchCompileModel then compiles our layers whole. The tests assert the same with fullgraph=True
(tests/kernels/test_compile_layer.py, test_compile_gpu_routes.py); this prints the numbers for the
stack matrix (scripts/stacks.sh).

Usage: TRITON_INTERPRET=1 python bench/compile_graphs.py    (exit 1 if any case breaks its graph)
Triton cases run under the interpreter on CPU (with the tests' interpreter shims for older Triton, named
when applied) and are left out where Triton cannot run.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from comfyui_int8_convrot.engine import linear as L  # noqa: E402
from comfyui_int8_convrot.kernels import quantize_weight, triton_status, use_backend  # noqa: E402
from comfyui_int8_convrot.kernels.cpu_int8_gemm import backend as cpu_gemm  # noqa: E402


def cases():
    """(name, mode, forced backend, with a LoRA) that this machine can run."""
    out = [("w8a16", "w8a16", None, False), (f"auto on CPU ({cpu_gemm()})", "auto", None, False),
           ("auto on CPU + LoRA (added after)", "auto", None, True), ("w8a8 reference", "w8a8", "reference", False)]
    if triton_status()[0] and os.environ.get("TRITON_INTERPRET") == "1":
        out += [("w8a8 Triton (interpreter)", "w8a8", "triton", False),
                ("w8a8 Triton + fused LoRA (interpreter)", "w8a8", "triton", True)]
    return out


def explain(mode: str, backend: str | None, lora: bool):
    import torch._dynamo
    gen = torch.Generator().manual_seed(0)
    codes, scale = quantize_weight(torch.randn(96, 128, generator=gen), 64)
    bias = torch.randn(96, generator=gen)
    terms = L.LowRankSet((L.LowRankTerm(torch.randn(8, 128, generator=gen) * 0.1,
                                        torch.randn(96, 8, generator=gen) * 0.1, 0.5),)) if lora else ()
    cache = L.PrepackCache()

    def forward(x):
        return L.int8_forward(x, codes, scale, bias, 64, mode, cache, terms)

    torch._dynamo.reset()
    with use_backend(backend) if backend else contextlib.nullcontext():
        result = torch._dynamo.explain(forward)(torch.randn(2, 24, 128, generator=gen))
    torch._dynamo.reset()
    return result.graph_count, result.graph_break_count, [str(b.reason).splitlines()[0] for b in result.break_reasons]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_status()[0]:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import triton_compat
        for line in triton_compat.install():
            print(f"Triton interpreter shim (from tests/triton_compat.py): {line}")
    rows = []
    for name, mode, backend, lora in cases():
        graphs, breaks, reasons = explain(mode, backend, lora)
        rows.append((graphs, breaks))
        print(f"{name}: {graphs} graph(s), {breaks} break(s)" + (f" ({reasons[0][:120]})" if reasons else ""))
    whole = sum(1 for g, b in rows if g == 1 and b == 0)
    print(f"torch.compile: {whole} of {len(rows)} cases one graph, "
          f"{sum(b for _, b in rows)} breaks (torch {torch.__version__})")
    return 0 if whole == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
