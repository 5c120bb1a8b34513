// INT8 ConvRot: what the selected file is, right on the node (plain JS, no build step).
//
// - Loader nodes (UNET / CLIP) and the Inspect node: a panel under the widgets with the file's format,
//   group size, scaling, quantized/kept layer counts and size vs bf16, from the pack's read-only route
//   GET /api/int8_convrot/inspect?folder=...&name=... . Green: INT8 ConvRot with row scales. Amber:
//   tensor-wise scales with ConvRot (soft, waxy images) or INT8 without rotation. Red: exactly the files
//   the pack's loaders refuse (the route runs their own check, engine/verdict.py), with their reason; a
//   bf16/fp8 file turns blue when quantize_on_load is set; a file in another quantized format (nvfp4,
//   asym_w4a8_int8, ...) says which loader reads it.
// - Converter node: what the chosen source is, live progress while it runs, then the summary it
//   returns (also on the Save Model node).
// - Inspect node: after a run, the quality headline under the badge (the chart shows as its preview).
// - Stock UNETLoader / CLIPLoader on an INT8 ConvRot file: the same facts and which backend runs ComfyUI's
//   native INT8 here (GET /api/int8_convrot/backend). The setting "INT8 ConvRot ▸ Native INT8" switches
//   the pack's comfy-kitchen backend on/off at runtime (POST to the same route).
//
// The panel is a DOM widget that is never serialized and comes after the node's own widgets (a
// serialize:false widget between them would shift widgets_values on reload), so saved workflows
// are the same with or without this extension. Its text is also the widget's value, which is what
// tests read: app.graph.getNodeById(id).widgets.find(w => w.name === "int8_convrot_info").value

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/int8_convrot/inspect";
const PANEL = "int8_convrot_info";
const FILE_NODES = {
  Int8ConvRotUNETLoader: { widget: "unet_name", folder: "diffusion_models" },
  Int8ConvRotCLIPLoader: { widget: "clip_name", folder: "text_encoders" },
  Int8ConvRotInspect: { widget: "file", folder: null, minWidth: 520 }, // values are "folder/name"; a chart
  Int8ConvRotConverter: { widget: "model", folder: null, source: true }, // the file to convert
};
// Stock loaders: a badge only, saying who serves native INT8 (the pack's comfy-kitchen backend or not).
const NATIVE_NODES = {
  UNETLoader: { widget: "unet_name", folder: "diffusion_models", native: true },
  CLIPLoader: { widget: "clip_name", folder: "text_encoders", native: true },
};
const BACKEND_ROUTE = "/int8_convrot/backend";
const backend = { text: null, data: null };
const CONVERTERS = new Set(["Int8ConvRotConverter", "Int8ConvRotSaveModel"]);
const INSPECT = "Int8ConvRotInspect";
const LINE_PX = 16;
const MARGIN = 6; // around the panel, inside the widget's height
const MIN_WIDTH = 360;

const CSS = `
.int8cr-panel { box-sizing: border-box; width: 100%; height: 100%; overflow: hidden;
  padding: 4px 8px; border-radius: 6px; border-left: 4px solid #6e7681;
  background: rgba(110, 118, 129, 0.14); color: var(--input-text, #ddd);
  font: 12px/16px ui-sans-serif, system-ui, "Segoe UI", Roboto, sans-serif; pointer-events: none; }
.int8cr-panel div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.int8cr-panel .int8cr-head { font-weight: 600; }
.int8cr-panel .int8cr-cont { padding-left: 10px; }
.int8cr-panel .int8cr-warn { color: #f0b849; }
.int8cr-panel.int8cr-ok { border-left-color: #3fb950; background: rgba(63, 185, 80, 0.14); }
.int8cr-panel.int8cr-warn { border-left-color: #d29922; background: rgba(210, 153, 34, 0.20); }
.int8cr-panel.int8cr-bad { border-left-color: #f85149; background: rgba(248, 81, 73, 0.20); }
.int8cr-panel.int8cr-bad .int8cr-warn { color: #ff9b95; }
.int8cr-panel.int8cr-info { border-left-color: #58a6ff; background: rgba(88, 166, 255, 0.16); }
.int8cr-panel.int8cr-pending { opacity: 0.75; }
.int8cr-bar { height: 4px; margin-top: 3px; border-radius: 2px; background: rgba(255,255,255,0.12); }
.int8cr-bar > span { display: block; height: 100%; border-radius: 2px; background: #58a6ff; }
`;

