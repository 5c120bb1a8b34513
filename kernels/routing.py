"""Who computes W8A8 INT8 on a device, and why: one pure decision from the device's facts.

kernels/backends.py gathers the facts (torch, Triton, comfy-kitchen) and caches the answer per device;
this module only decides, so tests walk the whole table without the hardware.

- NVIDIA sm_80/86/89/90, where every Triton config was compiled and checked (bench/aot_check.py): our Triton.
- Any other GPU torch calls "cuda" (NVIDIA sm_75, sm_100, sm_120, ...; AMD under ROCm, whose "capability"
  is the gfx version, e.g. (9, 4) MI300, (11, 0) RDNA3, (12, 0) RDNA4): comfy-kitchen's HIP int8_linear where
  it registered for this GPU, else torch._int_mm where it works, else none (W8A16). Our Triton configs were
  chosen for NVIDIA shared memory and MMA shapes and are not run where they were not checked.
- CPU: the pack's CPU int8 GEMM.
- Apple MPS, Intel XPU, DirectML and anything else: none, W8A16 (weights dequantized on the fly, one byte
  per weight at rest). MPS: torch 2.15 registers `_int_mm_mps` (native_functions.yaml; pytorch#193153), a
  private op without documentation. Its fast path (Metal Performance Primitives matmul2d, macOS 26.2+) needs
  a row-major (K, N) int8 right operand, which our (N, K) codes are not without a second, transposed copy;
  everything else takes a 16×16 tiled Metal kernel, which pytorch#198182 measures 6–10x slower than MPS's
  float matmul on an M4 Max. No measurement shows it beating the bf16 GEMM that W8A16 runs, so it is not
  used (revisit with a measurement on Apple hardware). XPU: torch has `_int_mm_xpu` (oneDNN), also unmeasured
  against XPU's bf16 GEMM here, so not used either.
"""
from __future__ import annotations

from dataclasses import dataclass

# Capabilities whose Triton configs bench/aot_check.py compiles and checks (TARGETS there; a test keeps them
# a subset of it, so adding a target there is what makes it eligible here).
TRITON_CHECKED = ((8, 0), (8, 6), (8, 9), (9, 0))


@dataclass(frozen=True)
class DeviceFacts:
    type: str                              # torch device type: "cuda", "cpu", "mps", "xpu", "privateuseone", ...
    rocm: bool = False                     # torch.version.hip is set: a "cuda" device is an AMD GPU
    capability: tuple[int, int] | None = None
    name: str = ""                         # "sm_86", "gfx1100", ...
    triton: tuple[bool, str] = (False, "")  # Triton usable (and why not)
    hip_int8: tuple[bool, str] = (False, "")  # comfy-kitchen's HIP backend serves int8_linear here (why not)
    int_mm: tuple[bool, str] = (False, "")  # torch._int_mm works here (why not)


@dataclass(frozen=True)
class Route:
    w8a8: str | None       # "triton" | "ck_hip" | "int_mm" | "cpu" | None (no W8A8 here: W8A16)
    why: str
    fallback: str | None = None   # for "ck_hip": what runs a call its HIP backend declines (None: W8A16)

    def describe(self, where: str) -> str:
        if self.w8a8 is None:
            return (f"{where}: W8A16 (weights dequantized on the fly, one byte per weight at rest, LoRA exact); "
                    f"W8A8 is not used because {self.why}")
        return f"{where}: W8A8 by {LABELS[self.w8a8]} ({self.why})"


LABELS = {"triton": "the pack's Triton kernels", "ck_hip": "comfy-kitchen's HIP int8_linear",
          "int_mm": "torch._int_mm", "cpu": "the pack's CPU int8 GEMM"}

_OTHER_DEVICES = {
    "mps": "torch's int8 matmul on MPS (torch._int_mm, 2.15+) is undocumented and not measured faster than "
           "the bf16 GEMM W8A16 runs (see kernels/routing.py)",
    "xpu": "torch._int_mm on XPU is not measured faster than XPU's bf16 GEMM, and the pack's Triton kernels "
           "are compiled and checked for NVIDIA only",
    "privateuseone": "DirectML offers torch no int8 GEMM",
}


def _checked() -> str:
    return "/".join(f"{a}{b}" for a, b in TRITON_CHECKED)


def decide(f: DeviceFacts) -> Route:
    """The route for a device with these facts (pure: the table in the module docstring)."""
    if f.type == "cpu":
        return Route("cpu", "measured faster than the alternatives on CPU")
    if f.type != "cuda":
        return Route(None, _OTHER_DEVICES.get(f.type, f"no int8 GEMM is known for device type {f.type!r}"))
    if not f.rocm and f.capability in TRITON_CHECKED and f.triton[0]:
        return Route("triton", f"NVIDIA {f.name}: Triton configs compiled and checked for it")
    if f.rocm:
        why = f"AMD {f.name}: the pack's Triton configs were compiled and checked for NVIDIA sm_{_checked()} only"
    elif f.capability in TRITON_CHECKED:
        why = f"NVIDIA {f.name}: {f.triton[1]}"
    elif f.capability is not None and f.capability < (8, 0):
        why = f"NVIDIA {f.name}: Triton emits no int8 MMA below sm_80"
    else:
        why = f"NVIDIA {f.name}: the pack's Triton configs were compiled and checked for sm_{_checked()} only"
    fallback = "int_mm" if f.int_mm[0] else None
    if f.hip_int8[0]:
        return Route("ck_hip", f"{why}; comfy-kitchen's HIP backend serves int8_linear on this GPU", fallback)
    if fallback:
        return Route("int_mm", f"{why}; {f.hip_int8[1] or 'no comfy-kitchen HIP backend'}")
    return Route(None, f"{why}; {f.hip_int8[1] or 'no comfy-kitchen HIP backend'}; {f.int_mm[1]}")


__all__ = ["DeviceFacts", "LABELS", "Route", "TRITON_CHECKED", "decide"]
