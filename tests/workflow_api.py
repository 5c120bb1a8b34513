"""A saved ComfyUI workflow (the page's UI format: nodes with widgets_values, links) as the API-format
prompt that /prompt takes, the way the frontend's graphToPrompt builds it, with the node definitions
from the server's /object_info. Tests only: ComfyUI users run the UI format from the page.

A node's widgets_values hold one value per widget input, in the order of the definition's inputs
(required, then optional), whether or not that input is also connected; an INT input with
`control_after_generate` (or, by the frontend's older rule, named seed/noise_seed) is followed by its
control value ("randomize", "fixed", …), which the API format drops. Inputs of a socket type (MODEL,
CONDITIONING, …) and forceInput ones have no widget. Frontend-only nodes (notes) are left out.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def ordered_inputs(definition: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in widget order: required, then optional (input_order when given)."""
    inputs = definition.get("input", {})
    order = definition.get("input_order") or {k: list(v) for k, v in inputs.items()}
    return [(name, inputs[section][name]) for section in ("required", "optional")
            for name in order.get(section, []) if name in inputs.get(section, {})]


def is_widget(spec: list) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def has_control(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed"))


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow; muted (mode 2) and bypassed (mode 4) nodes are
    not supported (the examples have none) and raise, as does a node type the server lacks."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        type_ = node["type"]
        if type_ in FRONTEND_ONLY:
            continue
        if type_ not in object_info:
            raise KeyError(f"node {node['id']}: type {type_!r} is not registered on this server")
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({type_}): mode {node['mode']} (muted/bypassed) is not supported")
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in ordered_inputs(object_info[type_]):
            if is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if has_control(name, spec) and values and values[0] in CONTROL_VALUES:
                    values.pop(0)
            if name in linked:
                _, origin, slot, *_ = linked[name]
                inputs[name] = [str(origin), slot]
        if values:
            raise ValueError(f"node {node['id']} ({type_}): {len(values)} widget value(s) left over: {values}")
        prompt[str(node["id"])] = {"class_type": type_, "inputs": inputs}
    return prompt
