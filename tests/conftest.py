"""Suite-wide test set-up: markers that skip with a visible reason, and the in-process ComfyUI."""
import pytest
import torch

import comfy_env


def pytest_collection_modifyitems(config, items):
    no_comfy = comfy_env.comfyui_path() is None
    skip_comfy = pytest.mark.skip(reason=comfy_env.skip_reason()) if no_comfy else None
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine") if not torch.cuda.is_available() else None
    for item in items:
        if skip_comfy is not None and ("comfyui" in item.keywords or "server" in item.keywords):
            item.add_marker(skip_comfy)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in this process on the CPU (tests using it carry the `comfyui` marker)."""
    return comfy_env.setup_in_process()
