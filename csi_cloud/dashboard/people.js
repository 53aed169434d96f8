// The view for people: a card per AP (occupied or empty, what is happening, who) with the truth
// beside it where the stream is labelled, and a timeline of events. Uses app.js's state and
// hooks. Fields a newer service adds are used when present: `smoothed` / `uncertain` on a
// prediction, GET /api/v1/events; without them the raw prediction is shown and the events are
// derived here from the changes of the live predictions.
"use strict";

const PEOPLE = {
  cards: new Map(),      // "site/ap" -> the card's elements
  recent: new Map(),     // "site/ap" -> the last predictions (oldest first), for the strip
  seen: new Set(),       // "site/ap/epoch/seq" of predictions counted already
  score: new Map(),      // "site/ap" -> { seconds, activity: [n, right], identity: [n, right], abstained }
  labels: new Map(),     // "site/ap" -> { at, ranges: [{start, end, activity, identity}] }
  events: [],            // derived events, newest first
  open: new Map(),       // "site/ap/kind" -> the open derived event
  serverEvents: null,    // null: unknown yet; false: the service has no /events; else the list
  eventsAt: 0,
  measuring: new Map(),  // "site/ap" -> { sent, until (ms), seen }: an empty-room measurement
};
// The room card's empty-room measurement: time to leave the room, then 30 s of it (the edge
// also passes over the ~5 s its motion statistic looks back).
const EMPTY_ROOM_S = 30;
const LEAVE_S = 10;
const LOOKBACK_S = 5;
const STARTS_WITHIN_MS = 15000;  // the AP's status says "measuring" within this, or it did not
const STRIP = 40;
const EVENTS_SHOWN = 50;
const LABELS_EVERY_MS = 5000;

// -- what a prediction says (smoothed and abstaining where the service provides it) ------------

function reading(p) {
  let activity = p.activity;
  let confidence = p.activity_confidence;
  let smoothed = false;
  const s = p.smoothed;
  if (s && typeof s === "object") {
    activity = s.activity ?? activity;
    confidence = s.activity_confidence ?? s.confidence ?? confidence;
    smoothed = true;
  } else if (typeof s === "string") {
    activity = s;
    confidence = p.smoothed_confidence ?? p.smoothed_activity_confidence ?? confidence;
    smoothed = true;
  } else if (p.smoothed_activity != null) {
    activity = p.smoothed_activity;
    confidence = p.smoothed_activity_confidence ?? confidence;
    smoothed = true;
  }
  const uncertain = p.uncertain === true || (s && typeof s === "object" && s.uncertain === true);
  return { activity, confidence, smoothed, uncertain };
}

// -- truth: labels of the AP's stream (a labelled replay, or calibration recordings) -----------

async function loadLabels(key) {
  const cached = PEOPLE.labels.get(key);
  if (cached && (cached.busy || Date.now() - cached.at < LABELS_EVERY_MS)) return;
  const entry = cached || { at: 0, ranges: [] };
  entry.busy = true;
  PEOPLE.labels.set(key, entry);
  const [site, ap] = key.split("/");
  try {
    const page = await getJson(`/labels?${new URLSearchParams({ site, ap, limit: "1000" })}`);
    entry.ranges = page.data.map((l) => ({ start: l.start, end: l.end, activity: l.activity,
                                           identity: l.identity }));
  } catch {
    // no labels endpoint or not reachable: no truth shown
  } finally {
    entry.at = Date.now();
    entry.busy = false;
  }
}

function truthAt(key, t) {
  const ranges = PEOPLE.labels.get(key)?.ranges || [];
  let activity = null;
  let identity = null;
  for (const r of ranges) { // newest first: the newest label of a time wins
    if (r.start <= t && t < r.end) {
      activity = activity ?? r.activity;
      identity = identity ?? r.identity;
    }
  }
  return activity == null && identity == null ? null : { activity, identity };
}