function injectStyle() {
  if (document.getElementById("int8cr-style")) return;
  const style = document.createElement("style");
  style.id = "int8cr-style";
  style.textContent = CSS;
  document.head.appendChild(style);
}

function widgetNamed(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// -- the panel ----------------------------------------------------------------------------------

const FONT = '12px ui-sans-serif, system-ui, "Segoe UI", Roboto, sans-serif';
let measureCtx = null;

function textWidth(text, bold) {
  measureCtx ??= document.createElement("canvas").getContext("2d");
  measureCtx.font = bold ? `600 ${FONT}` : FONT;
  return measureCtx.measureText(text).width;
}

// One row of text as the visual lines it takes at `width` px (word wrap; one over-long word stays
// on its own line and ends in an ellipsis).
function wrap(text, width, bold) {
  const out = [];
  let line = "";
  for (const word of String(text).split(" ")) {
    const next = line ? `${line} ${word}` : word;
    if (line && textWidth(next, bold) > width) {
      out.push(line);
      line = word;
    } else {
      line = next;
    }
  }
  out.push(line);
  return out;
}

// Widgets added after the panel (the Inspect node's chart preview) need room: grow to fit them.
function fitHeight(node, state) {
  const n = node.widgets?.length ?? 0;
  if (n === state.widgetCount) return;
  state.widgetCount = n;
  const min = node.computeSize();
  if (node.size[1] < min[1]) {
    node.setSize([node.size[0], min[1]]);
    node.setDirtyCanvas?.(true, true); // called while drawing: ask for the next frame
  }
}

function addPanel(node) {
  const existing = widgetNamed(node, PANEL);
  if (existing) return existing;
  const el = document.createElement("div");
  el.className = "int8cr-panel int8cr-pending";
  const state = { text: "", lines: 1, bar: false, width: 0, last: null };
  const height = () => state.lines * LINE_PX + 8 + (state.bar ? 7 : 0) + 2 * MARGIN;
  state.height = height;
  const widget = node.addDOMWidget(PANEL, "int8_convrot_info", el, {
    serialize: false,
    hideOnZoom: false,
    margin: MARGIN,
    getValue: () => state.text,
    setValue: () => {},
    getMinHeight: height,
    getMaxHeight: height,
    onDraw: () => {
      node.int8cr?.poll?.();
      fitHeight(node, state);
    },
    afterResize: () => {
      // re-wrap for the new width
      if (state.last && Math.abs(node.size[0] - state.width) > 1) render(node, ...state.last);
    },
  });
  widget.serialize = false; // not in widgets_values: saved workflows are the same with or without us
  widget.int8cr = { el, state };
  return widget;
}

// rows: [{text, cls}], level: ok | warn | bad | info | pending; progress: 0..1 or null
function render(node, level, rows, progress = null) {
  const widget = addPanel(node);
  const { el, state } = widget.int8cr;
  const minWidth = node.int8cr?.spec?.minWidth ?? MIN_WIDTH;
  if (node.size[0] < minWidth) node.setSize([minWidth, node.size[1]]);
  const inner = node.size[0] - 2 * MARGIN - 24; // padding + border + a little slack
  const divs = [];
  rows.forEach((row, i) => {
    const cls = row.cls ?? (i === 0 ? "int8cr-head" : "");
    const bold = cls.includes("int8cr-head");
    wrap(row.text, inner, bold).forEach((part, j) => {
      const div = document.createElement("div");
      div.textContent = part;
      div.className = j ? `${cls} int8cr-cont` : cls;
      divs.push(div);
    });
  });
  el.className = `int8cr-panel int8cr-${level}`;
  el.replaceChildren(...divs);
  if (progress !== null) {
    const bar = document.createElement("div");
    bar.className = "int8cr-bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.round(Math.max(0, Math.min(1, progress)) * 100)}%`;
    bar.appendChild(fill);
    el.appendChild(bar);
  }
  el.dataset.level = level;
  const text = rows.map((r) => r.text).join("\n");
  const before = state.height();
  Object.assign(state, { text, lines: divs.length, bar: progress !== null, width: node.size[0],
    last: [level, rows, progress] });
  node.int8cr = Object.assign(node.int8cr ?? {}, { level, text });
  const delta = state.height() - before;
  if (delta) {
    // Follow the panel's height change, keeping any extra room (image previews, the user's resizing).
    const min = node.computeSize();
    node.setSize([Math.max(node.size[0], min[0]), Math.max(min[1], node.size[1] + delta)]);
  }
  node.setDirtyCanvas?.(true, true);
}

// -- file badge -----------------------------------------------------------------------------------

function splitValue(spec, value) {
  if (spec.folder) return [spec.folder, value];
  const i = value.indexOf("/");
  return i > 0 ? [value.slice(0, i), value.slice(i + 1)] : [null, value];
}

function summaryRows(summary) {
  return [
    ...summary.lines.map((text, i) => ({ text, cls: i === 0 ? "int8cr-head" : "" })),
    ...summary.warnings.map((w) => ({ text: `⚠ ${w}`, cls: "int8cr-warn" })),
  ];
}

function showFacts(node) {
  const st = node.int8cr;
  const data = st.data;
  if (!data) return;
  if (data.error) {
    render(node, "bad", [{ text: data.error, cls: "int8cr-head" }]);
    return;
  }
  const summary = data.summary;
  if (st.spec?.native) {
    // A stock loader: what the file is, and for INT8 ConvRot who runs it on this ComfyUI.
    if (summary.format !== "int8_convrot") {
      const rows = [{ text: summary.lines[0] }];
      if (summary.native_format) rows.push({ text: summary.warnings[0] });   // what it is, who reads it
      render(node, "pending", rows);
      return;
    }
    const rows = summaryRows(summary).filter((r) => r.cls !== "int8cr-warn");
    if (backend.text) rows.push({ text: backend.text });
    render(node, summary.level, rows);
    return;
  }
  if (st.spec?.source) {
    // The converter's input: a float file is what it wants; an INT8 one needs no conversion.
    if (summary.quantizable) {
      render(node, "info", [{ text: `source: ${summary.title}`, cls: "int8cr-head" }, { text: summary.lines[1] },
        { text: summary.lines[2] }]);
    } else {
      const what = summary.format === "int8_convrot" ? "already INT8 ConvRot: nothing to convert" : summary.lines[0];
      render(node, summary.format === "int8_convrot" ? "warn" : "bad",
        [{ text: what, cls: "int8cr-head" }, { text: summary.lines[1] }, { text: summary.lines[2] }]);
    }
    return;
  }
  const qol = widgetNamed(node, "quantize_on_load")?.value;
  if (summary.level === "bad" && summary.quantizable && qol && qol !== "off") {
    const group = widgetNamed(node, "group_size")?.value ?? "64";
    render(node, "info", [
      { text: `${summary.title} → INT8 ConvRot on load`, cls: "int8cr-head" },
      { text: summary.lines[1] },
      { text: summary.lines[2] },
      { text: `preset ${qol}, group ${group}; nothing is written to disk` },
    ]);
    return;
  }
  const rows = summaryRows(summary);
  if (st.quality) rows.push(...st.quality.map((text) => ({ text })));
  render(node, summary.level, rows);
}

async function fetchFacts(node, folder, name, key) {
  const st = node.int8cr;
  const seq = (st.seq = (st.seq ?? 0) + 1);
  render(node, "pending", [{ text: `reading ${name} …` }]);
  let data;
  try {
    const url = `${ROUTE}?folder=${encodeURIComponent(folder)}&name=${encodeURIComponent(name)}`;
    const res = await api.fetchApi(url, { cache: "no-store" });
    data = await res.json().catch(() => ({ error: `${name}: HTTP ${res.status}` }));
    if (!res.ok && !data.error) data.error = `${name}: HTTP ${res.status}`;
  } catch (err) {
    data = { error: `${name}: ${err?.message ?? err}` };
  }
  if (seq !== st.seq) return; // a newer selection won
  st.data = data;
  st.dataKey = key;
  showFacts(node);
}

function pollFile(node, spec) {
  const st = node.int8cr;
  const value = widgetNamed(node, spec.widget)?.value;
  const qol = widgetNamed(node, "quantize_on_load")?.value;
  const group = widgetNamed(node, "group_size")?.value;
  // Inspect takes its file from a connected file_name (the Converter's output) before the MODEL input.
  const named = node.inputs?.find((i) => i.name === "file_name")?.link != null;
  const view = `${value}|${qol}|${group}|${named}`;
  if (view === st.view) return;
  st.view = view;
  if (!value || value === "none") {
    st.data = null;
    st.dataKey = null;
    const what = node.comfyClass !== INSPECT ? "no file selected"
      : named ? "inspects the file named by the connected file_name" : "no file: inspects the connected MODEL";
    render(node, "pending", [{ text: what }]);
    return;
  }
  const [folder, name] = splitValue(spec, String(value));
  if (!folder) {
    render(node, "bad", [{ text: `${value}: not 'folder/file'` }]);
    return;
  }
  const key = `${folder}/${name}`;
  if (key === st.dataKey) {
    showFacts(node); // only the quantize_on_load / group_size view changed
    return;
  }
  st.quality = null;
  fetchFacts(node, folder, name, key);
}

function setupFileNode(node, spec) {
  node.int8cr = { spec, poll: () => pollFile(node, spec) };
  addPanel(node);
  for (const name of [spec.widget, "quantize_on_load", "group_size"]) {
    const w = widgetNamed(node, name);
    if (!w) continue;
    const orig = w.callback;
    w.callback = function (...args) {
      const r = orig?.apply(this, args);
      queueMicrotask(() => node.int8cr.poll());
      return r;
    };
  }
  // "Refresh node definitions" (R): files may have changed under the same names: read them again.
  const refresh = node.refreshComboInNode;
  node.refreshComboInNode = function (...args) {
    const r = refresh?.apply(this, args);
    Object.assign(node.int8cr, { view: null, dataKey: null });
    node.setDirtyCanvas?.(true, true);
    return r;
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = onConfigure?.apply(this, args);
    queueMicrotask(() => node.int8cr.poll());
    return r;
  };
  queueMicrotask(() => node.int8cr.poll());
}

// -- native INT8 backend (the pack's comfy-kitchen backend) ---------------------------------------

async function refreshBackend(enabled) {
  try {
    const res = enabled === undefined
      ? await api.fetchApi(BACKEND_ROUTE, { cache: "no-store" })
      : await api.fetchApi(BACKEND_ROUTE, {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ enabled }),
        });
    backend.data = await res.json();
    backend.text = backend.data.badge ?? null;
  } catch (err) {
    backend.data = { error: String(err?.message ?? err) };
    backend.text = null;
  }
  if (window.__int8ConvRot) window.__int8ConvRot.backend = backend.data;
  for (const node of app.graph?._nodes ?? []) if (node.int8cr?.spec?.native && node.int8cr.data) showFacts(node);
}

