"""torch.compile on the GPU routes without a GPU: fake CUDA tensors (FakeTensorMode) on a simulated device
(tests/device_sim.py), traced by dynamo with fullgraph=True. Every per-call decision (route, mode, backend,
LoRA fusion, dot dtype, shared memory) must be a constant for dynamo, so each route traces as ONE graph
holding the ops that route runs; nothing here executes a kernel (the graphs run on fake tensors)."""
from __future__ import annotations

import pytest
import torch

import device_sim
from comfyui_int8_convrot.engine import linear as L
from comfyui_int8_convrot.kernels import backends, quantize_weight

pytestmark = pytest.mark.slow


@pytest.fixture
def simulated(monkeypatch):
    def on(capability, rocm=False, int_mm_ok=True):
        is_available = torch.cuda.is_available   # dynamo asks CUDA for its RNG state when this says True
        device_sim.gpu(monkeypatch, capability, rocm=rocm)
        monkeypatch.setattr(torch.cuda, "is_available", is_available)
        device_sim.int_mm(monkeypatch, int_mm_ok)
        from comfyui_int8_convrot.kernels.triton import gemm_configs
        monkeypatch.setattr(gemm_configs, "device_smem_limit",
                            lambda device: gemm_configs.SMEM_OPTIN.get(tuple(capability), gemm_configs.SMEM_DEFAULT))
    yield on
    backends.route.cache_clear()


def _trace(fn, *args):
    """(graphs, the ops they call) of fn compiled with fullgraph=True on fake CUDA tensors."""
    import torch._dynamo
    from torch._subclasses.fake_tensor import FakeTensorMode
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = [torch.empty(a.shape, dtype=a.dtype, device="cuda") for a in args]
            torch.compile(fn, backend=record, fullgraph=True)(*fake)
    except Exception as exc:   # older torch: some fake CUDA ops initialise CUDA (not a graph break)
        if "NVIDIA driver" not in str(exc) and "CUDA driver version" not in str(exc):
            raise
        pytest.skip(f"torch {torch.__version__}'s fake CUDA tensors need a CUDA driver for this trace")
    finally:
        torch._dynamo.reset()
    targets = {getattr(n.target, "__name__", "") if str(n.target).startswith("<") else str(n.target)
               for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    return len(graphs), targets


def _layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes, scale = quantize_weight(torch.randn(256, 256, generator=gen), 64)
    terms = L.LowRankSet((L.LowRankTerm(torch.randn(8, 256, generator=gen) * 0.1,
                                        torch.randn(256, 8, generator=gen) * 0.1, 0.5),))
    return codes, scale, terms


# (capability, ROCm, ops expected in the graph without / with a LoRA)
ROUTES = [
    ((8, 6), False, "int8_convrot.int8_gemm_rescale", "int8_convrot.int8_gemm_rescale_lora"),
    ((9, 0), False, "int8_convrot.int8_gemm_rescale", "int8_convrot.int8_gemm_rescale"),  # LoRA after
    ((7, 5), False, "_int_mm", "_int_mm"),
    ((12, 0), False, "_int_mm", "_int_mm"),
    ((10, 3), True, "_int_mm", "_int_mm"),       # RDNA2, _int_mm probe passes
]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("cap,rocm,op,lora_op", ROUTES, ids=lambda v: str(v))
def test_gpu_route_traces_as_one_graph(simulated, cap, rocm, op, lora_op, lora):
    simulated(cap, rocm)
    codes, scale, terms = _layer()

    def forward(x, c, s):
        return L.int8_forward(x, c, s, None, 64, "auto", None, terms if lora else ())

    graphs, ops = _trace(forward, torch.empty(64, 256, dtype=torch.bfloat16), codes, scale)
    assert graphs == 1
    assert (lora_op if lora else op) in ops, sorted(ops)


def test_w8a16_route_traces_as_one_graph(simulated):
    simulated((7, 0), int_mm_ok=False)     # below sm_75: no int8 GEMM (the real probe says so), W8A16
    codes, scale, terms = _layer()
    graphs, ops = _trace(lambda x, c, s: L.int8_forward(x, c, s, None, 64, "auto", None, terms),
                         torch.empty(64, 256, dtype=torch.float16), codes, scale)
    assert graphs == 1 and "linear" in ops and not any("int8_convrot" in o or "_int_mm" in o for o in ops), sorted(ops)
