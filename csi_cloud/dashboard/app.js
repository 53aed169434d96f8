// csi-pipeline dashboard: plain JavaScript, no dependencies, everything from this origin.
// Live predictions come over the WebSocket (/api/v1/predictions/ws), else Server-Sent Events
// (/api/v1/predictions/stream); the AP table is polled every 2 s either way (/api/v1/aps), which
// alone keeps the page current when neither stream works.
// This file: shared state, the live feed, the views and the engineer's console. people.js (room
// cards, timeline, truth) and calibrate.js (guided calibration) hook into it through `hooks`.
"use strict";

const POLL_MS = 2000;
const HISTORY = 60;
const CSI_MIN_INTERVAL_MS = 1000;
const TOKEN_KEY = "csi-token";
// Viridis, 5 stops (the colour bar in style.css uses the same).
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
                 "#db2777", "#4b5563", "#65a30d"];

// Listeners the other scripts add: prediction(p) for every live or polled prediction,
// aps() after each poll of /api/v1/aps, event(e) for an event message on a live stream,
// view(name) when the shown view changes.
const hooks = { prediction: [], aps: [], event: [], view: [] };
const VIEWS = ["rooms", "calibrate", "console"];

const state = {
  aps: new Map(),      // "site/ap" -> AP from /api/v1/aps, prediction kept up to date live
  rows: new Map(),     // "site/ap" -> the row's elements
  models: new Map(),   // model id -> bundle from /api/v1/models
  modelsLoading: null,
  selected: null,
  history: [],         // predictions of the selected AP, newest first
  csi: { busy: false, at: 0, key: null, seq: null, data: null },
  transport: null,
  view: "rooms",
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "background") node.style.background = value; // CSSOM: allowed by the CSP
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function call(hook, ...args) {
  for (const listener of hooks[hook]) {
    try {
      listener(...args);
    } catch (error) {
      console.error(`${hook} listener failed`, error); // one view's bug must not stop the rest
    }
  }
}

function apiUrl(path) {
  return new URL(`api/v1${path}`, document.baseURI);
}