function count(key, p) {
  const id = `${key}/${p.epoch}/${p.seq}`;
  if (PEOPLE.seen.has(id)) return;
  const truth = truthAt(key, p.timestamp);
  if (!truth) {
    loadLabels(key); // a label may have been added since (the demo labels each pass)
    return;
  }
  PEOPLE.seen.add(id);
  if (PEOPLE.seen.size > 100000) PEOPLE.seen.clear();
  const score = PEOPLE.score.get(key) || { seconds: 0, activity: [0, 0], identity: [0, 0],
                                           abstained: 0 };
  PEOPLE.score.set(key, score);
  score.seconds += 1;
  const r = reading(p);
  if (truth.activity != null && r.activity != null) {
    if (r.uncertain) score.abstained += 1;
    else {
      score.activity[0] += 1;
      if (r.activity === truth.activity) score.activity[1] += 1;
    }
  }
  if (truth.identity != null && p.identity != null) {
    score.identity[0] += 1;
    if (p.identity === truth.identity) score.identity[1] += 1;
  }
}

// -- the cards ----------------------------------------------------------------------------------

function makeCard(key) {
  const [site, ap] = key.split("/");
  const parts = {
    name: el("h3", { class: "room-name", text: ap }),
    site: el("span", { class: "room-site", text: site }),
    state: el("span", { class: "state" }),
    presence: el("p", { class: "presence" }),
    activity: el("span", { class: "room-activity" }),
    confidence: el("span", { class: "room-confidence" }),
    meter: el("span", { class: "meter-fill" }),
    who: el("p", { class: "who" }),
    truth: el("p", { class: "truth", hidden: "" }),
    accuracy: el("p", { class: "accuracy", hidden: "" }),
    strip: el("div", { class: "room-strip", role: "img",
                       "aria-label": "activity of the last seconds, oldest left" }),
    seen: el("p", { class: "seen" }),
    calibration: el("summary", {}),
    calibrationText: el("p", { class: "calibration-text" }),
    measure: el("button", { type: "button", class: "measure-empty" }),
    release: el("button", { type: "button", class: "release-empty" }),
    calibrationResult: el("output", { class: "calibration-result" }),
    thresholdText: el("p", { class: "threshold-text" }),
    fitThreshold: el("button", { type: "button", class: "fit-threshold",
                                 text: "Fit to the labelled seconds" }),
    siteThreshold: el("button", { type: "button", class: "site-threshold",
                                  text: "Back to the site's threshold" }),
  };
  parts.measure.addEventListener("click", () => calibratePresence(key, "measure"));
  parts.release.addEventListener("click", () => calibratePresence(key, "release"));
  parts.fitThreshold.addEventListener("click", () => motionThreshold(key, "fit"));
  parts.siteThreshold.addEventListener("click", () => motionThreshold(key, "site"));
  parts.details = el("details", { class: "presence-calibration" }, parts.calibration,
    parts.calibrationText, el("p", { class: "calibration-actions" }, parts.measure, parts.release),
    parts.thresholdText,
    el("p", { class: "calibration-actions" }, parts.fitThreshold, parts.siteThreshold),
    parts.calibrationResult);
  const card = el("article", { class: "room", "data-ap": key },
    el("header", {}, parts.name, parts.site, parts.state),
    parts.presence,
    el("p", { class: "what" }, parts.activity, parts.confidence),
    el("div", { class: "meter", "aria-hidden": "true" }, parts.meter),
    parts.who, parts.truth, parts.accuracy, parts.strip, parts.seen, parts.details);
  parts.card = card;
  PEOPLE.cards.set(key, parts);
  return parts;
}

