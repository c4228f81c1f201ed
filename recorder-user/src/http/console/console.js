// The recorder's console: search recordings, open one (participants, waveform, player) or an
// interaction (timeline across sites and transfers, stitched audio). Plain JavaScript, no
// build step; every request goes to this daemon's /api/v1 with the token typed in (kept in
// sessionStorage, or given once as `token=` in the URL fragment).
"use strict";

const view = document.getElementById("view");
let token = sessionStorage.getItem("recorder-token") || "";

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, as = "json") {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers });
  if (!r.ok) {
    let message = r.statusText;
    try { message = (await r.json()).error || message; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, message);
  }
  return as === "json" ? r.json() : r.arrayBuffer();
}

const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const time = (s) => (s ? new Date(s).toLocaleString() : "");
const seconds = (a, b) => ((b ? new Date(b) : new Date()) - new Date(a)) / 1000;
const duration = (secs) => {
  const s = Math.max(0, Math.round(secs));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
};
const people = (ps) => (ps || []).map((p) => esc(p.name || p.aor || "?")).join(", ");

function showError(e) {
  const hint = e.status === 401 ? " Enter a token above." : "";
  view.innerHTML = `<p class="error" data-error="${e.status || ""}">${esc(e.message)}${hint}</p>`;
}

/// Route from the fragment: #/, #/search?..., #/recording/ID, #/interaction/UUID.
function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  if (params.has("token")) {
    token = params.get("token");
    sessionStorage.setItem("recorder-token", token);
    params.delete("token");
    history.replaceState(null, "", "#" + path + (params.toString() ? "?" + params : ""));
  }
  document.getElementById("who").textContent = token ? "token set" : "no token";
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  const go = parts[0] === "recording" ? recording(parts[1])
    : parts[0] === "interaction" ? interaction(parts[1])
    : search(params);
  // `data-ready` marks the view done (fetches, media metadata) for scripts that read it; only
  // the latest route sets it, so a slow earlier one cannot mark a newer view ready.
  const render = ++renders;
  delete view.dataset.ready;
  go.catch(showError).finally(() => {
    if (render === renders) view.dataset.ready = "true";
  });
}
let renders = 0;

async function search(params) {
  const field = (name, label, type = "text") =>
    `<label>${label}<input name="${name}" type="${type}" value="${esc(params.get(name) || "")}"></label>`;
  view.innerHTML = `<form class="search" id="search">
      ${field("call_uuid", "CallUUID")}${field("participant", "Participant (AOR or name)")}
      <label>From<input name="since" type="datetime-local"></label>
      <label>To<input name="until" type="datetime-local"></label>
      <label>State<select name="state"><option value="">any</option>
        <option>active</option><option>complete</option><option>interrupted</option></select></label>
      <button type="submit">Search</button></form><div id="results"></div>`;
  const form = document.getElementById("search");
  form.state.value = params.get("state") || "";
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const name of ["call_uuid", "participant", "state"]) {
      if (form[name].value) q.set(name, form[name].value.trim());
    }
    for (const name of ["since", "until"]) {
      if (form[name].value) q.set(name, new Date(form[name].value).toISOString());
    }
    location.hash = "#/search?" + q;
  });
  await results(params, null);
}

async function results(params, cursor) {
  const q = new URLSearchParams();
  for (const name of ["call_uuid", "aor", "participant", "since", "until", "state"]) {
    if (params.get(name)) q.set(name, params.get(name));
  }
  q.set("limit", "50");
  if (cursor) q.set("cursor", cursor);
  const page = await api("/api/v1/recordings?" + q);
  const box = document.getElementById("results");
  const rows = page.recordings.map((r) => `<tr data-recording="${esc(r.id)}">
      <td>${time(r.started_at)}</td>
      <td class="state-${esc(r.state)}">${esc(r.state)}</td>
      <td>${duration(seconds(r.started_at, r.ended_at))}</td>
      <td>${people(r.participants)}</td>
      <td>${esc(r.host)}</td>
      <td>${r.call_uuid ? `<a href="#/interaction/${encodeURIComponent(r.call_uuid)}">${esc(r.call_uuid)}</a>` : ""}</td>
      <td><a href="#/recording/${encodeURIComponent(r.id)}">${esc(r.id)}</a></td></tr>`).join("");
  box.innerHTML = (cursor ? box.innerHTML : "") + (rows || cursor ? "" : "<p class=muted>No recordings.</p>");
  let table = box.querySelector("tbody");
  if (!table && rows) {
    box.innerHTML = `<table><thead><tr><th>Started</th><th>State</th><th>Duration</th>
      <th>Participants</th><th>Site</th><th>Interaction</th><th>Recording</th></tr></thead>
      <tbody></tbody></table>`;
    table = box.querySelector("tbody");
  }
  if (table) table.insertAdjacentHTML("beforeend", rows);
  box.querySelector("#more")?.remove();
  if (page.next_cursor) {
    box.insertAdjacentHTML("beforeend", '<p><button id="more">More</button></p>');
    box.querySelector("#more").addEventListener("click", () =>
      results(params, page.next_cursor).catch(showError));
  }
}

