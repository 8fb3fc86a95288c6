// The fleet dashboard: plain JS, no build step, nothing fetched from outside the manager.
"use strict";

const params = new URLSearchParams(location.search);
if (params.get("token")) {
  localStorage.setItem("edgeprune-token", params.get("token"));
}
let selected = params.get("device");

function token() { return localStorage.getItem("edgeprune-token") || ""; }

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
  if (response.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Error("enter the API token (EDGEPRUNE_FLEET_TOKEN)");
  }
  if (!response.ok) { throw new Error(path + ": HTTP " + response.status); }
  return response.json();
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") { node.className = v; } else { node.setAttribute(k, v); }
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function ago(ts) {
  if (ts == null) { return "never"; }
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) { return Math.round(s) + " s ago"; }
  if (s < 3600) { return Math.round(s / 60) + " min ago"; }
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function renderDevices(devices) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const d of devices) {
    const state = d.online ? "online" : "offline";
    const bundle = d.bundle_version ? d.model_id + " " + d.bundle_version : "—";
    const row = el("tr", { "data-device": d.device_id },
      el("td", {}, d.device_id), el("td", {}, d.fleet), el("td", { class: state }, state),
      el("td", {}, d.profile || "—"), el("td", {}, bundle), el("td", { class: "variant" }, d.active_variant || "—"),
      el("td", {}, d.budget == null ? "—" : d.budget.toFixed(2)),
      el("td", {}, d.battery_pct == null ? "—" : Math.round(d.battery_pct) + " %"),
      el("td", {}, ago(d.last_seen)));
    row.addEventListener("click", () => { selected = d.device_id; refreshDevice(); });
    body.append(row);
  }
  if (!devices.length) {
    body.append(el("tr", {}, el("td", { colspan: "9", class: "muted" }, "No device has reported yet.")));
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) { node.setAttribute(k, v); }
  if (text != null) { node.textContent = text; }
  return node;
}

// A line chart of several series over shared time; each series is [{t, v}], nulls skipped.
function lineChart(series, colors, names) {
  const W = 360, H = 150, P = 30;
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  const points = series.flat().filter((p) => p.v != null);
  if (!points.length) { root.append(svg("text", { x: P, y: H / 2, fill: "#8a93a3" }, "no data yet")); return root; }
  const t0 = Math.min(...points.map((p) => p.t)), t1 = Math.max(...points.map((p) => p.t));
  const vmax = Math.max(...points.map((p) => p.v)) || 1;
  const x = (t) => P + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - P - 10);
  const y = (v) => H - P + 10 - (v / vmax) * (H - P - 10);
  root.append(svg("line", { x1: P, y1: H - P + 10, x2: W - 10, y2: H - P + 10, stroke: "#c9d1de" }));
  root.append(svg("text", { x: 2, y: 14, "font-size": 10, fill: "#5f6b7d" }, vmax.toFixed(1)));
  series.forEach((s, i) => {
    const pts = s.filter((p) => p.v != null).map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { points: pts, fill: "none", stroke: colors[i], "stroke-width": 2, "data-series": names[i] }));
    root.append(svg("text", { x: P + 60 * i, y: H - 2, "font-size": 10, fill: colors[i] }, names[i]));
  });
  return root;
}

// Active variant over time: one coloured band per window, labelled with the variant's name.
function variantChart(rows) {
  const W = 360, H = 150, P = 10;
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  const named = rows.filter((r) => r.active_variant);
  if (!named.length) { root.append(svg("text", { x: P, y: H / 2, fill: "#8a93a3" }, "no data yet")); return root; }
  const variants = [...new Set(named.map((r) => r.active_variant))];
  const palette = ["#1a73e8", "#e37400", "#137333", "#a142f4", "#d93025"];
  const t0 = named[0].ts, t1 = named[named.length - 1].ts;
  const x = (t) => P + (t1 > t0 ? (t - t0) / (t1 - t0) : 0) * (W - 2 * P);
  const lane = (H - 40) / variants.length;
  named.forEach((r, i) => {
    const next = i + 1 < named.length ? named[i + 1].ts : r.ts + (r.window_s || 1);
    const k = variants.indexOf(r.active_variant);
    root.append(svg("rect", { x: x(r.ts), y: 10 + k * lane, width: Math.max(2, x(Math.min(next, t1 || next)) - x(r.ts)),
      height: lane - 4, fill: palette[k % palette.length] }));
  });
  variants.forEach((v, k) => {
    root.append(svg("text", { x: P, y: H - 24 + 12 * (k % 2), "font-size": 11, fill: palette[k % palette.length],
      class: "variant-label", dx: 90 * Math.floor(k / 2) }, v));
  });
  return root;
}

