// The t2i page: submits a job (POST /v1/jobs), polls it (GET /v1/jobs/{id}) for the progress bar,
// and adds the finished images with their A1111 parameters to the gallery; for models that take a
// layout, a canvas where the user drags boxes and names what goes in each. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
let current = null; // id of the job being generated

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api_key").value || localStorage.getItem("t2i_api_key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(body !== undefined),
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    if (res.status === 401) $("key-box").open = true;
    const err = new Error((data.error && data.error.message) || data.detail || res.statusText);
    err.status = res.status;
    err.retryAfter = res.headers.get("Retry-After");
    throw err;
  }
  return data;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

// /v1/info is fetched on load and again whenever the API key changes, so replies can arrive late
// and out of order. Two rules keep them from undoing what the user did: only the reply to the
// latest request is applied (older ones are stale), and a field the user has edited is never
// overwritten by a default.
let infoSeq = 0;       // number of the latest /v1/info request
let infoKey = null;    // the key the latest request was sent with (a change event without a new key is a no-op)
const DEFAULTED = ["width", "height", "steps", "guidance", "sampler"];

function setDefault(id, value) {
  if (!$(id).dataset.edited) $(id).value = value;
}

async function loadInfo() {
  const seq = ++infoSeq;
  infoKey = $("api_key").value;
  try {
    const info = await api("GET", "/v1/info");
    if (seq !== infoSeq) return; // a newer request is under way: its reply wins
    $("model").textContent = "model: " + info.model;
    const d = info.defaults;
    for (const id of ["width", "height", "steps", "guidance"]) setDefault(id, d[id]);
    for (const id of ["width", "height"]) {
      $(id).step = info.size_multiple; $(id).min = info.size_multiple;
      $(id).max = id === "width" ? info.limits.max_width : info.limits.max_height;
    }
    $("steps").max = info.limits.max_steps;
    $("layout-box").hidden = !info.capabilities.options.includes("layout");
    fitCanvas();
    const chosen = $("sampler").dataset.edited ? $("sampler").value : d.sampler;
    $("sampler").replaceChildren(...info.samplers.map((s) => {
      const o = document.createElement("option");
      o.value = s.name; o.textContent = s.label; o.selected = s.name === chosen;
      return o;
    }));
    setStatus("");
  } catch (e) {
    if (seq !== infoSeq) return;
    setStatus(e.status === 401 ? "This server needs an API key (below)." : "Could not reach the server: " + e.message,
              true);
  }
}

function keyChanged() {
  localStorage.setItem("t2i_api_key", $("api_key").value);
  if ($("api_key").value !== infoKey) loadInfo();
}

function request() {
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, width: num("width"),
                 height: num("height"), steps: num("steps"), guidance: num("guidance"),
                 seed: num("seed") ?? -1, sampler: $("sampler").value || undefined };
  if (!$("layout-box").hidden && boxes.length) {
    // without a size (left empty: the model's default) the boxes go as fractions, which need none
    body.layout = body.width && body.height ? layoutPixels(body.width, body.height)
      : { units: "fractions", objects: boxes.map(({ box, phrase }) => ({ phrase, box })) };
  }
  return body;
}

// ------------------------------------------------------------------ layout canvas
// Boxes are kept as fractions of the canvas, which has the image's aspect, and sent in pixels of the
// requested width x height (the server reads them as t2i.layout.spec's JSON form).
const MIN_BOX = 0.02; // a smaller drag is a click, not a box
let boxes = [];       // [{box: [x0, y0, x1, y1] fractions, phrase}]
let drag = null;      // {start: [x, y], el} while the pointer draws a box

function fitCanvas() {
  const w = Number($("width").value) || 1, h = Number($("height").value) || 1;
  $("layout-canvas").style.aspectRatio = `${w} / ${h}`;
  $("layout-canvas").style.width = `min(100%, ${(16 * w) / h}rem)`; // a tall image stays on screen
}

function layoutPixels(width, height) {
  const px = (f, size) => Math.min(Math.max(Math.round(f * size), 0), size);
  return { units: "pixels", objects: boxes.map(({ box: [x0, y0, x1, y1], phrase }) => {
    const [a, b] = [px(x0, width), px(y0, height)];
    return { phrase, box: [Math.min(a, width - 1), Math.min(b, height - 1),
                           Math.max(px(x1, width), a + 1), Math.max(px(y1, height), b + 1)] };
  }) };
}