/// A time axis from `t0` to `t1` (ms) on `width` pixels, with labels every step.
function axis(t0, t1, width, y) {
  const span = Math.max(t1 - t0, 1);
  const step = [1, 5, 10, 30, 60, 300, 600, 1800, 3600].map((s) => s * 1000)
    .find((s) => span / s <= 10) || 3600000;
  let out = "";
  for (let t = 0; t <= span; t += step) {
    const x = 160 + (t / span) * (width - 200);
    out += `<line x1="${x}" x2="${x}" y1="${y}" y2="${y + 4}" class="mark"/>
      <text x="${x}" y="${y + 16}" text-anchor="middle">+${duration(t / 1000)}</text>`;
  }
  return out;
}

/// Lanes (label, from, to, marks) on one time axis as SVG.
function timeline(lanes, gaps, t0, t1, attrs) {
  const width = 1000, laneH = 26, top = 8;
  const x = (t) => 160 + ((t - t0) / Math.max(t1 - t0, 1)) * (width - 200);
  const height = top + lanes.length * (laneH + 8) + 24;
  let svg = `<svg class="timeline" viewBox="0 0 ${width} ${height}" ${attrs}>`;
  for (const g of gaps) {
    svg += `<rect class="gap" data-gap x="${x(g.from)}" y="0" width="${Math.max(x(g.to) - x(g.from), 1)}"
      height="${height - 24}"><title>gap ${g.seconds.toFixed(1)} s</title></rect>`;
  }
  lanes.forEach((lane, i) => {
    const y = top + i * (laneH + 8);
    svg += `<g ${lane.attrs || ""}><text x="4" y="${y + 17}">${esc(lane.label)}</text>
      <rect class="lane" x="${x(lane.from)}" y="${y}" width="${Math.max(x(lane.to) - x(lane.from), 2)}"
        height="${laneH}" rx="3"><title>${esc(lane.title || lane.label)}</title></rect>`;
    for (const m of lane.marks || []) {
      svg += `<line class="mark ${esc(m.kind)}" data-mark="${esc(m.kind)}" x1="${x(m.at)}" x2="${x(m.at)}"
        y1="${y - 3}" y2="${y + laneH + 3}"><title>${esc(m.title)}</title></line>`;
    }
    svg += "</g>";
  });
  return svg + axis(t0, t1, width, height - 22) + "</svg>";
}

/// Draws each channel of a 16-bit PCM WAV as min/max columns on its own canvas.
function waveforms(buffer, box) {
  const d = new DataView(buffer);
  const channels = d.getUint16(22, true);
  const frames = Math.floor((buffer.byteLength - 44) / (2 * channels));
  for (let c = 0; c < channels; c++) {
    const canvas = document.createElement("canvas");
    canvas.className = "wave";
    canvas.dataset.channel = c;
    canvas.width = 1000;
    canvas.height = 80;
    const g = canvas.getContext("2d");
    g.fillStyle = "#2563eb";
    const per = Math.max(1, Math.floor(frames / canvas.width));
    for (let px = 0; px < canvas.width && px * per < frames; px++) {
      let lo = 0, hi = 0;
      for (let f = px * per; f < Math.min(frames, (px + 1) * per); f++) {
        const s = d.getInt16(44 + 2 * (f * channels + c), true);
        if (s < lo) lo = s;
        if (s > hi) hi = s;
      }
      const y = (v) => 40 - (v / 32768) * 40;
      g.fillRect(px, y(hi), 1, Math.max(1, y(lo) - y(hi)));
    }
    box.appendChild(canvas);
  }
}

/// Loads audio with the token (a media element cannot send one) into a seekable player.
/// Resolves once the browser has read the audio's header (or failed to: `data-error`).
async function player(path, box) {
  const audio = document.createElement("audio");
  audio.id = "player";
  audio.controls = true;
  const loaded = new Promise((resolve) => {
    audio.addEventListener("loadedmetadata", () => {
      audio.dataset.loaded = "true";
      audio.dataset.duration = audio.duration.toFixed(2);
      resolve();
    }, { once: true });
    audio.addEventListener("error", () => {
      audio.dataset.error = "media";
      resolve();
    }, { once: true });
  });
  box.appendChild(audio);
  const buffer = await api(path, "buffer");
  audio.src = URL.createObjectURL(new Blob([buffer], { type: "audio/wav" }));
  await loaded;
  return buffer;
}

/// Saves a file fetched with the token (a plain link cannot send one) under `name`. The
/// button says how it went: `data-bytes` once saved, `data-error` with the status if not.
async function download(path, name, button) {
  delete button.dataset.bytes;
  delete button.dataset.error;
  try {
    const buffer = await api(path, "buffer");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([buffer], { type: "application/vnd.tcpdump.pcap" }));
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    button.dataset.bytes = String(buffer.byteLength);
  } catch (e) {
    button.dataset.error = String(e.status || "");
    button.title = e.message;
  }
}