function renderCard(key) {
  const ap = state.aps.get(key);
  if (!ap) return null;
  const parts = PEOPLE.cards.get(key) || makeCard(key);
  const p = ap.prediction;
  parts.state.textContent = ap.online ? "online" : "offline";
  parts.state.className = `state ${ap.online ? "online" : "offline"}`;
  parts.seen.textContent = ago(ap.last_seen);
  renderCalibration(key, ap, parts);

  if (!p) {
    parts.presence.textContent = "waiting for the first seconds of CSI";
    parts.presence.className = "presence unknown";
    parts.activity.textContent = "—";
    parts.confidence.textContent = "";
    parts.meter.style.width = "0";
    parts.who.textContent = "";
    return parts.card;
  }
  const presence = p.presence == null ? "unknown" : p.presence ? "occupied" : "empty";
  parts.presence.className = `presence ${presence}`;
  parts.presence.textContent = p.presence == null
    ? (p.motion_score == null && p.activity != null ? "presence: no motion score from this AP"
                                                    : "calibrating presence…")
    : `${p.presence ? "Occupied" : "Empty"}${p.motion ? " · motion" : " · still"}`;
  parts.presence.title = p.motion_score == null ? "" :
    `motion score ${p.motion_score.toFixed(1)} (log2 of the variability over the quiet room)`;

  const r = reading(p);
  if (r.activity == null) {
    parts.activity.textContent = "presence only";
    parts.confidence.textContent = "no activity model for this hardware";
    parts.meter.style.width = "0";
  } else {
    parts.activity.textContent = r.uncertain ? `${r.activity}?` : r.activity;
    parts.activity.className = `room-activity${r.uncertain ? " uncertain" : ""}`;
    parts.confidence.textContent = r.uncertain
      ? `uncertain (${percent(r.confidence)})`
      : `${percent(r.confidence)} ${r.smoothed ? "smoothed" : "confident"}`;
    parts.meter.style.width = `${Math.round((r.confidence || 0) * 100)}%`;
    parts.meter.style.background = colourOf(r.activity, activityLabels(ap));
  }
  parts.who.textContent = p.identity == null ? "" :
    `Who: ${p.identity}${p.identity_confidence == null ? "" :
      ` (${percent(p.identity_confidence)})`}`;

  const truth = truthAt(key, p.timestamp);
  parts.truth.hidden = !truth;
  if (truth) {
    const bits = [];
    if (truth.activity != null) {
      // Nothing to mark where no model names an activity (presence only).
      bits.push(r.activity == null ? truth.activity
                                   : `${truth.activity} ${r.activity === truth.activity ? "✓" : "✗"}`);
    }
    if (truth.identity != null && p.identity != null) {
      bits.push(`${truth.identity} ${p.identity === truth.identity ? "✓" : "✗"}`);
    }
    parts.truth.textContent = `Truth: ${bits.join(" · ") || "labelled"}`;
  }
  const score = PEOPLE.score.get(key);
  parts.accuracy.hidden = !score || !score.seconds;
  if (score && score.seconds) {
    const share = ([n, right]) => (n ? `${Math.round((100 * right) / n)}%` : "—");
    const bits = [`activity ${share(score.activity)}`];
    if (score.identity[0]) bits.push(`person ${share(score.identity)}`);
    if (score.abstained) bits.push(`${score.abstained} s uncertain`);
    parts.accuracy.textContent = `Right so far: ${bits.join(" · ")} of ${score.seconds} ` +
      `labelled s`;
  }

  const recent = PEOPLE.recent.get(key) || [];
  const labels = activityLabels(ap);
  const shown = recent.map((h) => reading(h).activity ?? presenceText(h));
  if (parts.strip.childElementCount !== shown.length ||
      parts.strip.dataset.last !== `${recent.at(-1)?.epoch}/${recent.at(-1)?.seq}`) {
    parts.strip.dataset.last = `${recent.at(-1)?.epoch}/${recent.at(-1)?.seq}`;
    parts.strip.replaceChildren(...shown.map((what, i) => el("span", {
      background: colourOf(what, labels), title: `${clock(recent[i].timestamp)}: ${what}` })));
  }
  return parts.card;
}

// -- presence measured on the empty room (csi_edge.presence: a pinned reference) -------------------

