// Guided calibration: record labelled examples of the user's own room (POST /api/v1/labels),
// adapt the model to them (POST /api/v1/training-jobs, mode adapt, dataset recordings), show
// its accuracy before and after on held-out examples, and activate it on request
// (POST /api/v1/models/{id}/activate; a 409 is explained and "activate anyway" offered).
// The recorded range is on the AP's own clock: from the first segment captured after the
// countdown starts to the end of the last one captured before it ends, so neither the
// browser's clock nor a replay's speed matters.
"use strict";

const CAL = {
  recording: null,  // { key, since: {epoch, seq} | null, segments: Map, what }
  counts: new Map(),
  job: null,
  bundle: null,
  labelsAt: 0,
};
const JOB_POLL_MS = 1000;

function calShow(selector, text, kind = "") {
  const node = $(selector);
  node.textContent = text;
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// A write request with the tab's token; the parsed body and the status.
async function send(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl(path), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  return { status: response.status, data };
}

function detail(data) {
  if (typeof data?.detail === "string") return data.detail;
  if (Array.isArray(data?.detail)) return data.detail.map((d) => d.msg).join("; ");
  return "failed";
}

// -- the pickers ---------------------------------------------------------------------------------

function modelOf(key) {
  const ap = state.aps.get(key);
  return state.models.get(ap?.prediction?.model || ap?.model || ap?.status?.model);
}

function fillPickers() {
  const apSelect = $("#cal-ap");
  const keys = [...state.aps.keys()].sort();
  const current = apSelect.value;
  if (apSelect.options.length !== keys.length ||
      keys.some((k, i) => apSelect.options[i].value !== k)) {
    apSelect.replaceChildren(...keys.map((k) => el("option", { value: k, text: k })));
    if (keys.includes(current)) apSelect.value = current;
  }
  const model = modelOf(apSelect.value);
  const labels = model?.labels || {};
  const signature = JSON.stringify([model?.id, labels]);
  const what = $("#cal-what");
  if (what.dataset.signature === signature) return;
  what.dataset.signature = signature;
  const chosen = what.value;
  const groups = [];
  if (labels.activity?.length) {
    groups.push(el("optgroup", { label: "Activity" }, ...labels.activity.map(
      (a) => el("option", { value: `activity:${a}`, text: a }))));
  }
  if (labels.identity?.length) {
    groups.push(el("optgroup", { label: "Person (being there)" }, ...labels.identity.map(
      (u) => el("option", { value: `identity:${u}`, text: u }))));
  }
  what.replaceChildren(...groups);
  if ([...what.options].some((o) => o.value === chosen)) what.value = chosen;
  $("#cal-record").disabled = CAL.recording != null || !groups.length;
  if (!groups.length) {
    calShow("#cal-status", model ? "this AP's model has no activities to teach (presence only)"
                                 : "waiting for the AP's model…");
  }
}

// -- recording ----------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function later(a, b) { // is segment a after b (same stream order as the service)
  if (!b) return true;
  return a.epoch !== b.epoch ? a.timestamp > b.timestamp : a.seq > b.seq;
}

