"""A small Lumina2-family config for tests: ComfyUI 0.8.0 sets heads and rope axes only for dim 3840
(Z-Image) and 2304 (Lumina 2), so a reduced-dim test model needs them supplied. `install()` wraps
`comfy.model_detection.detect_unet_config` to complete the config of a dim-256 Lumina2 state dict
(engine.synthetic.ZIMAGE_TINY); every other model is detected exactly as before."""
from __future__ import annotations

TINY_DIM = 256
TINY_CONFIG = {
    "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0, "ffn_dim_multiplier": 704 / 256, "multiple_of": 64,
    "z_image_modulation": True, "time_scale": 1000.0,
}


def install() -> None:
    import comfy.model_detection as md
    if getattr(md.detect_unet_config, "_int8_convrot_tiny", False):
        return
    original = md.detect_unet_config

    def detect_unet_config(state_dict, key_prefix, metadata=None):
        cfg = original(state_dict, key_prefix, metadata=metadata)
        if cfg is not None and cfg.get("image_model") == "lumina2" and cfg.get("dim") == TINY_DIM:
            cfg.update(TINY_CONFIG)
            if f"{key_prefix}cap_pad_token" in state_dict:
                cfg["pad_tokens_multiple"] = 32
        return cfg

    detect_unet_config._int8_convrot_tiny = True
    md.detect_unet_config = detect_unet_config