// The activities the threshold fit counts as still by default (MotionThresholdFitIn.still).
const STILL_ACTIVITIES = ["nm", "empty"];

function renderCalibration(key, ap, parts) {
  const motion = ap.status?.motion;
  parts.details.hidden = !motion;
  if (!motion) return;
  const sent = PEOPLE.measuring.get(key);
  const estimate = sent ? Math.ceil((sent.until - Date.now()) / 1000) : 0;
  if (sent) {
    if (motion.mode === "measuring") sent.seen = true;
    // Done, or never started (the AP offline, or it refused: its status says why).
    else if (sent.seen || estimate <= 0 || Date.now() - sent.sent > STARTS_WITHIN_MS) {
      PEOPLE.measuring.delete(key);
    }
  }
  const measuring = motion.mode === "measuring" || PEOPLE.measuring.has(key);
  // The edge's own count while it measures (segments of about a second), else the estimate.
  const left = motion.mode === "measuring" && motion.measuring_left != null
    ? motion.measuring_left : estimate;
  parts.calibration.textContent = measuring ? "Presence: measuring the empty room…"
    : motion.mode === "pinned" ? "Presence: calibrated on the empty room"
    : "Presence: calibrating itself";
  parts.calibrationText.textContent = measuring
    ? `Keep the room empty${left > 0 ? ` for about ${left} s more` : " a little longer"}: ` +
      "its quiet state is being measured."
    : motion.mode === "pinned"
      ? "Motion is measured against this room when it was empty. Measure again after " +
        "moving furniture or the AP."
      : "Motion is measured against the quietest quarter of the last 15 minutes. In a room " +
        `that is rarely quiet, measure it once empty: press, leave within ${LEAVE_S} s, and ` +
        `keep it empty for about ${LEAVE_S + LOOKBACK_S + EMPTY_ROOM_S} s.`;
  parts.measure.textContent = motion.mode === "pinned" ? "Measure again"
                                                       : "Measure the empty room";
  parts.measure.disabled = measuring;
  parts.release.hidden = motion.mode !== "pinned" && !measuring;
  parts.release.textContent = measuring ? "Cancel (automatic)" : "Back to automatic";
  const own = ap.motion_threshold;
  const fit = own?.fit;
  // The calibration below labels the model's activities: it can label a still stretch only
  // where the model has a still activity; otherwise the labels come through the API.
  const still = (activityLabels(ap) || []).filter((a) => STILL_ACTIVITIES.includes(a));
  parts.thresholdText.textContent = !own
    ? "Motion threshold: the site's. Where walking reads as still, label a still stretch " +
      "and a moving one of at least 10 s each " +
      (still.length ? `(calibration below: "${still[0]}" and a movement) `
                    : "(POST /api/v1/labels, activity nm or empty, and a movement) ") +
      "and fit this room's."
    : fit
      ? `Motion threshold: this room's, ${own.threshold} (fitted on ${fit.still_seconds} ` +
        `still and ${fit.moving_seconds} moving labelled s: flags ` +
        `${Math.round(100 * fit.recall)}% of the moving ones, ` +
        `${Math.round(100 * fit.false_positive_rate)}% of the still ones).`
      : `Motion threshold: this room's, ${own.threshold} (set by hand).`;
  parts.fitThreshold.textContent = own ? "Fit again" : "Fit to the labelled seconds";
  parts.siteThreshold.hidden = !own;
}

async function motionThreshold(key, what) {
  const parts = PEOPLE.cards.get(key);
  const fit = what === "fit";
  const done = await sendCommand(
    `/aps/${apPath(key)}/presence/threshold${fit ? "/fit" : ""}`, fit ? "POST" : "DELETE",
    fit ? {} : undefined, parts.calibrationResult);
  if (done) {
    const ap = state.aps.get(key);
    if (ap) ap.motion_threshold = fit ? done : null;
    parts.calibrationResult.classList.remove("error");
    parts.calibrationResult.textContent = !fit ? "back to the site's threshold"
      : done.threshold != null ? `fitted: motion from a score of ${done.threshold} on`
      : "fitted";
  }
  renderCard(key);
}