async function record(event) {
  event.preventDefault();
  if (CAL.recording) return;
  if (!token()) {
    calShow("#cal-status", "enter the API token at the top first: saving examples needs it",
            "error");
    return;
  }
  const key = $("#cal-ap").value;
  const [kind, value] = $("#cal-what").value.split(/:(.*)/s);
  const seconds = Number($("#cal-seconds").value);
  const ready = Number($("#cal-ready").value);
  if (!key || !value) return;
  if (!(seconds >= 2 && seconds <= 300) || !(ready >= 0 && ready <= 30)) {
    calShow("#cal-status", "seconds must be 2 to 300 and get-ready 0 to 30", "error");
    return;
  }
  const button = $("#cal-record");
  button.disabled = true;
  const countdown = $("#cal-countdown");
  try {
    for (let left = ready; left > 0; left--) {
      countdown.textContent = `Get ready: ${value} in ${left}…`;
      await sleep(1000);
    }
    CAL.recording = { key, since: state.aps.get(key)?.prediction || null, segments: new Map() };
    const started = Date.now();
    for (;;) {
      const left = Math.ceil(seconds - (Date.now() - started) / 1000);
      if (left <= 0) break;
      countdown.textContent = `Recording ${value}: ${left} s left`;
      countdown.dataset.state = "recording";
      await sleep(Math.min(250, left * 1000));
    }
    countdown.textContent = "Saving…";
    countdown.dataset.state = "";
    const segments = [...CAL.recording.segments.values()];
    CAL.recording = null;
    if (!segments.length) {
      calShow("#cal-status", `no CSI arrived from ${key} during the recording: is the AP ` +
              "online? Nothing was saved.", "error");
      return;
    }
    const model = modelOf(key);
    const spec = model?.input_spec;
    const step = spec?.segment_frames && spec?.nominal_rate_hz
      ? spec.segment_frames / spec.nominal_rate_hz : 1;
    const start = Math.min(...segments.map((s) => s.timestamp));
    const end = Math.max(...segments.map((s) => s.timestamp)) + step;
    const [site, ap] = key.split("/");
    const { status, data } = await send("POST", "/labels",
                                        { site, ap, start, end, [kind]: value });
    if (status === 201) {
      calShow("#cal-status", `saved: ${value} on ${key}, ${Math.round(end - start)} s ` +
              `(${segments.length} segments, example #${data.id})`, "ok");
      CAL.labelsAt = 0;
      await loadCounts();
    } else if (status === 401) {
      calShow("#cal-status", "the token was refused (401): nothing was saved", "error");
    } else {
      calShow("#cal-status", `not saved (${status}): ${detail(data)}`, "error");
    }
  } catch (error) {
    calShow("#cal-status", `not saved: ${error.message}`, "error");
  } finally {
    CAL.recording = null;
    countdown.textContent = "";
    countdown.dataset.state = "";
    button.disabled = false;
  }
}

function onCalPrediction(p) {
  const rec = CAL.recording;
  if (!rec || keyOf(p) !== rec.key || !later(p, rec.since)) return;
  rec.segments.set(`${p.epoch}/${p.seq}`, p);
}

// -- examples so far and adaptation ------------------------------------------------------------

async function loadCounts() {
  if (Date.now() - CAL.labelsAt < 3000) return;
  CAL.labelsAt = Date.now();
  try {
    const page = await getJson("/labels?limit=10000");
    const activities = new Map();
    const people = new Map();
    for (const l of page.data) {
      for (const [map, name] of [[activities, l.activity], [people, l.identity]]) {
        if (name == null) continue;
        const entry = map.get(name) || { n: 0, seconds: 0 };
        entry.n += 1;
        entry.seconds += l.end - l.start;
        map.set(name, entry);
      }
    }
    CAL.counts = activities;
    CAL.people = people;
  } catch {
    return;
  }
  renderCounts();
}

function needed() {
  const k = Math.round(Number($("#cal-k").value));
  return Number.isFinite(k) && k >= 2 ? k : 2;
}

function renderCounts() {
  const k = needed();
  const rows = [...CAL.counts.entries()].sort((a, b) => a[0].localeCompare(b[0]));
  $("#cal-counts tbody").replaceChildren(...(rows.length ? rows.map(([name, c]) =>
    el("tr", { "data-activity": name },
      el("td", { text: name }), el("td", { class: "num count", text: String(c.n) }),
      el("td", { class: "num", text: String(Math.round(c.seconds)) }),
      el("td", { text: c.n >= k ? "enough" : `${k - c.n} more` }))) :
    [el("tr", {}, el("td", { colspan: "4", text: "no example recorded yet" }))]));
  const people = [...(CAL.people || new Map()).entries()];
  $("#cal-people").textContent = people.length
    ? `People recorded: ${people.map(([n, c]) => `${n} (${c.n})`).join(", ")} (used to tell ` +
      "who is there; the adaptation here refits activities)."
    : "";
  const ready = rows.filter(([, c]) => c.n >= k);
  const busy = CAL.job && ["queued", "running"].includes(CAL.job.state);
  $("#cal-adapt").disabled = busy || ready.length < 2;
  if (!busy && !CAL.job) {
    calShow("#cal-adapt-status", ready.length >= 2
      ? `ready: ${ready.length} activities with ${k} or more examples`
      : `record ${k} examples each of at least two activities to adapt`);
  }
}