async function getJson(path) {
  const response = await fetch(apiUrl(path), { headers: { Accept: "application/json" } });
  if (!response.ok) {
    const error = new Error(`${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

const apPath = (key) => key.split("/").map(encodeURIComponent).join("/");
const keyOf = (item) => `${item.site}/${item.ap}`;

// -- formatting ------------------------------------------------------------------------------

function clock(seconds) {
  if (seconds == null) return "—";
  return new Date(seconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

function ago(seconds) {
  if (seconds == null) return "never seen";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return `seen ${Math.round(s)} s ago`;
  if (s < 5400) return `seen ${Math.round(s / 60)} min ago`;
  return `seen ${Math.round(s / 3600)} h ago`;
}

function bytes(value) {
  if (value == null || !Number.isFinite(value)) return "—";
  return value >= 1000 ? Math.round(value).toLocaleString("en-US") : value.toFixed(1);
}

const percent = (p) => (p == null ? "" : `${Math.round(p * 100)}%`);

function colourOf(label, labels) {
  let index = labels ? labels.indexOf(label) : -1;
  if (index < 0) {
    index = 0;
    for (const ch of String(label)) index = (index * 31 + ch.charCodeAt(0)) >>> 0;
  }
  return PALETTE[index % PALETTE.length];
}

// -- models: names, levels and what the raw CSI stream would need -------------------------------

async function ensureModels(ids) {
  if (![...ids].some((id) => id && !state.models.has(id))) return;
  if (!state.modelsLoading) {
    state.modelsLoading = getJson("/models")
      .then((page) => { for (const m of page.data) state.models.set(m.id, m); })
      .catch(() => {})
      .finally(() => { state.modelsLoading = null; });
  }
  await state.modelsLoading;
}

// Raw CSI bytes/s for a model: the bundle's measured native stream, else int16 I/Q of each
// subcarrier and antenna at the nominal rate of the input spec.
function rawBytesPerS(model) {
  if (!model) return { value: null, how: "" };
  const measured = model.metrics?.test_split?.native_bytes_per_s;
  if (Number.isFinite(measured)) {
    return { value: measured, how: "bundle metrics: native CSI stream of its test recordings" };
  }
  const spec = model.input_spec || {};
  const subcarriers = (spec.subcarriers || []).length;
  const value = 4 * subcarriers * (spec.antennas || 1) * (spec.nominal_rate_hz || 0);
  return { value: value || null,
           how: `input spec: 4 B × ${subcarriers} subcarriers × ${spec.antennas} antennas × ` +
                `${spec.nominal_rate_hz} Hz` };
}

// -- the AP table ---------------------------------------------------------------------------------

function newer(a, b) {
  if (!b) return true;
  if (a.epoch !== b.epoch) return a.epoch > b.epoch;
  return a.seq > b.seq;
}

function makeRow(key) {
  const cells = {
    name: el("td", { class: "name" }),
    state: el("td"),
    activity: el("td"),
    identity: el("td"),
    seq: el("td"),
    payload: el("td", { class: "num payload" }),
    raw: el("td", { class: "num raw" }),
    gaps: el("td", { class: "num gaps" }),
    model: el("td", { class: "model" }),
    rate: el("td", { class: "rate" }),
  };
  const level = el("span", { class: "level" });
  const select = el("select", { class: "rate-select", "aria-label": `rate level of ${key}` });
  const button = el("button", { type: "submit", class: "rate-set", text: "Set" });
  const result = el("output", { class: "rate-result" });
  const form = el("form", { class: "rate-form" }, el("span", { text: "level " }), level, select,
                  button);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setRate(key, Number(select.value));
  });
  // The controls must not select the row (and so re-render under the pointer).
  form.addEventListener("click", (event) => event.stopPropagation());
  cells.rate.append(form, result);
  const row = el("tr", { "data-ap": key, tabindex: "0", "aria-selected": "false" },
                 ...Object.values(cells));
  row.addEventListener("click", () => select_(key));
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter") select_(key);
  });
  const parts = { row, cells, level, select, result, requested: null, levels: null };
  state.rows.set(key, parts);
  return parts;
}

function presenceText(p) {
  if (p.presence == null) return "calibrating";
  return `${p.presence ? "occupied" : "empty"}${p.motion ? ", motion" : ""}`;
}

function setCell(cell, main, sub, cls) {
  cell.replaceChildren();
  const first = el("span", { class: cls || "", text: main });
  cell.append(first);
  if (sub) cell.append(el("span", { class: "sub", text: sub }));
  return first;
}

function renderRow(key) {
  const ap = state.aps.get(key);
  const parts = state.rows.get(key) || makeRow(key);
  const { cells } = parts;
  const status = ap.status || {};
  const p = ap.prediction;
  const model = state.models.get(ap.model || status.model);

  // The source's last two path parts (a replay's full path would widen the table).
  const source = ap.source || status.source || "";
  const short = source.split("/").filter(Boolean).length > 3
    ? `…/${source.split("/").slice(-2).join("/")}` : source;
  setCell(cells.name, key, short).title = source;
  setCell(cells.state, ap.online ? "online" : "offline", ago(ap.last_seen),
          `state ${ap.online ? "online" : "offline"}`);

  if (p) {
    // A presence-only AP (no bundle on the edge) has presence and motion, no activity.
    const act = p.activity != null
      ? setCell(cells.activity, p.activity, `${percent(p.activity_confidence)} confident`,
                "activity")
      : setCell(cells.activity, presenceText(p), "presence only", "activity");
    act.title = p.activity != null ? "activity (confidence)" :
      `motion score ${p.motion_score ?? "—"} (log2 of the variability over the quiet room)`;
    setCell(cells.identity, p.identity ?? "—",
            p.identity_confidence == null ? "" : `${percent(p.identity_confidence)} confident`,
            "identity");
    setCell(cells.seq, `#${p.seq}`, `captured ${clock(p.timestamp)}`, "seq");
    cells.seq.title = `epoch ${p.epoch}, context ${p.context_present}/${p.context_size}, ` +
                      `quality ${p.quality}`;
  } else {
    setCell(cells.activity, "—", "no prediction yet", "activity");
    setCell(cells.identity, "—", "", "identity");
    setCell(cells.seq, "—", "", "seq");
  }

  const payload = ap.counters?.payload_bytes_per_s;
  setCell(cells.payload, bytes(payload), "compressed", "payload-value");
  const raw = rawBytesPerS(model);
  const ratio = raw.value && payload ? `${Math.round(raw.value / payload)}× less sent` : "raw";
  setCell(cells.raw, bytes(raw.value), ratio, "raw-value").title = raw.how;
  const gaps = setCell(cells.gaps, String(ap.gaps ?? 0), `${ap.missing_segments ?? 0} lost`,
                       "gaps-value");
  cells.gaps.classList.toggle("some", (ap.gaps ?? 0) > 0);
  gaps.title = "sequence gaps; segments lost in them below";

  const modelId = ap.model || status.model || "";
  setCell(cells.model, model ? model.name : (status.model_name || "—"),
          modelId ? modelId.slice(0, 12) : "");

  const level = status.rate_level ?? ap.rate_level;
  parts.level.textContent = level ?? "—";
  const levels = model ? model.levels : null;
  const signature = JSON.stringify(levels);
  if (levels && parts.levels !== signature) {
    parts.levels = signature;
    const perLevel = model.metrics?.test_split?.levels || [];
    parts.select.replaceChildren(...levels.map((lv) => {
      const bps = perLevel.find((m) => m.level === lv.level)?.payload_bytes_per_s;
      return el("option", { value: String(lv.level),
                            text: bps ? `${lv.level} (≈${bps} B/s)` : String(lv.level) });
    }));
    if (level != null) parts.select.value = String(level);
  } else if (!levels && !parts.select.options.length) {
    parts.select.replaceChildren(...[0, 1, 2, 3].map(
      (lv) => el("option", { value: String(lv), text: String(lv) })));
  }
  if (parts.requested != null && level === parts.requested) {
    parts.result.textContent = `the AP runs level ${level}`;
    parts.result.classList.remove("error");
    parts.requested = null;
  }
  parts.row.setAttribute("aria-selected", String(key === state.selected));
  return parts.row;
}

function renderTable() {
  const body = $("#aps tbody");
  const keys = [...state.aps.keys()].sort();
  const rows = keys.map(renderRow);
  // Re-insert only when the set or order changed (re-inserting closes an open drop-down).
  if (rows.length !== body.children.length || rows.some((row, i) => body.children[i] !== row)) {
    body.replaceChildren(...rows);
  }
  $("#empty").hidden = keys.length > 0;
  const online = keys.filter((k) => state.aps.get(k).online).length;
  $("#summary").textContent = `${keys.length} AP${keys.length === 1 ? "" : "s"}, ` +
    `${online} online, ${keys.length - online} offline · updated ${clock(Date.now() / 1000)}`;
}

async function refresh() {
  try {
    const page = await getJson("/aps");
    await ensureModels(new Set(page.data.flatMap((ap) => [ap.model, ap.status?.model])));
    const seen = new Set();
    for (const ap of page.data) {
      const key = keyOf(ap);
      seen.add(key);
      const live = state.aps.get(key)?.prediction;
      if (live && !newer(ap.prediction || live, live)) ap.prediction = live;
      state.aps.set(key, ap);
    }
    for (const key of [...state.aps.keys()]) {
      if (!seen.has(key)) {
        state.aps.delete(key);
        state.rows.delete(key);
      }
    }
    renderTable();
    for (const ap of state.aps.values()) if (ap.prediction) call("prediction", ap.prediction);
    call("aps");
    if (!state.selected || !state.aps.has(state.selected)) {
      const wanted = route().ap;
      const first = state.aps.has(wanted) ? wanted : [...state.aps.keys()].sort()[0];
      if (first) select_(first);
    } else {
      const latest = state.aps.get(state.selected).prediction;
      if (latest) remember(latest);
      updateCsi();
    }
  } catch (error) {
    $("#summary").textContent = `cannot reach the service (${error.message}); retrying`;
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

// -- commands to an AP (rate, presence calibration) -------------------------------------------

// Send one write request with the saved API token; `output` shows what happened. True when
// the service accepted it (202: the command is on the AP's ctl topic; 204: done), the answer's
// JSON for a 200 (done, with a result), false (and why in `output`) otherwise.
async function sendCommand(path, method, body, output) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const show = (text, error = false) => {
    output.textContent = text;
    output.classList.toggle("error", error);
  };
  if (!token) {
    show("enter the API token at the top first", true);
    return false;
  }
  try {
    const response = await fetch(apiUrl(path), {
      method,
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 202 || response.status === 204) return true;
    if (response.ok) return (await response.json().catch(() => null)) ?? true;
    if (response.status === 401) {
      show("token refused (401)", true);
    } else {
      const detail = await response.json().catch(() => ({}));
      show(`${response.status}: ${typeof detail.detail === "string" ? detail.detail : "failed"}`,
           true);
    }
  } catch (error) {
    show(`failed: ${error.message}`, true);
  }
  return false;
}

async function setRate(key, level) {
  const parts = state.rows.get(key);
  parts.result.textContent = `sending level ${level}…`;
  parts.result.classList.remove("error");
  if (await sendCommand(`/aps/${apPath(key)}/rate`, "POST", { level }, parts.result)) {
    parts.requested = level;
    parts.result.textContent = `level ${level} sent; waiting for the AP`;
  }
}

function setupToken() {
  const input = $("#token");
  const shown = $("#token-state");
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) shown.textContent = "token saved for this tab";
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (value) {
      sessionStorage.setItem(TOKEN_KEY, value);
      shown.textContent = "token saved for this tab";
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
      shown.textContent = "token cleared";
    }
    input.value = "";
  });
}

