"""Test-only ComfyUI nodes, symlinked into a test server's custom_nodes (never shipped with the pack).

- "Int8ConvRotTestConditioning": seeded random CONDITIONING [[tensor(1, tokens, width), {}]], so a
  sampler can run without a text encoder (Z-Image's is Qwen3-4B, width 2560).
- Importing this package completes the config of the tiny Lumina2 test model (see tiny_config).
"""
from .tiny_config import install

install()


class Int8ConvRotTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 2560, "min": 1, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width):
        import torch
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=gen), {}]],)


NODE_CLASS_MAPPINGS = {"Int8ConvRotTestConditioning": Int8ConvRotTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"Int8ConvRotTestConditioning": "INT8 ConvRot test conditioning"}