async function calibratePresence(key, what) {
  const parts = PEOPLE.cards.get(key);
  const measure = what === "measure";
  const sent = await sendCommand(
    `/aps/${apPath(key)}/presence/calibration`, measure ? "POST" : "DELETE",
    measure ? { empty_s: EMPTY_ROOM_S, delay_s: LEAVE_S } : undefined, parts.calibrationResult);
  if (sent) {
    if (measure) {
      const now = Date.now();
      PEOPLE.measuring.set(key, { sent: now, seen: false,
                                  until: now + (LEAVE_S + LOOKBACK_S + EMPTY_ROOM_S) * 1000 });
    } else {
      PEOPLE.measuring.delete(key);
    }
    parts.calibrationResult.classList.remove("error");
    parts.calibrationResult.textContent = measure
      ? `sent: leave the room now; it is measured from ${LEAVE_S} s on`
      : "sent: back to automatic";
  }
  renderCard(key);
}

function activityLabels(ap) {
  return state.models.get(ap?.prediction?.model || ap?.model)?.labels?.activity;
}

function renderCards() {
  const box = $("#rooms");
  const keys = [...state.aps.keys()].sort();
  const cards = keys.map(renderCard);
  if (cards.length !== box.children.length || cards.some((c, i) => box.children[i] !== c)) {
    box.replaceChildren(...cards);
  }
  for (const key of [...PEOPLE.cards.keys()]) if (!state.aps.has(key)) PEOPLE.cards.delete(key);
  $("#rooms-empty").hidden = keys.length > 0;
  const anySmoothed = keys.some((k) => {
    const p = state.aps.get(k).prediction;
    return p && reading(p).smoothed;
  });
  $("#smoothing-note").textContent = anySmoothed ? "smoothed over the last seconds"
                                                 : "per segment, not smoothed";
}

// -- events: from the service when it has them, else derived from prediction changes -------------

function remember_(key, p) {
  const recent = PEOPLE.recent.get(key) || [];
  if (recent.some((h) => h.epoch === p.epoch && h.seq === p.seq)) return false;
  recent.push(p);
  recent.sort((a, b) => a.timestamp - b.timestamp || a.seq - b.seq);
  if (recent.length > STRIP) recent.splice(0, recent.length - STRIP);
  PEOPLE.recent.set(key, recent);
  return recent.at(-1) === p;
}

function derive(key, p) {
  const r = reading(p);
  const changes = [
    ["activity", r.activity == null ? null : (r.uncertain ? "uncertain" : r.activity)],
    ["presence", p.presence == null ? null : (p.presence ? "occupied" : "empty")],
  ];
  for (const [kind, value] of changes) {
    if (value == null) continue;
    const id = `${key}/${kind}`;
    const open = PEOPLE.open.get(id);
    if (open && open.value === value) {
      open.end = p.timestamp + 1;
      continue;
    }
    if (open) open.end = Math.max(open.end, p.timestamp);
    const event = { key, kind, value, start: p.timestamp, end: p.timestamp + 1, epoch: p.epoch,
                    ongoing: true };
    if (open) open.ongoing = false;
    PEOPLE.open.set(id, event);
    PEOPLE.events.unshift(event);
  }
  if (PEOPLE.events.length > 500) PEOPLE.events.length = 500;
}

// One event of GET /api/v1/events or of a live stream, in whatever shape the service sends.
function normaliseEvent(e) {
  const key = e.site != null && e.ap != null ? `${e.site}/${e.ap}` : (e.key || "");
  const kind = e.kind || e.type || (e.presence != null ? "presence" : "activity");
  let value = e.value ?? e.activity ?? e.label ?? e.state;
  if (value == null && e.presence != null) value = e.presence ? "occupied" : "empty";
  if (typeof value === "boolean") value = value ? (kind === "presence" ? "occupied" : "on")
                                                : (kind === "presence" ? "empty" : "off");
  const start = e.start ?? e.started ?? e.start_time ?? e.timestamp ?? null;
  const end = e.end ?? e.ended ?? e.end_time ?? null;
  return { key, kind, value: value == null ? "?" : String(value), start, end: end ?? start,
           ongoing: end == null, confidence: e.confidence ?? e.activity_confidence ?? null };
}

