import pytest
import torch

from comfyui_int8_convrot.kernels import VALID_GROUP_SIZES, hadamard, rotate, rotate_fwht, rotate_matmul


def dense_reference(x: torch.Tensor, g: int) -> torch.Tensor:
    """The definition: block-diagonal matrix diag(H_g, …, H_g) applied to the last dimension, in float64."""
    n = x.shape[-1] // g
    block = torch.block_diag(*([hadamard(g, dtype=torch.float64)] * n))
    return x.double() @ block


@pytest.mark.parametrize("g", VALID_GROUP_SIZES)
@pytest.mark.parametrize("shape", [(7, 1024), (2, 3, 2048), (1024,)])
def test_paths_equal_dense_definition(g, shape):
    if shape[-1] % g:   # a group wider than the row (4096): the smallest row it divides
        shape = shape[:-1] + (g,)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(g))
    ref = dense_reference(x, g)
    for fn in (rotate_fwht, rotate_matmul, rotate):
        y = fn(x, g)
        assert y.shape == x.shape and y.dtype == x.dtype
        # float32 rounding of a log2(g)-deep sum of unit-norm rows: a few ulps of the row's scale.
        assert torch.allclose(y.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item()), fn.__name__


@pytest.mark.parametrize("g", [4, 64, 256])
def test_involutory(g):
    x = torch.randn(5, 4 * 256, dtype=torch.float64)
    assert torch.allclose(rotate_fwht(rotate_fwht(x, g), g), x, atol=1e-12)
    assert torch.allclose(rotate_matmul(rotate_matmul(x, g), g), x, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(dtype):
    x = torch.randn(4, 256).to(dtype)
    y = rotate(x, 64, torch.float32)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), dense_reference(x.float(), 64), atol=1e-5)


def test_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match=r"group size 64 does not divide the last dimension \(100\)"):
        rotate(torch.randn(2, 100), 64)


def test_bad_group_size():
    with pytest.raises(ValueError, match="powers of 4"):
        rotate_fwht(torch.randn(2, 128), 32)


def test_spreads_outliers():
    """Why ConvRot works: one outlier channel's energy is spread over its whole group."""
    x = torch.zeros(1, 64)
    x[0, 5] = 100.0
    y = rotate(x, 64)
    assert torch.allclose(y.abs(), torch.full_like(y, 100.0 / 8))
