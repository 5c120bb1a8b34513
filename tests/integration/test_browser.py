"""The web extension (web/int8_convrot.js) in a real headless Chromium, against the real ComfyUI
frontend (comfyui_frontend_package 1.35.9) served by a real ComfyUI 0.8.0 server with the pack.

One page session: load a workflow with our loaders, the Inspect node and the Converter node; read
each badge (the panel widget's value, its level) and the DOM text; select other files the way
the dropdown does (set the value, call the widget's callback) and see the badge follow; run the
workflow so the Converter shows live progress and its summary and the Inspect node its quality
headline. Screenshots go to the test's tmp dir and to .cache/screenshots/ for people to look at.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest

import browser
import comfy_env

pytestmark = [pytest.mark.comfyui, pytest.mark.server, pytest.mark.browser,
              pytest.mark.skipif(browser.chromium_path() is None, reason=browser.skip_reason())]

SCREENSHOTS = comfy_env.REPO / ".cache" / "screenshots"

INT8 = "tiny_zimage_int8.safetensors"
TENSOR = "tiny_zimage_int8_tensorwise.safetensors"
BF16 = "tiny_zimage_bf16.safetensors"
TE = "tiny_qwen3_int8.safetensors"


def node(id_, type_, pos, widgets, outputs=()):
    return {"id": id_, "type": type_, "pos": pos, "size": [360, 200], "flags": {}, "order": id_ - 1, "mode": 0,
            "inputs": [], "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
            "properties": {}, "widgets_values": widgets}


WORKFLOW = {
    "last_node_id": 5, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {}, "version": 0.4,
    "nodes": [
        node(1, "Int8ConvRotUNETLoader", [90, 130], [INT8, "auto", "off", "64"], [("MODEL", "MODEL")]),
        node(2, "Int8ConvRotUNETLoader", [490, 130], [BF16, "auto", "off", "64"], [("MODEL", "MODEL")]),
        node(3, "Int8ConvRotCLIPLoader", [890, 130], [TE, "lumina2", "auto", "off", "64", "default"],
             [("CLIP", "CLIP")]),
        node(4, "Int8ConvRotConverter", [90, 430], [f"diffusion_models/{BF16}", "auto", "64", "row", "", True, "cpu"],
             [("file_name", "STRING"), ("summary", "STRING")]),
        node(5, "Int8ConvRotInspect", [890, 430], [f"diffusion_models/{TENSOR}", "none", 16, "w8a8", 0],
             [("report", "STRING"), ("plot", "IMAGE")]),
    ],
}

APP = "window.comfyAPI.app.app"
PANEL = "int8_convrot_info"


def badge_js(node_id: int) -> str:
    """{level, text, dom} of a node's panel, once it has left the 'pending' state."""
    return f"""(() => {{
        const n = {APP}.graph.getNodeById({node_id});
        const w = n && n.widgets.find(w => w.name === "{PANEL}");
        if (!w || !n.int8cr || n.int8cr.level === "pending") return null;
        return {{level: n.int8cr.level, text: w.value, dom: w.int8cr.el.innerText,
                 cls: w.int8cr.el.className}};
    }})()"""


def select_js(node_id: int, widget: str, value) -> str:
    """What the dropdown does: set the value, call the widget's callback."""
    return f"""(() => {{
        const n = {APP}.graph.getNodeById({node_id});
        const w = n.widgets.find(w => w.name === "{widget}");
        w.value = {json.dumps(value)};
        w.callback?.(w.value, {APP}.canvas, n);
        return true;
    }})()"""


async def badge(page, node_id: int, want: str | None = None, timeout: float = 30.0) -> dict:
    """The badge once it shows; with `want`, once its text contains `want`."""
    cond = badge_js(node_id)
    if want is not None:
        cond = f"(() => {{ const b = {cond}; return b && b.text.includes({json.dumps(want)}) ? b : null; }})()"
    return await page.wait_for(cond, timeout)


def save_screenshot(path, name: str) -> None:
    try:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
    except OSError:
        pass


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if browser.chromium_path() is None:
        pytest.skip(browser.skip_reason())
    ch = browser.Chromium(tmp_path_factory.mktemp("chromium") / "profile", width=1600, height=1000)
    ch.start()
    try:
        yield ch
    finally:
        ch.stop()


def test_badges_progress_and_summary_in_the_real_frontend(chromium, ui_server, tmp_path):
    asyncio.run(_scenario(ui_server, chromium, tmp_path))


