import pytest
import torch

from comfyui_int8_convrot.kernels import VALID_GROUP_SIZES, check_group_size, hadamard

H4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)


@pytest.mark.parametrize("g", VALID_GROUP_SIZES)
def test_properties(g):
    h = hadamard(g, dtype=torch.float64)
    eye = torch.eye(g, dtype=torch.float64)
    assert h.shape == (g, g)
    assert torch.equal(h, h.T), "symmetric"
    assert torch.allclose(h @ h.T, eye, atol=1e-12), "orthonormal"
    assert torch.allclose(h @ h, eye, atol=1e-12), "involutory: the same matrix rotates and un-rotates"
    unnormalized = h * g ** 0.5
    assert torch.equal(unnormalized.abs(), torch.ones(g, g, dtype=torch.float64)), "entries ±1/sqrt(g)"
    # Regular: every row and column sums to the same value sqrt(g).
    assert torch.equal(unnormalized.sum(0), torch.full((g,), g ** 0.5, dtype=torch.float64))
    assert torch.equal(unnormalized.sum(1), torch.full((g,), g ** 0.5, dtype=torch.float64))


@pytest.mark.parametrize("g", VALID_GROUP_SIZES)
def test_equals_kronecker_definition(g):
    ref = H4
    while ref.shape[0] < g:
        ref = torch.kron(ref, H4)
    assert torch.equal(hadamard(g, dtype=torch.float64), ref / g ** 0.5)


@pytest.mark.parametrize("g", [4, 16, 64, 256])
def test_identical_to_peers(g):
    from comfy_kitchen.tensor.int8_utils import _build_hadamard
    from convert_to_quant.utils.convrot import build_hadamard
    ours = hadamard(g)
    assert torch.equal(ours, build_hadamard(g))
    assert torch.equal(ours, _build_hadamard(g))


def test_exact_in_low_precision():
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(hadamard(64, dtype=dtype).double(), hadamard(64, dtype=torch.float64))


def test_cached_per_device_and_dtype():
    assert hadamard(64) is hadamard(64)
    assert hadamard(64, dtype=torch.bfloat16) is not hadamard(64)


@pytest.mark.parametrize("bad", [0, 1, 2, 8, 32, 128, 512, 2048, 48, -4, 64.0, "64", True])
def test_bad_group_size_rejected(bad):
    with pytest.raises(ValueError, match="valid sizes are powers of 4"):
        check_group_size(bad)
    with pytest.raises(ValueError):
        hadamard(bad)


def test_power_of_two_message_names_sylvester():
    with pytest.raises(ValueError, match="Sylvester"):
        check_group_size(128)