async function refreshDevice() {
  if (!selected) { return; }
  const rows = await api("/api/devices/" + encodeURIComponent(selected) + "/series?limit=500");
  document.getElementById("device-view").hidden = false;
  document.getElementById("device-name").textContent = selected;
  const pts = (key) => rows.map((r) => ({ t: r.ts, v: r[key] }));
  document.getElementById("chart-latency").replaceChildren(
    lineChart([pts("p50_ms"), pts("p90_ms")], ["#1a73e8", "#e37400"], ["p50", "p90"]));
  document.getElementById("chart-battery").replaceChildren(lineChart([pts("battery_pct")], ["#137333"], ["battery"]));
  document.getElementById("chart-variant").replaceChildren(variantChart(rows));
}

function renderRollouts(rollouts) {
  const box = document.getElementById("rollouts");
  box.replaceChildren();
  if (!rollouts.length) { box.append(el("p", { class: "muted" }, "No rollouts yet.")); return; }
  for (const r of rollouts) {
    const stages = el("div", { class: "stages" });
    r.progress.forEach((p) => {
      const committed = p.states.committed || 0;
      const cls = "stage" + (p.stage === r.stage && r.state === "running" ? " current" : "") +
        (p.stage < r.stage || r.state === "completed" ? " done" : "");
      const summary = Object.entries(p.states).map(([k, v]) => v + " " + k).join(", ");
      stages.append(el("div", { class: cls, "data-stage": p.stage },
        `Stage ${p.stage + 1}: ${p.percent}% · ${committed}/${p.devices} committed`,
        el("div", { class: "bar" }, el("div", { style: `width:${p.devices ? (100 * committed) / p.devices : 0}%` })),
        el("div", { class: "muted" }, summary)));
    });
    const gates = el("ul", { class: "gates" });
    for (const g of r.gate_status || []) {
      const value = g.value == null ? "no data" : Number(g.value).toPrecision(3);
      gates.append(el("li", { class: g.ok ? "gate-ok" : "gate-fail" },
        `${g.ok ? "✓" : "✗"} ${g.name}: ${value} (limit ${g.limit == null ? "off" : g.limit}) ${g.detail || ""}`));
    }
    box.append(el("div", { class: "rollout", "data-rollout": r.id },
      el("strong", {}, `${r.id} · ${r.model_id} ${r.bundle_version} → fleet ${r.fleet} · `),
      el("span", { class: "state-" + r.state }, r.state),
      el("span", { class: "muted" }, ` · stage ${r.stage + 1} of ${r.stages.length}`),
      r.reason ? el("div", { class: "reason" }, r.reason) : "",
      stages, gates));
  }
}

async function refresh() {
  try {
    const [devices, rollouts, stats] = await Promise.all([api("/api/devices"), api("/api/rollouts"), api("/api/stats")]);
    renderDevices(devices);
    renderRollouts(rollouts);
    const rejects = Object.values(stats.rejects).reduce((a, b) => a + b, 0);
    document.getElementById("summary").textContent =
      `${stats.online} of ${stats.devices} devices online · ${stats.counters.stored || 0} messages stored · ${rejects} rejected`;
    await refreshDevice();
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = err.message;
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("edgeprune-token", document.getElementById("token-input").value);
  document.getElementById("token-form").hidden = true;
  refresh();
});

refresh();
setInterval(refresh, 5000);
