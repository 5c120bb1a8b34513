"""Small configs for tests. ComfyUI sets heads and rope axes only for dim 3840 (Z-Image) and 2304
(Lumina 2), and detects Qwen3-4B only at width 2560, so reduced-width test models need them supplied.
`install()` wraps
- `comfy.model_detection.detect_unet_config` to complete the config of a dim-256 Lumina2 state dict
  (engine.synthetic.ZIMAGE_TINY);
- `comfy.sd.load_text_encoder_state_dicts` to load a width-256 Qwen3 (TINY_TE_CONFIG) as Qwen3-4B with
  ComfyUI's own `qwen3_4b_model_config` override, for the stock CLIPLoader and ours alike;
every other model is detected exactly as before."""
from __future__ import annotations

TINY_DIM = 256
TINY_CONFIG = {
    "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0, "ffn_dim_multiplier": 704 / 256, "multiple_of": 64,
    "z_image_modulation": True, "time_scale": 1000.0,
}


TINY_TE_HIDDEN = 256
TINY_TE_CONFIG = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3,
                  "num_attention_heads": 2, "num_key_value_heads": 1}


def _install_te() -> None:
    import comfy.sd as sd
    if getattr(sd.load_text_encoder_state_dicts, "_int8_convrot_tiny", False):
        return
    original = sd.load_text_encoder_state_dicts

    def load_text_encoder_state_dicts(state_dicts=[], *args, model_options={}, **kwargs):
        w = state_dicts[0].get("model.layers.0.post_attention_layernorm.weight") if state_dicts else None
        if w is None or w.shape[0] != TINY_TE_HIDDEN or "qwen3_4b_model_config" in model_options:
            return original(state_dicts, *args, model_options=model_options, **kwargs)
        detect = sd.detect_te_model
        sd.detect_te_model = lambda _sd: sd.TEModel.QWEN3_4B
        try:
            return original(state_dicts, *args, model_options={**model_options,
                                                               "qwen3_4b_model_config": TINY_TE_CONFIG}, **kwargs)
        finally:
            sd.detect_te_model = detect

    load_text_encoder_state_dicts._int8_convrot_tiny = True
    sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts


def install() -> None:
    _install_te()
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