// -- live predictions ---------------------------------------------------------------------------

function setTransport(kind) {
  state.transport = kind;
  const node = $("#transport");
  node.dataset.kind = kind;
  node.textContent = { ws: "live: WebSocket", sse: "live: Server-Sent Events",
                       poll: "polling every 2 s" }[kind] || kind;
  node.classList.toggle("degraded", kind === "poll");
}

function onPrediction(p) {
  // A live stream may also carry events (activity or presence changes): not predictions.
  if (p == null || typeof p !== "object") return;
  if (p.seq == null) {
    call("event", p);
    return;
  }
  const key = keyOf(p);
  const ap = state.aps.get(key);
  if (!ap) return; // a new AP: the next poll adds it
  if (newer(p, ap.prediction)) {
    ap.prediction = p;
    if (p.model) ap.model = p.model;
    renderRow(key);
  }
  call("prediction", p);
  if (key === state.selected) {
    remember(p);
    updateCsi();
  }
}

// A prediction of the selected AP into its history (live, or the latest one from a poll).
function remember(p) {
  if (state.history.some((h) => h.epoch === p.epoch && h.seq === p.seq)) return;
  state.history.unshift(p);
  state.history.sort((a, b) => b.timestamp - a.timestamp || b.seq - a.seq);
  state.history.length = Math.min(state.history.length, HISTORY);
  renderHistory();
}