function placeBox(el, [x0, y0, x1, y1]) {
  Object.assign(el.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`,
                            height: `${(y1 - y0) * 100}%` });
}

function boxLabel(i) {
  return `${i + 1}${boxes[i].phrase ? ": " + boxes[i].phrase : ""}`;
}

function renderLayout() {
  $("layout-canvas").replaceChildren(...boxes.map((b, i) => {
    const el = document.createElement("div");
    el.className = "layout-box";
    el.textContent = boxLabel(i);
    placeBox(el, b.box);
    return el;
  }));
  $("layout-list").replaceChildren(...boxes.map((b, i) => {
    const li = document.createElement("li");
    const input = document.createElement("input");
    input.className = "layout-phrase";
    input.placeholder = "what goes in box " + (i + 1);
    input.value = b.phrase;
    input.addEventListener("input", () => {
      b.phrase = input.value;
      $("layout-canvas").children[i].textContent = boxLabel(i);
    });
    const del = document.createElement("button");
    del.type = "button"; del.className = "layout-delete"; del.textContent = "Delete";
    del.addEventListener("click", () => { boxes.splice(i, 1); renderLayout(); });
    li.append(input, del);
    return li;
  }));
  $("layout-clear").disabled = !boxes.length;
}

function canvasPoint(ev) {
  // Boxes are placed inside the canvas's border: measure from its inner (client) edge.
  const c = $("layout-canvas"), r = c.getBoundingClientRect();
  const clamp = (v) => Math.min(Math.max(v, 0), 1);
  return [clamp((ev.clientX - r.left - c.clientLeft) / c.clientWidth),
          clamp((ev.clientY - r.top - c.clientTop) / c.clientHeight)];
}

function dragBox(ev) {
  const [[ax, ay], [bx, by]] = [drag.start, canvasPoint(ev)];
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

function startDrag(ev) {
  if (ev.button !== 0) return;
  ev.preventDefault();
  $("layout-canvas").setPointerCapture(ev.pointerId);
  drag = { start: canvasPoint(ev), el: document.createElement("div") };
  drag.el.className = "layout-box drawing";
  $("layout-canvas").append(drag.el);
  placeBox(drag.el, dragBox(ev));
}

function endDrag(ev) {
  if (!drag) return;
  const box = dragBox(ev);
  drag = null;
  const added = box[2] - box[0] >= MIN_BOX && box[3] - box[1] >= MIN_BOX;
  if (added) boxes.push({ box, phrase: "" });
  renderLayout();
  if (added) [...document.querySelectorAll(".layout-phrase")].at(-1).focus(); // type its phrase next
}

function addToGallery(image) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + image.b64_json;
  img.alt = image.parameters.split("\n")[0];
  img.className = "result";
  const cap = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.textContent = image.parameters;
  cap.append(pre);
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("progress").hidden = !on;
  if (on) $("progress").value = 0;
}

async function generate(ev) {
  ev.preventDefault();
  if ($("api_key").value) localStorage.setItem("t2i_api_key", $("api_key").value);
  busy(true);
  setStatus("queued");
  try {
    let job = await api("POST", "/v1/jobs", request());
    current = job.id;
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, POLL_MS));
      job = await api("GET", "/v1/jobs/" + current);
      $("progress").value = job.progress;
      setStatus(job.status === "queued" ? `queued (position ${job.position})`
                : `step ${job.step}/${job.steps}` + (job.eta_seconds != null ? `, ${job.eta_seconds.toFixed(1)} s left` : ""));
    }
    if (job.status === "done") {
      job.images.forEach(addToGallery);
      setStatus(`done: seed ${job.seed}` + (job.warnings.length ? " (" + job.warnings.join("; ") + ")" : ""));
    } else {
      setStatus(job.status + (job.error ? ": " + job.error : ""), job.status === "failed");
    }
  } catch (e) {
    const wait = e.retryAfter ? ` (retry in ${e.retryAfter} s)` : "";
    setStatus(e.message + wait, true);
  } finally {
    current = null;
    busy(false);
  }
}

async function cancel() {
  if (!current) return;
  try { await api("DELETE", "/v1/jobs/" + current); } catch (e) { setStatus(e.message, true); }
}

$("api_key").value = localStorage.getItem("t2i_api_key") || "";
$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
$("api_key").addEventListener("change", keyChanged);
$("layout-canvas").addEventListener("pointerdown", startDrag);
$("layout-canvas").addEventListener("pointermove", (ev) => { if (drag) placeBox(drag.el, dragBox(ev)); });
$("layout-canvas").addEventListener("pointerup", endDrag);
$("layout-canvas").addEventListener("pointercancel", () => { drag = null; renderLayout(); });
$("layout-clear").addEventListener("click", () => { boxes = []; renderLayout(); });
for (const id of ["width", "height"]) $(id).addEventListener("input", fitCanvas);
for (const id of DEFAULTED) $(id).addEventListener("input", () => { $(id).dataset.edited = "1"; });
loadInfo();
