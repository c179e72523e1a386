// The live page: one card per source (status, a chart of the top labels' fused, audio and
// video scores with their thresholds, a sound-level meter) and the recent events. It loads
// what the daemon kept (/api/*), then follows /api/stream (server-sent events). No library.
"use strict";

const SPAN_MS = 3 * 60 * 1000; // the chart shows the last three minutes
const TOP_LABELS = 3; // labels drawn per source: the highest fused scores on the chart
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
const FLOOR_DBFS = -90;

const cards = new Map(); // source name -> card state
const events = new Map(); // event id -> event JSON

function $(selector, root = document) { return root.querySelector(selector); }

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function card(name) {
  let state = cards.get(name);
  if (state) return state;
  const node = $("#source-card").content.firstElementChild.cloneNode(true);
  node.dataset.source = name;
  node.dataset.points = "0";
  $(".name", node).textContent = name;
  $("#sources").append(node);
  state = { name, node, points: [], labels: {}, colours: new Map(), dirty: true };
  cards.set(name, state);
  return state;
}

function setStatus(state, status) {
  const badge = $(".status", state.node);
  badge.textContent = status;
  badge.className = `status ${status}`;
  state.node.dataset.status = status;
}

function showSource(source) {
  const state = card(source.name);
  setStatus(state, source.status);
  state.labels = source.labels || {};
  const fps = source.video_fps > 0 ? `${source.video_fps.toFixed(1)} fps · ` : "";
  $(".counters", state.node).textContent =
    `${fps}${source.windows_built} windows · ${source.windows_dropped} dropped · ${source.restarts} restarts`;
  state.dirty = true;
}

function addScores(message, live) {
  const state = card(message.source);
  const time = Date.parse(message.window.end);
  state.points.push({ time, top: message.top, dbfs: message.sound_dbfs });
  while (state.points.length && state.points[0].time < time - SPAN_MS) state.points.shift();
  if (live) state.node.dataset.points = String(Number(state.node.dataset.points) + 1);
  if (message.sound_dbfs !== null && message.sound_dbfs !== undefined) {
    const level = Math.max(FLOOR_DBFS, Math.min(0, message.sound_dbfs));
    $(".meter-fill", state.node).style.width = `${((level - FLOOR_DBFS) / -FLOOR_DBFS) * 100}%`;
    $(".meter-value", state.node).textContent = `${message.sound_dbfs.toFixed(1)} dBFS`;
  }
  state.dirty = true;
}

function colour(state, label) {
  if (!state.colours.has(label)) state.colours.set(label, COLOURS[state.colours.size % COLOURS.length]);
  return state.colours.get(label);
}

// The labels with the highest fused score over the points shown.
function topLabels(state) {
  const best = new Map();
  for (const point of state.points) {
    for (const entry of point.top) best.set(entry.label, Math.max(best.get(entry.label) ?? 0, entry.fused));
  }
  return [...best.entries()].sort((a, b) => b[1] - a[1]).slice(0, TOP_LABELS).map(([label]) => label);
}

function draw(state) {
  state.dirty = false;
  const canvas = $(".chart", state.node);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const styles = getComputedStyle(document.body);
  const pad = { left: 30, right: 6, top: 6, bottom: 16 };
  const now = state.points.length ? state.points[state.points.length - 1].time : Date.now();
  const x = (time) => pad.left + ((time - (now - SPAN_MS)) / SPAN_MS) * (width - pad.left - pad.right);
  const y = (score) => pad.top + (1 - score) * (height - pad.top - pad.bottom);
  ctx.strokeStyle = styles.getPropertyValue("--line");
  ctx.fillStyle = styles.getPropertyValue("--muted");
  ctx.font = "10px system-ui";
  for (const tick of [0, 0.5, 1]) {
    ctx.beginPath();
    ctx.moveTo(pad.left, y(tick));
    ctx.lineTo(width - pad.right, y(tick));
    ctx.stroke();
    ctx.fillText(tick.toFixed(1), 4, y(tick) + 3);
  }
  ctx.fillText("−3 min", pad.left, height - 3);
  ctx.fillText("now", width - pad.right - 20, height - 3);
  const labels = topLabels(state);
  const legend = $(".legend", state.node);
  legend.replaceChildren();
  for (const label of labels) {
    const hue = colour(state, label);
    for (const [head, dash] of [["fused", []], ["audio", [6, 3]], ["video", [2, 3]]]) {
      ctx.strokeStyle = hue;
      ctx.lineWidth = head === "fused" ? 2 : 1;
      ctx.setLineDash(dash);
      ctx.beginPath();
      let drawing = false;
      for (const point of state.points) {
        const entry = point.top.find((item) => item.label === label);
        const score = entry ? entry[head] : null;
        if (score === null || score === undefined) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(point.time), y(score)); else ctx.moveTo(x(point.time), y(score));
        drawing = true;
      }
      ctx.stroke();
    }
    const setting = state.labels[label];
    if (setting) {
      ctx.setLineDash([1, 4]);
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(pad.left, y(setting.threshold));
      ctx.lineTo(width - pad.right, y(setting.threshold));
      ctx.stroke();
    }
    ctx.setLineDash([]);
    const item = document.createElement("li");
    item.dataset.label = label;
    const swatch = document.createElement("i");
    swatch.style.background = hue;
    const threshold = setting ? ` (threshold ${setting.threshold.toFixed(2)}${setting.enabled ? "" : ", off"})` : "";
    item.append(swatch, `${label}${threshold}`);
    legend.append(item);
  }
  if (labels.length) {
    const item = document.createElement("li");
    item.className = "muted";
    item.textContent = "solid fused · dashed audio · dotted video · dotted line threshold";
    legend.append(item);
  }
}