function connectWs() {
  const url = apiUrl("/predictions/ws");
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  let opened = false;
  let ws;
  try {
    ws = new WebSocket(url);
  } catch {
    connectSse();
    return;
  }
  ws.onopen = () => { opened = true; setTransport("ws"); };
  ws.onmessage = (event) => onPrediction(JSON.parse(event.data));
  ws.onclose = () => {
    if (opened) setTimeout(connectWs, 2000); // it worked: reconnect the same way
    else connectSse();
  };
}

function connectSse() {
  let source;
  try {
    source = new EventSource(apiUrl("/predictions/stream"));
  } catch {
    fallBackToPolling();
    return;
  }
  let opened = false;
  source.onopen = () => { opened = true; setTransport("sse"); };
  source.addEventListener("prediction", (event) => onPrediction(JSON.parse(event.data)));
  source.addEventListener("event", (event) => call("event", JSON.parse(event.data)));
  source.onerror = () => {
    if (!opened || source.readyState === EventSource.CLOSED) {
      source.close();
      fallBackToPolling();
    } // else the browser reconnects by itself
  };
}

function fallBackToPolling() {
  setTransport("poll");
  setTimeout(connectWs, 15000); // try the streams again now and then
}

// -- the selected AP: CSI heatmap and history --------------------------------------------------