// -- converter progress / summary, inspect results ------------------------------------------------

function findNode(id) {
  if (id === null || id === undefined) return null;
  const graph = app.graph;
  const n = Number(id);
  return graph?.getNodeById?.(Number.isFinite(n) ? n : id) ?? null;
}

function setupConverter(node) {
  node.int8cr = {};
  render(node, "pending", [{ text: "progress and the summary show here" }]);
}

function converterProgress(node, value, max) {
  const frac = max > 0 ? value / max : 0;
  render(node, "info", [{ text: `converting… ${Math.round(frac * 100)}% (${value} / ${max})`, cls: "int8cr-head" }],
    frac);
}

function outputLines(output) {
  // Preferred: ui {"int8_convrot": [{"level", "lines"}]}; else ui {"text": [...]} (PreviewText style).
  const ours = output?.int8_convrot?.[0];
  if (ours?.lines) return { level: ours.level ?? "ok", lines: ours.lines };
  const text = output?.text ?? output?.summary ?? output?.string;
  if (text) {
    const lines = [].concat(text).join("\n").split("\n").map((l) => l.trim()).filter(Boolean);
    const level = lines.some((l) => /warning|waxy|tensor-wise/i.test(l)) ? "warn" : "ok";
    return { level, lines };
  }
  return null;
}