function mean(values) {
  const list = (values || []).filter(Number.isFinite);
  return list.length ? list.reduce((a, b) => a + b, 0) / list.length : null;
}

async function adapt() {
  if (!token()) {
    calShow("#cal-adapt-status", "enter the API token at the top first", "error");
    return;
  }
  const k = needed();
  const key = $("#cal-ap").value;
  const model = modelOf(key);
  // One example per activity fewer than recorded goes into the fit, so every activity keeps
  // at least one example the adapted model never saw to measure it on.
  // The stream recorded between the examples is unlabelled: the job self-trains on it and
  // drops the result where examples held out from the fit read it worse.
  const body = { mode: "adapt", dataset: "recordings", shots: k - 1,
                 self_train: $("#cal-self-train").checked };
  if (model) body.base_model = model.id;
  $("#cal-adapt").disabled = true;
  $("#cal-result").hidden = true;
  calShow("#cal-adapt-status", "starting the adaptation…");
  try {
    const { status, data } = await send("POST", "/training-jobs", body);
    if (status !== 202) {
      calShow("#cal-adapt-status", status === 401 ? "the token was refused (401)"
                                                  : `not started (${status}): ${detail(data)}`,
              "error");
      $("#cal-adapt").disabled = false;
      return;
    }
    CAL.job = data;
    await followJob(data.id);
  } catch (error) {
    calShow("#cal-adapt-status", `failed: ${error.message}`, "error");
    $("#cal-adapt").disabled = false;
  }
}

async function followJob(id) {
  const bar = $("#cal-progress");
  bar.hidden = false;
  for (;;) {
    let job;
    try {
      job = await getJson(`/training-jobs/${encodeURIComponent(id)}`);
    } catch (error) {
      calShow("#cal-adapt-status", `cannot read the job (${error.message}); retrying`);
      await sleep(JOB_POLL_MS);
      continue;
    }
    CAL.job = job;
    bar.value = job.progress || 0;
    const last = (job.log || "").trim().split("\n").at(-1) || "";
    if (job.state === "queued" || job.state === "running") {
      calShow("#cal-adapt-status", `${job.state}: ${last}`);
      await sleep(JOB_POLL_MS);
      continue;
    }
    bar.hidden = true;
    $("#cal-adapt").disabled = false;
    if (job.state === "failed") {
      calShow("#cal-adapt-status", `the adaptation failed: ${job.error || last}`, "error");
      return;
    }
    showResult(job);
    return;
  }
}

function showResult(job) {
  const m = job.metrics || {};
  CAL.bundle = job.bundle;
  const before = mean(m.activity_accuracy_before);
  const after = mean(m.activity_accuracy_after);
  const beforeS = mean(m.activity_accuracy_per_second_before);
  const afterS = mean(m.activity_accuracy_per_second_after);
  const pct = (v) => (v == null ? "—" : `${Math.round(v * 100)}%`);
  const where = m.held_out_accuracy === false
    ? `on the ${m.support ?? "recorded"} examples it learned from (none was left over to ` +
      "test it on: record more examples to get an honest figure)"
    : `on ${m.held_out} held-out example${m.held_out === 1 ? "" : "s"} it never saw ` +
      `(learned from ${m.support})`;
  const node = $("#cal-accuracy");
  node.replaceChildren(
    el("span", { text: "Activity accuracy " }),
    el("strong", { class: "before", text: pct(before) }),
    el("span", { text: " before → " }),
    el("strong", { class: "after", text: pct(after) }),
    el("span", { text: ` after, ${where}; per second ${pct(beforeS)} → ${pct(afterS)}.` }),
    el("span", { class: "self-training", text: selfTrainingLine(m.self_training) }));
  node.dataset.before = String(before);
  node.dataset.after = String(after);
  calShow("#cal-adapt-status", `adapted model ready: ${(job.bundle || "").slice(0, 12)}`, "ok");
  calShow("#cal-activate-status", m.activated ? "already active" : "");
  $("#cal-result").hidden = false;
  $("#cal-force").hidden = true;
  $("#cal-activate").disabled = !job.bundle;
}