function select_(key) {
  if (state.selected === key) return;
  state.selected = key;
  setRoute({ ap: key });
  for (const [k, parts] of state.rows) parts.row.setAttribute("aria-selected", String(k === key));
  $("#detail").hidden = false;
  $("#detail-name").textContent = key;
  state.history = [];
  state.csi.seq = null;
  state.csi.data = null;
  renderHistory();
  clearHeatmap("waiting for a segment…");
  loadHistory(key);
  updateCsi();
}

async function loadHistory(key) {
  const [site, ap] = key.split("/");
  try {
    const params = new URLSearchParams({ site, ap, limit: String(HISTORY) });
    const page = await getJson(`/predictions?${params}`);
    if (state.selected !== key) return;
    const known = new Set(state.history.map((h) => `${h.epoch}:${h.seq}`));
    state.history.push(...page.data.filter((h) => !known.has(`${h.epoch}:${h.seq}`)));
    state.history.sort((a, b) => b.timestamp - a.timestamp || b.seq - a.seq);
    state.history.length = Math.min(state.history.length, HISTORY);
    renderHistory();
  } catch {
    // the next live prediction or selection tries again
  }
}

// A stored run of idle segments (one row for several, segments > 1) shows its span.
const seqText = (h) => (h.segments > 1 ? `#${h.seq}–${h.seq + h.segments - 1}` : `#${h.seq}`);

function renderHistory() {
  const ap = state.aps.get(state.selected);
  const labels = state.models.get(ap?.model)?.labels?.activity;
  const strip = $("#strip");
  // Without a model (presence only) a history entry shows presence instead of an activity.
  const what = (h) => h.activity ?? presenceText(h);
  const sure = (h) => (h.activity_confidence == null ? "" : percent(h.activity_confidence));
  strip.replaceChildren(...[...state.history].reverse().map((h) => el("span", {
    background: colourOf(what(h), labels),
    title: `${seqText(h)} ${clock(h.timestamp)}: ${what(h)}`,
  })));
  $("#legend").replaceChildren(...(labels || []).map((label) => el("li", {},
    el("span", { class: "swatch", background: colourOf(label, labels) }),
    el("span", { text: label }))));
  $("#history").replaceChildren(...state.history.slice(0, 20).map((h) => el("li", {},
    el("time", { datetime: new Date(h.timestamp * 1000).toISOString(),
                 text: `${clock(h.timestamp)}` }),
    el("span", { class: "swatch", background: colourOf(what(h), labels) }),
    el("span", { text: `${seqText(h)} ${what(h)} ${sure(h)}` }),
    el("span", { class: "conf",
                 text: h.identity ? `${h.identity} ${percent(h.identity_confidence)}` : "" }),
  )));
}

async function updateCsi() {
  const key = state.selected;
  const latest = state.aps.get(key)?.prediction;
  const csi = state.csi;
  if (!key || csi.busy || Date.now() - csi.at < CSI_MIN_INTERVAL_MS) return;
  if (csi.key === key && latest && csi.seq === latest.seq) return;
  csi.busy = true;
  csi.at = Date.now();
  try {
    const data = await getJson(`/aps/${apPath(key)}/csi`);
    if (state.selected !== key) return;
    csi.key = key;
    csi.seq = data.seq;
    csi.data = data;
    drawHeatmap(data);
  } catch (error) {
    if (state.selected === key) {
      clearHeatmap(error.status === 404 ? "no segment from this AP since the service started"
                                        : `CSI unavailable (${error.message})`);
    }
  } finally {
    csi.busy = false;
  }
}

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + (VIRIDIS[i + 1][k] - c) * f));
}

function clearHeatmap(text) {
  const canvas = $("#heatmap");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("#heatmap-caption").textContent = text;
  $("#cb-min").textContent = "";
  $("#cb-max").textContent = "";
}