async function recording(id) {
  const r = await api("/api/v1/recordings/" + encodeURIComponent(id));
  const m = r.metadata || {};
  const t0 = Date.parse(r.started_at), t1 = r.ended_at ? Date.parse(r.ended_at) : Date.now();
  const lanes = (r.participants || []).map((p) => ({
    label: p.name || p.aor || "?",
    title: `${p.aor || ""} ${time(p.joined_at)} – ${time(p.left_at)}`,
    from: p.joined_at ? Date.parse(p.joined_at) : t0,
    to: p.left_at ? Date.parse(p.left_at) : t1,
    marks: [],
  }));
  view.innerHTML = `<h2>Recording ${esc(r.id)}</h2><dl>
      <dt>State</dt><dd>${esc(r.state)} ${esc(r.end_reason || "")}</dd>
      <dt>Started</dt><dd>${time(r.started_at)}</dd><dt>Ended</dt><dd>${time(r.ended_at)}</dd>
      <dt>Duration</dt><dd>${duration(seconds(r.started_at, r.ended_at))}</dd>
      <dt>Site</dt><dd>${esc(r.host)}</dd>
      <dt>Interaction</dt><dd>${r.call_uuid ? `<a href="#/interaction/${encodeURIComponent(r.call_uuid)}">${esc(r.call_uuid)}</a>` : ""}</dd>
      <dt>Streams</dt><dd>${(m.streams || []).map((s) => `${esc(s.label)} (${esc(s.codec)}, ${s.packets} packets, ${s.lost} lost)`).join("; ")}</dd>
    </dl><h3>Participants</h3>${timeline(lanes, [], t0, t1, 'data-view="participants"')}
    <h3>Audio</h3><div id="audio"></div><div id="waves"></div>
    <p><button type="button" id="pcap">Download pcap</button></p>`;
  const pcap = document.getElementById("pcap");
  pcap.addEventListener("click", () => download(
    "/api/v1/recordings/" + encodeURIComponent(r.id) + "/pcap", r.id + ".pcap", pcap));
  const buffer = await player("/api/v1/recordings/" + encodeURIComponent(r.id) + "/audio",
    document.getElementById("audio"));
  waveforms(buffer, document.getElementById("waves"));
}

async function interaction(uuid) {
  const i = await api("/api/v1/interactions/" + encodeURIComponent(uuid));
  const segs = i.segments;
  const t0 = Math.min(...segs.map((s) => Date.parse(s.started_at)));
  const t1 = Math.max(...segs.map((s) => (s.ended_at ? Date.parse(s.ended_at) : Date.now())));
  const lanes = segs.map((s) => ({
    label: `${s.host} · ${s.id.slice(-8)}`,
    title: `${s.id} on ${s.host}: ${time(s.started_at)} – ${time(s.ended_at)} (${s.end_reason || s.state})`,
    attrs: `class="segment" data-segment="${esc(s.id)}" data-host="${esc(s.host)}"`,
    from: Date.parse(s.started_at),
    to: s.ended_at ? Date.parse(s.ended_at) : Date.now(),
    marks: i.events.filter((e) => e.recording === s.id).map((e) => ({
      at: Date.parse(e.at),
      kind: e.kind,
      title: `${e.kind} ${e.name || e.aor || e.label || e.reason || ""} ${time(e.at)}`,
    })),
  }));
  const gaps = i.gaps.map((g) => ({ from: Date.parse(g.from), to: Date.parse(g.to), seconds: g.seconds }));
  const sites = new Set(segs.map((s) => s.host));
  view.innerHTML = `<h2>Interaction ${esc(uuid)}</h2>
    <p class="muted">${segs.length} segment(s) on ${sites.size} site(s), ${gaps.length} gap(s),
      ${duration((t1 - t0) / 1000)} in all.</p>
    ${timeline(lanes, gaps, t0, t1, 'data-view="interaction"')}
    <h3>Audio</h3><div id="audio"></div>
    <table><thead><tr><th>Segment</th><th>Site</th><th>Started</th><th>Ended</th><th>End</th>
      <th>Participants</th></tr></thead><tbody>${segs.map((s) => `<tr>
      <td><a href="#/recording/${encodeURIComponent(s.id)}">${esc(s.id)}</a></td><td>${esc(s.host)}</td>
      <td>${time(s.started_at)}</td><td>${time(s.ended_at)}</td><td>${esc(s.end_reason || s.state)}</td>
      <td>${people(s.participants)}</td></tr>`).join("")}</tbody></table>`;
  try {
    await player("/api/v1/interactions/" + encodeURIComponent(uuid) + "/audio",
      document.getElementById("audio"));
  } catch (e) {
    document.getElementById("audio").insertAdjacentHTML("beforeend",
      `<p class="error" data-error="${e.status}">${esc(e.message)}</p>`);
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("recorder-token", token);
  document.getElementById("token").value = "";
  route();
});
window.addEventListener("hashchange", route);
route();