// What self-training on the unlabelled stream did, in a sentence ("" when not asked for).
function selfTrainingLine(trained) {
  if (!trained) return "";
  const n = `${trained.unlabelled} unlabelled piece${trained.unlabelled === 1 ? "" : "s"}`;
  if (trained.kept) {
    const without = mean(trained.activity_accuracy_without);
    return ` Self-trained on ${n} of the stream` +
      (without == null ? "." : ` (${Math.round(without * 100)}% without it).`);
  }
  return ` Self-training on ${n} of the stream not kept: ${trained.reason}.`;
}

async function activate(force) {
  if (!CAL.bundle) return;
  if (!token()) {
    calShow("#cal-activate-status", "enter the API token at the top first", "error");
    return;
  }
  const query = force ? "?force=true" : "";
  calShow("#cal-activate-status", "activating…");
  try {
    const { status, data } = await send(
      "POST", `/models/${encodeURIComponent(CAL.bundle)}/activate${query}`);
    if (status === 200) {
      const n = (data.announced_to || []).length;
      calShow("#cal-activate-status", "active: the cloud now classifies with the adapted " +
              `model (${n ? `announced to ${n} AP${n === 1 ? "" : "s"}` :
                            "same edge part: the APs stream on unchanged"})`, "ok");
      $("#cal-force").hidden = true;
      state.models.clear(); // names and the active flag changed
    } else if (status === 409) {
      calShow("#cal-activate-status", `Not activated: ${detail(data)}. The service refuses ` +
              "a model that is not shown to be better on examples it never saw. Record more " +
              "examples and adapt again, or activate it anyway.", "error");
      $("#cal-force").hidden = false;
    } else if (status === 401) {
      calShow("#cal-activate-status", "the token was refused (401)", "error");
    } else {
      calShow("#cal-activate-status", `not activated (${status}): ${detail(data)}`, "error");
    }
  } catch (error) {
    calShow("#cal-activate-status", `failed: ${error.message}`, "error");
  }
}

// An adaptation started earlier (another tab, a reload during the job): follow it, or show
// its result while its bundle is not active yet.
async function resumeJob() {
  if (CAL.resumed) return;
  CAL.resumed = true;
  try {
    const page = await getJson("/training-jobs?limit=5");
    const job = page.data.find((j) => j.request?.mode === "adapt");
    if (!job || CAL.job) return;
    if (job.state === "queued" || job.state === "running") {
      CAL.job = job;
      $("#cal-adapt").disabled = true;
      await followJob(job.id);
    } else if (job.state === "succeeded" && job.bundle) {
      const model = await getJson(`/models/${encodeURIComponent(job.bundle)}`);
      if (!model.active) {
        CAL.job = job;
        showResult(job);
      }
    }
  } catch {
    // no training jobs on this service, or not reachable: nothing to resume
  }
}

// -- wiring -------------------------------------------------------------------------------------

$("#cal-form").addEventListener("submit", record);
$("#cal-ap").addEventListener("change", fillPickers);
$("#cal-k").addEventListener("input", renderCounts);
$("#cal-adapt").addEventListener("click", adapt);
$("#cal-activate").addEventListener("click", () => activate(false));
$("#cal-force").addEventListener("click", () => activate(true));
hooks.prediction.push(onCalPrediction);
hooks.aps.push(() => {
  fillPickers();
  if (state.view === "calibrate") loadCounts();
});
hooks.view.push((view) => {
  if (view === "calibrate") {
    fillPickers();
    resumeJob();
    CAL.labelsAt = 0;
    loadCounts();
  }
});
// Opened on this view (app.js showed it before this script added its hooks).
if (state.view === "calibrate") call("view", "calibrate");