async def _scenario(server, chromium, out):
    async with chromium.page() as page:
        await page.navigate(server.url + "/")
        await page.wait_for(f"!!(window.__int8ConvRot?.ready && {APP}?.graph && "
                            "window.LiteGraph?.registered_node_types?.Int8ConvRotUNETLoader)", 120)
        # The extension script was served from the pack's web/ folder.
        assert "/extensions/ComfyUI-INT8-ConvRot/int8_convrot.js" in await page.evaluate(
            "fetch('/extensions').then(r => r.json()).then(x => x.join(' '))")
        await page.evaluate(f"{APP}.loadGraphData({json.dumps(WORKFLOW)})")
        await page.evaluate(f"(() => {{ const c = {APP}.canvas; c.ds.offset = [0, 0]; c.ds.scale = 1; "
                            "c.setDirty(true, true); return true; })()")

        # -- loaders: a workflow's file, then other files selected in the dropdown -------------------
        a = await badge(page, 1)
        assert a["level"] == "ok" and "int8cr-ok" in a["cls"], a
        assert a["text"].splitlines() == ["INT8 ConvRot · group 64 · row scales",
                                          "30 quantized · 10 kept high precision · Z-Image",
                                          a["text"].splitlines()[2]]
        assert "% of bf16" in a["text"] and a["dom"].split() == a["text"].split()   # shown as given (maybe wrapped)

        b = await badge(page, 2)
        assert b["level"] == "bad" and b["text"].startswith("not INT8 ConvRot: plain bf16"), b
        assert "quantize_on_load" in b["text"]
        te = await badge(page, 3)
        assert te["level"] == "ok" and "Qwen3" in te["text"] and "group 64" in te["text"], te
        conv = await badge(page, 4)
        assert conv["level"] == "info" and conv["text"].startswith("source: plain bf16"), conv
        ins = await badge(page, 5)
        assert ins["level"] == "warn" and "tensor-wise scales" in ins["text"] and "waxy" in ins["text"], ins

        await page.evaluate(select_js(1, "unet_name", TENSOR))
        t = await badge(page, 1, "tensor-wise")
        assert t["level"] == "warn" and "int8cr-warn" in t["cls"] and "waxy" in t["text"], t
        await page.screenshot(out / "badges.png")   # green, amber (×2), red, blue: every badge state
        await page.evaluate(select_js(2, "quantize_on_load", "auto"))
        q = await badge(page, 2, "on load")
        assert q["level"] == "info" and q["text"].startswith("plain bf16 → INT8 ConvRot on load"), q
        assert "preset auto, group 64" in q["text"]
        await page.evaluate(select_js(1, "unet_name", INT8))
        assert (await badge(page, 1, "row scales"))["level"] == "ok"

        # The panel is not saved: widgets_values are exactly the node's inputs.
        saved = await page.evaluate(f"JSON.stringify({APP}.graph.serialize().nodes.map(n => [n.id, n.widgets_values]))")
        saved = dict((i, v) for i, v in json.loads(saved))
        # (name, compute, quantize_on_load, group_size, layers)
        assert saved[1] == [INT8, "auto", "off", "64", "auto"] and saved[2] == [BF16, "auto", "auto", "64", "auto"]
        prompt = await page.evaluate(f"{APP}.graphToPrompt().then(p => JSON.stringify(p.output))")
        assert all(PANEL not in n["inputs"] for n in json.loads(prompt).values())

        # -- run: the Converter's live progress and summary, the Inspect node's headline ------------
        await page.evaluate(f"""(() => {{
            window.__seen = [];
            window.comfyAPI.api.api.addEventListener("progress", ({{detail}}) => {{
                const n = {APP}.graph.getNodeById(Number(detail.node));
                if (n?.comfyClass === "Int8ConvRotConverter") window.__seen.push(n.int8cr.text);
            }});
            return true;
        }})()""")
        await page.evaluate(f"{APP}.queuePrompt(0, 1).then(() => true)")
        done = await badge(page, 4, "INT8 ConvRot: tiny_zimage_bf16_int8_convrot.safetensors", timeout=120)
        assert done["level"] == "ok" and "layers: 30 quantized" in done["text"], done
        seen = await page.evaluate("window.__seen")
        assert seen and all(s.startswith("converting… ") and "%" in s for s in seen), seen
        ran = await badge(page, 5, "est. weight error: mean", timeout=120)
        assert ran["level"] == "warn" and "estimated from codes only" in ran["text"], ran
        assert await page.wait_for(f"{APP}.graph.getNodeById(5).imgs?.length ?? 0", 30) == 1   # the chart preview
        await asyncio.sleep(1.0)   # let the preview image paint
        await page.screenshot(out / "after_run.png")

        # A refused conversion: the source is INT8 already; the panel turns red with the error.
        await page.evaluate(select_js(4, "model", f"diffusion_models/{INT8}"))
        assert (await badge(page, 4, "already INT8 ConvRot"))["level"] == "warn"
        await page.evaluate(f"{APP}.queuePrompt(0, 1).then(() => true)")
        err = await page.wait_for(f"(() => {{ const b = {badge_js(4)}; return b?.level === 'bad' ? b : null; }})()", 60)
        assert "already INT8" in err["text"], err

        ours = [e for e in page.errors if "int8_convrot.js" in e]   # errors raised in our script
        assert not ours, ours
    for name in ("badges.png", "after_run.png"):
        save_screenshot(out / name, name)
