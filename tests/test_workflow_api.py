"""tests/workflow_api.py (a saved workflow -> the API format) and the settings example_workflows/ keeps;
the examples on a real server and in the real frontend: tests/integration/test_example_workflows.py."""
from __future__ import annotations

import json

import pytest

import comfy_env
import workflow_api


def load(name: str) -> dict:
    return json.loads((comfy_env.REPO / "example_workflows" / f"{name}.json").read_text())


def test_to_api_maps_widgets_and_links():
    info = {"KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
        "sampler_name": [["euler", "res_multistep"]]}}},
        "Loader": {"input": {"required": {"name": ["COMBO", {"options": ["a"]}]},
                             "optional": {"text": ["STRING", {"forceInput": True}], "n": ["INT", {}]}}}}
    wf = {"links": [[1, 2, 0, 1, 0, "MODEL"]], "nodes": [
        {"id": 1, "type": "KSampler", "inputs": [{"name": "model", "link": 1}],
         "widgets_values": [5, "randomize", 8, "res_multistep"]},
        {"id": 2, "type": "Loader", "inputs": [], "widgets_values": ["a", 3]},
        {"id": 3, "type": "Note", "widgets_values": ["text"]}]}
    assert workflow_api.to_api(wf, info) == {
        "1": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 5, "steps": 8,
                                                   "sampler_name": "res_multistep"}},
        "2": {"class_type": "Loader", "inputs": {"name": "a", "n": 3}}}
    wf["nodes"][1]["widgets_values"].append("extra")
    with pytest.raises(ValueError, match="left over"):
        workflow_api.to_api(wf, info)


def test_examples_keep_the_templates_settings():
    """ComfyUI's Z-Image templates: Turbo 8 steps, cfg 1, zeroed negative; Base 25 steps, cfg 4;
    both res_multistep/simple, AuraFlow shift 3, an empty SD3 latent at 1024²."""
    for name, steps, cfg in (("z_image_turbo_int8_convrot_t2i", 8, 1.0), ("z_image_turbo_int8_convrot_lora", 8, 1.0),
                             ("z_image_base_int8_convrot_t2i", 25, 4.0)):
        nodes = {n["type"]: n for n in load(name)["nodes"]}
        assert nodes["KSampler"]["widgets_values"][2:6] == [steps, cfg, "res_multistep", "simple"], name
        assert nodes["ModelSamplingAuraFlow"]["widgets_values"] == [3]
        assert nodes["EmptySD3LatentImage"]["widgets_values"] == [1024, 1024, 1]
        assert ("ConditioningZeroOut" in nodes) == (steps == 8)
        assert nodes["VAELoader"]["widgets_values"] == ["ae.safetensors"]
        assert nodes["Int8ConvRotCLIPLoader"]["widgets_values"][:2] == ["qwen_3_4b_int8_convrot.safetensors", "lumina2"]
        assert ("LoraLoaderModelOnly" in nodes) == name.endswith("lora")
