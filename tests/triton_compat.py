"""Test-only shims so Triton's CPU interpreter runs our kernels on the older Triton releases users have.
The product never imports this: on a GPU none of it applies, and the product code runs unchanged here.

Each shim is applied only where its defect is detected (by reading Triton's own code, not its version),
and says so in one line of the pytest header (tests/conftest.py):
- Triton < 3.7 with numpy >= 2.4: the interpreter turns a loop bound into an int with `int(array)` on a
  1-element array, which numpy 2.4 rejects ("only 0-dimensional arrays can be converted"); every kernel
  with a run-time loop bound (rotate_quant.py `for k0 in range(0, K, W)`) stops. Triton 3.7 squeezes
  the array first; the shim does the same.
- Triton 3.3: building an autotuner asks the active GPU driver for its benchmarker, and under the
  interpreter without a GPU there is none ("0 active drivers"). The interpreter runs one config and never
  benchmarks, so the shim hands the autotuner a benchmarker that says so if it is ever called.
"""
from __future__ import annotations

import functools
import inspect


def _index_shim(interpreter) -> str | None:
    import numpy as np
    patch = interpreter._patch_lang_tensor
    try:
        int(np.zeros(1))
        return None            # this numpy still converts 1-element arrays
    except TypeError:
        pass
    if "int(self.handle.data)" not in inspect.getsource(patch):
        return None            # this Triton squeezes first

    def index(self):
        return int(self.handle.data.squeeze())

    @functools.wraps(patch)
    def patched(tensor, *scope):
        patch(tensor, *scope)
        if scope:   # Triton 3.4+ restores what it patched through the scope; register ours there too
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patched
    return f"int() of 1-element loop bounds (numpy {np.__version__} rejects it; Triton 3.7 squeezes first)"


def _autotuner_shim(autotuner) -> str | None:
    init = autotuner.Autotuner.__init__
    if "driver.active.get_benchmarker()" not in inspect.getsource(init):
        return None            # Triton >= 3.4 asks the driver only when it benchmarks
    from triton.runtime.driver import driver
    try:
        driver.active.get_benchmarker
        return None            # a GPU driver is active: nothing to work around
    except RuntimeError:
        pass

    def no_bench(*args, **kwargs):
        raise RuntimeError("the Triton interpreter does not benchmark (give it one config)")

    @functools.wraps(init)
    def patched(self, *args, **kwargs):
        if kwargs.get("do_bench") is None:
            kwargs["do_bench"] = no_bench
        init(self, *args, **kwargs)

    autotuner.Autotuner.__init__ = patched
    return "autotuner built without a GPU driver (Triton 3.3 looks one up for its benchmarker)"


_APPLIED: list[str] | None = None


def install() -> list[str]:
    """Apply (once) the shims this Triton + numpy needs under the interpreter; one line per shim applied."""
    global _APPLIED
    if _APPLIED is None:
        from triton.runtime import autotuner, interpreter
        _APPLIED = [line for line in (_index_shim(interpreter), _autotuner_shim(autotuner)) if line]
    return _APPLIED