async function loadServerEvents() {
  if (PEOPLE.serverEvents === false || Date.now() - PEOPLE.eventsAt < 2000) return;
  PEOPLE.eventsAt = Date.now();
  try {
    const body = await getJson(`/events?limit=${EVENTS_SHOWN}`);
    const list = Array.isArray(body) ? body : body.data;
    if (!Array.isArray(list)) throw new Error("not a list");
    PEOPLE.serverEvents = list.map(normaliseEvent)
      .sort((a, b) => (b.start ?? 0) - (a.start ?? 0));
  } catch (error) {
    // 404 (a service without events) or a shape this page does not know: derive them here.
    if (error.status === 404 || error.message === "not a list") PEOPLE.serverEvents = false;
  }
}

function duration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function renderTimeline() {
  const fromService = Array.isArray(PEOPLE.serverEvents);
  const events = (fromService ? PEOPLE.serverEvents : PEOPLE.events).slice(0, EVENTS_SHOWN);
  $("#timeline-source").textContent = fromService
    ? "Activity and presence changes reported by the service, newest first."
    : "Activity and presence changes seen by this page since it opened (and in the recent " +
      "history), newest first.";
  const list = $("#timeline");
  list.replaceChildren(...events.map((e) => {
    const [site, ap] = e.key.split("/");
    const ap_ = state.aps.get(e.key);
    const colour = e.kind === "activity" ? colourOf(e.value, activityLabels(ap_)) :
      (e.value === "occupied" ? "#15803d" : "#98a2b3");
    return el("li", { class: `event ${e.kind}`, "data-ap": e.key, "data-kind": e.kind },
      el("time", { datetime: e.start ? new Date(e.start * 1000).toISOString() : "",
                   text: clock(e.start) }),
      el("span", { class: "swatch", background: colour }),
      el("span", { class: "event-what", text: `${ap ?? e.key} ${e.kind === "presence" ?
        "" : "· "}${e.value}` }),
      el("span", { class: "event-for", title: site ?? "",
                   text: e.ongoing ? `for ${duration(Date.now() / 1000 - e.start)}, ongoing`
                                   : `for ${duration(e.end - e.start)}` }));
  }));
  $("#timeline-empty").hidden = events.length > 0;
}

// -- wiring -------------------------------------------------------------------------------------

let historyLoaded = false;

async function loadRecent() {
  // Seed the strips and the derived timeline with what happened just before the page opened.
  historyLoaded = true;
  try {
    const page = await getJson("/predictions?limit=300");
    for (const p of [...page.data].reverse()) onLivePrediction(p, false);
  } catch {
    // live predictions fill them anyway
  }
  render();
}

function onLivePrediction(p, draw = true) {
  const key = keyOf(p);
  if (!state.aps.has(key)) return;
  const newest = remember_(key, p);
  if (newest) derive(key, p);
  count(key, p);
  if (draw && state.view === "rooms") {
    renderCard(key);
    if (newest) renderTimeline();
  }
}

function render() {
  if (state.view !== "rooms") return;
  renderCards();
  renderTimeline();
}

hooks.prediction.push((p) => onLivePrediction(p));
hooks.aps.push(() => {
  for (const key of state.aps.keys()) loadLabels(key);
  if (!historyLoaded && state.aps.size) loadRecent();
  loadServerEvents().then(render);
});
hooks.event.push(() => {
  PEOPLE.eventsAt = 0;
  loadServerEvents().then(render);
});
hooks.view.push(render);