function onExecuted(detail) {
  const node = findNode(detail?.display_node ?? detail?.node);
  if (!node) return;
  if (CONVERTERS.has(node.comfyClass)) {
    const out = outputLines(detail.output);
    if (out) render(node, out.level, out.lines.map((text, i) => ({ text, cls: i === 0 ? "int8cr-head" : "" })));
    else render(node, "ok", [{ text: "conversion finished", cls: "int8cr-head" }]);
  } else if (node.comfyClass === INSPECT && node.int8cr) {
    const ours = detail.output?.int8_convrot?.[0];
    node.int8cr.quality = ours?.lines ?? null;
    if (node.int8cr.data) showFacts(node);
    else if (ours) render(node, ours.level ?? "ok", ours.lines.map((text) => ({ text })));
  }
}

function listen() {
  api.addEventListener("progress", ({ detail }) => {
    const node = findNode(detail?.node);
    if (CONVERTERS.has(node?.comfyClass)) converterProgress(node, detail.value, detail.max);
  });
  api.addEventListener("executing", ({ detail }) => {
    const id = detail && typeof detail === "object" ? detail.node ?? detail.display_node : detail;
    const node = findNode(id);
    if (CONVERTERS.has(node?.comfyClass)) render(node, "info", [{ text: "converting… starting", cls: "int8cr-head" }], 0);
  });
  api.addEventListener("executed", ({ detail }) => onExecuted(detail));
  api.addEventListener("execution_error", ({ detail }) => {
    const node = findNode(detail?.node_id);
    if (CONVERTERS.has(node?.comfyClass) || node?.comfyClass === INSPECT) {
      const msg = String(detail.exception_message ?? "failed").trim().split("\n");
      render(node, "bad", msg.slice(0, 4).map((text, i) => ({ text, cls: i === 0 ? "int8cr-head" : "" })));
    }
  });
  api.addEventListener("execution_interrupted", ({ detail }) => {
    const node = findNode(detail?.node_id);
    if (CONVERTERS.has(node?.comfyClass)) render(node, "warn", [{ text: "interrupted: no output file was written" }]);
  });
}

injectStyle();

app.registerExtension({
  name: "int8_convrot.ui",
  settings: [
    {
      id: "INT8ConvRot.NativeBackend",
      category: ["INT8 ConvRot", "Native INT8", "Backend"],
      name: "Run ComfyUI's native INT8 (stock loaders) on the pack's kernels",
      tooltip: "Where faster (CPU; CUDA sm80+ with Triton at group size ≤ 64), the pack serves comfy-kitchen's " +
        "int8_linear. Off: comfy-kitchen's own backends, exactly as without the pack. " +
        "INT8_CONVROT_CK_BACKEND=0 on the server turns it off for good.",
      type: "boolean",
      defaultValue: true,
      onChange: (value) => refreshBackend(value !== false),
    },
  ],
  async setup() {
    listen();
    window.__int8ConvRot = { ready: true, route: ROUTE, backend: backend.data };
    if (backend.data === null) refreshBackend();
  },
  nodeCreated(node) {
    const spec = FILE_NODES[node.comfyClass] ?? NATIVE_NODES[node.comfyClass];
    if (spec) setupFileNode(node, spec);
    else if (CONVERTERS.has(node.comfyClass)) setupConverter(node);
  },
});
