// latentcast dashboard: one WebSocket (/ws) of "hello", "stats" and "frame" messages (cloud/dashboard/server.py).
// Frames are JPEG (base64) drawn on a canvas with the cloud's boxes (and, toggled, the edge's ROIs) drawn here.

const $ = (sel, root = document) => root.querySelector(sel);
const grid = $("#grid");
const views = new Map(); // camera_id -> {card, canvas, chart, stats, last (frame message), info (stats)}
const state = { frames: 0, stats: null, hello: null, wsOpen: false, large: null };
window.dashboard = state; // read by the browser test and handy in the console

const STAT_FIELDS = [
  ["kbps", "kbit/s", (v) => v.toFixed(1)],
  ["fps_in", "fps in", (v) => v.toFixed(1)],
  ["fps_out", "fps out", (v) => v.toFixed(1)],
  ["bpp", "bpp", (v) => v.toFixed(4)],
  ["p50_latency_ms", "p50 ms", (v) => v.toFixed(0)],
  ["drops", "drops", (v) => String(v)],
  ["frames_analysed", "analysed", (v) => String(v)],
  ["frames_received", "received", (v) => String(v)],
  ["detections", "boxes", (v) => String(v)],
];

function labelColor(label) {
  let h = 7;
  for (const c of label) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${(h * 137.508) % 360}, 75%, 60%)`; // golden-angle steps keep similar names apart
}

function fillStats(dl, info) {
  if (!dl.dataset.built) {
    for (const [key, name] of STAT_FIELDS) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.dataset.stat = key;
      dl.append(dt, dd);
    }
    dl.dataset.built = "1";
  }
  for (const [key, , fmt] of STAT_FIELDS) {
    const dd = dl.querySelector(`[data-stat="${key}"]`);
    dd.textContent = info[key] === undefined || info[key] === null ? "–" : fmt(info[key]);
  }
}

function viewFor(id) {
  let v = views.get(id);
  if (v) return v;
  const card = $("#camera-card").content.firstElementChild.cloneNode(true);
  card.dataset.camera = id;
  $(".camera-id", card).textContent = id;
  card.addEventListener("click", () => openLarge(id));
  card.addEventListener("keydown", (e) => { if (e.key === "Enter") openLarge(id); });
  v = { card, canvas: $("canvas.frame", card), chart: $("canvas.chart", card), stats: $("dl.stats", card),
        last: null, info: null, bitmap: null, drawing: Promise.resolve() };
  views.set(id, v);
  const ids = [...views.keys()].sort();
  const next = ids[ids.indexOf(id) + 1];
  grid.insertBefore(card, next ? views.get(next).card : null);
  $("#empty").hidden = true;
  return v;
}

function drawBoxes(ctx, boxes, { dashed, scale }) {
  ctx.lineWidth = 2 * scale;
  ctx.font = `${12 * scale}px system-ui, sans-serif`;
  ctx.setLineDash(dashed ? [6 * scale, 4 * scale] : []);
  for (const b of boxes) {
    const color = dashed ? "#ffffff" : labelColor(b.label);
    ctx.strokeStyle = color;
    ctx.strokeRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
    if (!dashed) {
      const text = `${b.label} ${(b.score * 100).toFixed(0)}%`;
      const w = ctx.measureText(text).width + 6 * scale;
      const h = 15 * scale;
      ctx.fillStyle = color;
      ctx.fillRect(b.x0, Math.max(0, b.y0 - h), w, h);
      ctx.fillStyle = "#000";
      ctx.fillText(text, b.x0 + 3 * scale, Math.max(h - 3 * scale, b.y0 - 3 * scale));
    }
  }
  ctx.setLineDash([]);
}

function paint(canvas, v) {
  const msg = v.last;
  if (!msg || !v.bitmap) return;
  if (canvas.width !== msg.width || canvas.height !== msg.height) {
    canvas.width = msg.width;
    canvas.height = msg.height;
  }
  const ctx = canvas.getContext("2d");
  ctx.drawImage(v.bitmap, 0, 0, msg.width, msg.height);
  const scale = msg.width / (canvas.clientWidth || msg.width); // frame pixels per CSS pixel: text stays legible
  drawBoxes(ctx, msg.boxes, { dashed: false, scale });
  if ($("#show-rois").checked) drawBoxes(ctx, msg.edge_boxes, { dashed: true, scale });
}

async function onFrame(msg) {
  const v = viewFor(msg.camera_id);
  if (!msg.image) return;
  const bytes = Uint8Array.from(atob(msg.image), (c) => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/jpeg" }));
  if (v.bitmap) v.bitmap.close();
  v.bitmap = bitmap;
  v.last = msg;
  $(".mode", v.card).textContent = msg.mode;
  paint(v.canvas, v);
  if (state.large === msg.camera_id) paint($("#large-canvas"), v);
  state.frames += 1;
}

function drawChart(canvas, history) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth || canvas.width);
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (!history || history.length < 2) return;
  const series = [["kbps", "#4fb3ff"], ["fps_out", "#5fd38d"]];
  ctx.font = "10px system-ui, sans-serif";
  series.forEach(([key, color], k) => {
    const max = Math.max(1e-6, ...history.map((p) => p[key]));
    ctx.strokeStyle = color;
    ctx.beginPath();
    history.forEach((p, i) => {
      const x = (i / (history.length - 1)) * (w - 1);
      const y = h - 2 - (p[key] / max) * (h - 14);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.fillText(`${key === "kbps" ? "kbit/s" : "fps out"} ≤ ${max.toFixed(1)}`, 4 + k * 110, 10);
  });
}

function drawTimeline(tl) {
  const canvas = $("#timeline");
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth || canvas.width);
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const buckets = tl.buckets;
  if (buckets.length) {
    const span = Math.max(1, (state.hello?.history_s ?? 300) / tl.bucket_s);
    const bw = w / span;
    const max = Math.max(1, ...buckets.map((b) => Object.values(b.counts).reduce((a, c) => a + c, 0)));
    const tEnd = buckets[buckets.length - 1].t;
    for (const b of buckets) {
      const x = w - ((tEnd - b.t) / tl.bucket_s + 1) * bw;
      let y = h;
      for (const [label, n] of Object.entries(b.counts).sort()) {
        const bh = (n / max) * (h - 4);
        ctx.fillStyle = labelColor(label);
        ctx.fillRect(x, y - bh, Math.max(1, bw - 1), bh);
        y -= bh;
      }
    }
  }
  const list = $("#detections");
  list.replaceChildren(...Object.entries(tl.totals).map(([label, n]) => {
    const li = document.createElement("li");
    li.dataset.label = label;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = labelColor(label);
    const name = document.createElement("span");
    name.textContent = label;
    const count = document.createElement("b");
    count.textContent = String(n);
    li.append(sw, name, count);
    return li;
  }));
}

function onStats(msg) {
  state.stats = msg;
  const link = $("#link");
  link.textContent = `${msg.link.target}: ${msg.link.connected ? "subscribed" : "down"}`;
  link.className = `link ${msg.link.connected ? "up" : "down"}`;
  const seen = new Set();
  let kbps = 0;
  for (const info of msg.cameras) {
    const v = viewFor(info.camera_id);
    seen.add(info.camera_id);
    v.info = info;
    kbps += info.kbps;
    fillStats(v.stats, info);
    if (info.mode) $(".mode", v.card).textContent = info.mode;
    v.card.classList.toggle("stale", info.stale);
    const badge = $(".stale-badge", v.card);
    badge.hidden = !info.stale;
    badge.textContent = info.age_s === null ? "stale" : `stale ${info.age_s.toFixed(0)} s`;
    drawChart(v.chart, info.history);
    if (state.large === info.camera_id) fillStats($("#large-stats"), info);
  }
  for (const [id, v] of views) {
    if (!seen.has(id)) { v.card.remove(); views.delete(id); }
  }
  $("#empty").hidden = views.size > 0;
  $("#totals").textContent = `${msg.cameras.length} camera(s) · ${kbps.toFixed(1)} kbit/s · ${msg.results} results`;
  drawTimeline(msg.timeline);
  showBanner();
}

function showBanner() {
  const banner = $("#banner");
  let text = "";
  if (!state.wsOpen) text = "The dashboard server is unreachable. Reconnecting…";
  else if (state.stats && !state.stats.link.connected) {
    const err = state.stats.link.error ? ` (${state.stats.link.error})` : "";
    text = `The cloud at ${state.stats.link.target} is unreachable${err}. Reconnecting…`;
  }
  banner.textContent = text;
  banner.hidden = !text;
}

function openLarge(id) {
  const v = views.get(id);
  if (!v) return;
  state.large = id;
  $("#large-title").textContent = `${id}${v.last ? ` · ${v.last.width}x${v.last.height} · ${v.last.mode}` : ""}`;
  $("#large").hidden = false;
  paint($("#large-canvas"), v);
  if (v.info) fillStats($("#large-stats"), v.info);
}

function closeLarge() {
  state.large = null;
  $("#large").hidden = true;
}

$("#large-close").addEventListener("click", closeLarge);
$("#large").addEventListener("click", (e) => { if (e.target.id === "large") closeLarge(); });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeLarge(); });
$("#show-rois").addEventListener("change", () => {
  for (const v of views.values()) paint(v.canvas, v);
  if (state.large) paint($("#large-canvas"), views.get(state.large));
});

function connect(delay = 500) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.addEventListener("open", () => { state.wsOpen = true; delay = 500; showBanner(); });
  ws.addEventListener("message", (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "hello") state.hello = msg;
    else if (msg.type === "stats") onStats(msg);
    else if (msg.type === "frame") {
      const v = viewFor(msg.camera_id);
      v.drawing = v.drawing.then(() => onFrame(msg)).catch((err) => console.error("frame", err));
    }
  });
  ws.addEventListener("close", () => {
    state.wsOpen = false;
    showBanner();
    setTimeout(() => connect(Math.min(10000, delay * 2)), delay);
  });
}

connect();