// Time across (oldest left), subcarriers up (lowest at the bottom), one pixel per value,
// scaled up without smoothing.
function drawHeatmap(data) {
  const frames = data.values.length;
  const width = frames ? data.values[0].length : 0;
  if (!frames || !width) {
    clearHeatmap("empty segment");
    return;
  }
  // Optionally each subcarrier relative to its mean over the segment: the static channel
  // (most of the range) goes, what moved stays.
  const relative = $("#relative").checked;
  const offset = new Float64Array(width);
  if (relative) {
    for (const row of data.values) row.forEach((v, s) => { offset[s] += v / frames; });
  }
  let low = Infinity;
  let high = -Infinity;
  for (const row of data.values) {
    row.forEach((v, s) => {
      low = Math.min(low, v - offset[s]);
      high = Math.max(high, v - offset[s]);
    });
  }
  const span = high - low || 1;
  const image = new ImageData(frames, width);
  for (let t = 0; t < frames; t++) {
    const row = data.values[t];
    for (let s = 0; s < width; s++) {
      const [r, g, b] = viridis((row[s] - offset[s] - low) / span);
      const at = ((width - 1 - s) * frames + t) * 4;
      image.data[at] = r;
      image.data[at + 1] = g;
      image.data[at + 2] = b;
      image.data[at + 3] = 255;
    }
  }
  const small = document.createElement("canvas");
  small.width = frames;
  small.height = width;
  small.getContext("2d").putImageData(image, 0, 0);
  const canvas = $("#heatmap");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  const domain = data.domain === "log1p_amplitude" ? "log(1 + |H|)" : data.domain;
  const sc = data.subcarriers;
  $("#cb-min").textContent = low.toFixed(2);
  $("#cb-max").textContent = high.toFixed(2);
  $("#heatmap-caption").textContent =
    `Reconstructed CSI of segment #${data.seq} (captured ${clock(data.timestamp)}), ` +
    `model ${data.model_name}, level ${data.rate_level}: ${frames} frames ` +
    `(${(frames / data.rate_hz).toFixed(2)} s at ${data.rate_hz} Hz) across, ` +
    `${width} subcarriers (${sc[0]} at the bottom to ${sc[sc.length - 1]}) up` +
    `${data.antennas > 1 ? `, antenna ${data.antenna} of ${data.antennas}` : ""}; ` +
    `colour: ${domain}${relative ? " minus each subcarrier's segment mean" : ""}.`;
}

// -- views: rooms, calibration, console (#view=NAME&ap=SITE/AP in the address) --------------------

function route() {
  const hash = location.hash.slice(1);
  if (hash && !hash.includes("=")) return { view: "console", ap: decodeURIComponent(hash) };
  const params = new URLSearchParams(hash);
  const view = VIEWS.includes(params.get("view")) ? params.get("view") : "rooms";
  return { view, ap: params.get("ap") || "" };
}

function setRoute(change) {
  const next = { ...route(), ...change };
  const params = new URLSearchParams({ view: next.view });
  if (next.ap) params.set("ap", next.ap);
  history.replaceState(null, "", `#${params}`);
}

function showView(name) {
  if (!VIEWS.includes(name)) name = "rooms";
  state.view = name;
  for (const view of VIEWS) {
    $(`#view-${view}`).hidden = view !== name;
    const tab = $(`#tab-${view}`);
    tab.setAttribute("aria-selected", String(view === name));
    tab.tabIndex = view === name ? 0 : -1;
  }
  setRoute({ view: name });
  call("view", name);
  if (name === "console" && state.csi.data) drawHeatmap(state.csi.data);
}

function setupViews() {
  const tabs = VIEWS.map((view) => $(`#tab-${view}`));
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => showView(tab.dataset.view));
    tab.addEventListener("keydown", (event) => { // arrow keys move along the tabs
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      showView(next.dataset.view);
    });
  });
  showView(route().view);
}

// -- start ----------------------------------------------------------------------------------------

setupToken();
setupViews();
$("#relative").addEventListener("change", () => {
  if (state.csi.data) drawHeatmap(state.csi.data);
});
setTransport("connecting…");
refresh();
connectWs();
// "seen N s ago" and the CSI view tick even without new data.
setInterval(() => { for (const key of state.aps.keys()) renderRow(key); }, 5000);