function time(text) { return text ? new Date(text).toLocaleTimeString() : "–"; }

function showEvents() {
  const rows = [...events.values()].sort((a, b) => Date.parse(b.start_time) - Date.parse(a.start_time)).slice(0, 50);
  const body = $("#events tbody");
  body.replaceChildren(...rows.map((event) => {
    const row = document.createElement("tr");
    row.dataset.eventId = event.id;
    row.dataset.type = event.type;
    row.className = event.type === "end" ? "" : "open";
    for (const text of [event.source, event.label, event.type === "end" ? "ended" : "on",
      time(event.start_time), time(event.end_time), event.peak_score.toFixed(2)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    row.append(evidenceCell(event));
    return row;
  }));
  $("#no-events").hidden = rows.length > 0;
}

// The event's snapshot (a thumbnail linking the full image) and clip, once they exist. URLs
// are relative to the page, so they work behind a reverse proxy's path prefix.
function evidenceCell(event) {
  const cell = document.createElement("td");
  cell.className = "evidence";
  const evidence = event.evidence;
  if (!evidence) return cell;
  if (evidence.snapshot_url) {
    const link = document.createElement("a");
    link.href = evidence.snapshot_url.replace(/^\//, "");
    const image = document.createElement("img");
    image.src = link.href;
    image.alt = `snapshot of ${event.label}`;
    image.loading = "lazy";
    link.append(image);
    cell.append(link);
  }
  if (evidence.clip_url && evidence.clip_ready !== false) {
    const link = document.createElement("a");
    link.href = evidence.clip_url.replace(/^\//, "");
    link.textContent = evidence.clip_ready ? "clip" : "clip (writing)";
    cell.append(" ", link);
  }
  const error = evidence.clip_error || evidence.error;
  if (error) cell.title = error;
  return cell;
}

function addEvent(event) {
  events.set(event.id, event);
  showEvents();
}

function frame() {
  for (const state of cards.values()) if (state.dirty) draw(state);
  requestAnimationFrame(frame);
}

async function refreshSources() {
  try {
    for (const source of await getJson("api/sources")) showSource(source);
  } catch (error) {
    $("#connection").textContent = `daemon unreachable (${error.message})`;
  }
}

function follow() {
  const stream = new EventSource("api/stream");
  const connection = $("#connection");
  stream.onopen = () => { connection.textContent = "live"; connection.className = "connection live"; };
  stream.onerror = () => { connection.textContent = "reconnecting…"; connection.className = "connection"; };
  stream.addEventListener("scores", (message) => addScores(JSON.parse(message.data), true));
  stream.addEventListener("event", (message) => addEvent(JSON.parse(message.data)));
  stream.addEventListener("status", (message) => {
    const status = JSON.parse(message.data);
    setStatus(card(status.source), status.status);
  });
  stream.addEventListener("settings", (message) => {
    const setting = JSON.parse(message.data);
    const state = card(setting.source);
    state.labels[setting.label] = { enabled: setting.enabled, threshold: setting.threshold };
    state.dirty = true;
  });
  stream.addEventListener("lagged", () => { connection.textContent = "live (some scores skipped)"; });
}

async function start() {
  try {
    const about = await getJson("api/about");
    $("#device").textContent = about.device;
    $("#about").textContent = `model ${about.model} · ${about.labels.length} labels`;
  } catch (error) {
    $("#about").textContent = error.message;
  }
  await refreshSources();
  try {
    const kept = await getJson("api/scores");
    for (const messages of Object.values(kept)) for (const message of messages) addScores(message, false);
    for (const event of (await getJson("api/events?limit=50")).reverse()) events.set(event.id, event);
    showEvents();
  } catch (error) {
    $("#connection").textContent = error.message;
  }
  follow();
  setInterval(refreshSources, 5000);
  requestAnimationFrame(frame);
}

start();
