// freshet dashboard: live panels fed by server-sent events (/ui/events), charts drawn as SVG.
// No dependencies: every asset is served by freshet itself.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const WINDOW_S = 300;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100) return v.toFixed(0);
  return v.toFixed(digits === undefined ? (a >= 10 ? 1 : 2) : digits);
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

// A line chart of up to two series over the last WINDOW_S seconds, with optional red marks.
function lineChart(container, series, opts) {
  opts = opts || {};
  const w = container.clientWidth || 400, h = container.clientHeight || 120;
  const pad = { l: 36, r: 8, t: 14, b: 14 };
  const now = opts.now, t0 = now - WINDOW_S;
  let max = opts.min || 0;
  for (const s of series) for (const [t, v] of s.points) if (t >= t0 && v !== null && v > max) max = v;
  max = max > 0 ? max * 1.15 : 1;
  const x = (t) => pad.l + ((t - t0) / WINDOW_S) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / max) * (h - pad.t - pad.b);
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
  root.appendChild(svg("line", { class: "axis", x1: pad.l, x2: w - pad.r, y1: y(0), y2: y(0) }));
  root.appendChild(svg("line", { class: "axis", x1: pad.l, x2: w - pad.r, y1: y(max / 1.15), y2: y(max / 1.15) }));
  root.appendChild(svg("text", { x: 2, y: y(max / 1.15) + 3 }, fmt(max / 1.15)));
  root.appendChild(svg("text", { x: 2, y: y(0) }, "0"));
  root.appendChild(svg("text", { x: pad.l, y: h - 2 }, "-5 min"));
  root.appendChild(svg("text", { x: w - pad.r - 20, y: h - 2 }, "now"));
  series.forEach((s, i) => {
    let d = "", pen = false, count = 0, last = null;
    for (const [t, v] of s.points) {
      if (t < t0 || v === null) { pen = false; continue; }
      d += (pen ? " L" : " M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
      pen = true; count += 1; last = v;
    }
    const path = svg("path", { class: "s" + i, d: d || "M0,0", "data-points": count });
    root.appendChild(path);
    root.appendChild(svg("text", { class: "legend" + i, x: pad.l + 4 + i * 140, y: 10 },
      `${s.label} ${fmt(last)}${opts.unit || ""}`));
  });
  for (const m of opts.marks || []) {
    if (m < t0) continue;
    root.appendChild(svg("line", { class: "mark-line", x1: x(m), x2: x(m), y1: pad.t, y2: h - pad.b }));
  }
  container.replaceChildren(root);
}

function sparkline(container, points, marks, now, threshold) {
  const w = container.clientWidth || 200, h = container.clientHeight || 26, t0 = now - WINDOW_S;
  let max = threshold || 0.5;
  for (const [t, v] of points) if (t >= t0 && v !== null && v > max) max = v;
  max *= 1.1;
  const x = (t) => ((t - t0) / WINDOW_S) * (w - 4) + 2;
  const y = (v) => h - 2 - (Math.min(v, max) / max) * (h - 4);
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  root.appendChild(svg("line", { class: "axis", x1: 0, x2: w, y1: h - 2, y2: h - 2 }));
  let d = "";
  for (const [t, v] of points) if (t >= t0 && v !== null) d += (d ? " L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
  root.appendChild(svg("path", { class: "s0", d: d || "M0,0" }));
  // alerts are marked at their time along the top edge: their statistics are the detectors' own, in other units
  for (const [t, v, kind] of marks) {
    const dot = svg("circle", { class: "mark", cx: t >= t0 ? x(t) : 3, cy: 4, r: 3.5, "data-kind": kind });
    dot.appendChild(svg("title", {}, `${kind} alert at ${clock(t)}: statistic ${fmt(v)}`));
    root.appendChild(dot);
  }
  container.replaceChildren(root);
}

// --- panels ---------------------------------------------------------------------------

const seenAlerts = new Set();
let firstSnapshot = true;

function renderStream(s, now) {
  if (!s) return;
  lineChart($("chart-stream"), [
    { label: "in", points: s.in }, { label: "processed", points: s.processed }], { now, unit: "/s" });
  $("lag-group").textContent = `group ${s.group} on ${s.topics.join(", ")} · total ${fmt(s.lag_total, 0)}`;
  const oneTopic = s.topics.length === 1;
  const entries = Object.entries(s.lag).map(([name, v]) => [oneTopic ? "partition " + name.split("[")[1].replace("]", "") : name, v]);
  const max = Math.max(1, ...entries.map(([, v]) => v || 0));
  const rows = entries.map(([name, v]) => {
    const row = el("div", { class: "bar", "data-partition": name });
    row.appendChild(el("span", { class: "name", title: name }, name));
    const bar = svg("svg", { viewBox: "0 0 100 8", preserveAspectRatio: "none" });
    bar.appendChild(svg("rect", { class: "track", x: 0, y: 0, width: 100, height: 8 }));
    bar.appendChild(svg("rect", { class: "fill", x: 0, y: 0, width: ((v || 0) / max) * 100, height: 8 }));
    row.appendChild(bar);
    row.appendChild(el("span", { class: "num" }, v === null ? "no commit" : fmt(v, 0)));
    return row;
  });
  $("lag").replaceChildren(...(rows.length ? rows : [el("span", { class: "muted" }, "no event topics yet")]));
}

function renderFreshness(f, now) {
  if (!f) return;
  const behind = f.read_behind_s !== null && f.read_behind_s > 1;
  $("freshness-note").textContent = behind
    ? `this dashboard reads events ${fmt(f.read_behind_s)} s late: not sampling until it catches up` : "";
  lineChart($("chart-freshness"), [{ label: "p50", points: f.p50_ms }, { label: "p99", points: f.p99_ms }],
    { now, unit: " ms" });
}

function renderApi(a, now) {
  lineChart($("chart-api-rate"), [{ label: "requests", points: a.rate }], { now, unit: "/s" });
  lineChart($("chart-api-latency"), [{ label: "p50", points: a.p50_ms }, { label: "p99", points: a.p99_ms }],
    { now, unit: " ms" });
}

function renderDeadletters(d, now) {
  lineChart($("chart-deadletters"), [{ label: "dead letters", points: d.rate }], { now, unit: "/s" });
  const items = d.latest.map((x) => el("li", {}, `${clock(x.ts)} ${x.topic}[${x.partition}]@${x.offset}: ${x.error}`));
  const reasons = d.reasons.map(([r, n]) => el("li", { class: "muted" }, `${n} × ${r}`));
  $("deadletter-reasons").replaceChildren(
    ...(items.length ? [...items, ...reasons] : [el("li", { class: "muted" }, `none (${d.total} in total)`)]));
}

function renderDrift(drift, now) {
  const box = $("drift");
  if (!drift.length) {
    box.replaceChildren(el("span", { class: "muted" }, "waiting for predictions: the statistic needs 500 values per input first"));
    return;
  }
  // inputs with alerts first (newest alert first), then by how far they moved
  const latest = (d) => Math.max(0, ...d.alerts.map((a) => a[0]));
  const current = (d) => (d.points.length ? d.points[d.points.length - 1][1] || 0 : 0);
  drift = drift.slice().sort((a, b) => latest(b) - latest(a) || current(b) - current(a));
  const rows = drift.map((d) => {
    const row = el("div", { class: "drift-row" + (d.alerts.length ? " alerted" : ""), "data-subject": d.subject });
    row.appendChild(el("span", { class: "name", title: d.subject }, d.subject));
    const spark = el("div", { class: "spark" });
    row.appendChild(spark);
    const last = d.points.length ? d.points[d.points.length - 1][1] : null;
    row.appendChild(el("span", { class: "value" }, fmt(last)));
    return [row, spark, d];
  });
  box.replaceChildren(...rows.map((r) => r[0]));
  for (const [, spark, d] of rows) sparkline(spark, d.points, d.alerts, now);
}

function renderAlerts(a) {
  $("alert-count").textContent = `${a.total} in total`;
  const items = a.latest.slice().reverse().map((x) => {
    const li = el("li", { "data-alert-id": x.alert_id, "data-kind": x.kind });
    if (!firstSnapshot && !seenAlerts.has(x.alert_id)) li.classList.add("new");
    seenAlerts.add(x.alert_id);
    li.appendChild(el("span", { class: "kind " + x.kind }, x.kind));
    li.appendChild(document.createTextNode(
      `${clock(x.ts)} ${x.model} v${x.version} · ${x.subject} · ${x.detector} ${fmt(x.statistic)} > ${fmt(x.threshold)}`));
    return li;
  });
  $("alerts").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "no drift alerts")]));
}

function renderModels(m, serving, now) {
  const box = $("timeline");
  const events = m.events;
  const w = box.clientWidth || 600, h = box.clientHeight || 70;
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  root.appendChild(svg("line", { class: "axis", x1: 10, x2: w - 10, y1: h / 2, y2: h / 2 }));
  if (events.length) {
    const t0 = Math.min(events[0].ts, now - 60), t1 = now;
    const x = (t) => 14 + ((t - t0) / Math.max(1, t1 - t0)) * (w - 40);
    root.appendChild(svg("text", { x: 10, y: h - 4 }, clock(t0)));
    root.appendChild(svg("text", { x: w - 50, y: h - 4 }, clock(t1)));
    events.forEach((e, i) => {
      const g = svg("g", { "data-version": e.version, "data-kind": e.kind, class: "tl-event" });
      const cx = x(e.ts);
      g.appendChild(svg("circle", { class: e.kind, cx, cy: h / 2, r: 6 }));
      g.appendChild(svg("text", { x: cx - 8, y: i % 2 ? h / 2 + 20 : h / 2 - 10 },
        (e.kind === "rollback" ? "↩ v" : "v") + e.version));
      const metrics = Object.entries(e.metrics).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(", ");
      g.appendChild(svg("title", {}, `${e.kind} of ${e.model} v${e.version} (${e.stage}) at ${clock(e.ts)} ${metrics}`));
      root.appendChild(g);
    });
  } else {
    root.appendChild(svg("text", { x: 14, y: h / 2 - 8 }, "no promotion yet"));
  }
  box.replaceChildren(root);
  const current = m.current;
  const rows = m.versions.map((v) => {
    const tr = el("tr", { "data-version": v.version });
    tr.appendChild(el("td", {}, `${v.model} v${v.version}`));
    tr.appendChild(el("td", { class: "num" }, fmt(v.predictions, 0)));
    tr.appendChild(el("td", { class: "num" }, fmt(v.labelled, 0)));
    tr.appendChild(el("td", { class: "num" }, v.error_rate === null ? "–" : (v.error_rate * 100).toFixed(1) + "%"));
    tr.appendChild(el("td", {}, (serving && serving.version === v.version) || current[v.model] === v.version ? "●" : ""));
    return tr;
  });
  $("versions").tBodies[0].replaceChildren(...rows);
}

function renderConsistency(c, alerts) {
  const dq = alerts.latest.filter((a) => a.kind === "data_quality" && /consisten/i.test(a.subject));
  if (!c.length && !dq.length) return;
  const box = $("consistency");
  const parts = c.map((s) => {
    const labels = Object.entries(s.labels).map(([k, v]) => `${k}=${v}`).join(" ");
    return el("div", {}, `${(s.value * 100).toFixed(2)}% ${labels}`);
  });
  const big = c.length ? el("div", { class: "big", "data-consistency": c[0].value }, `${(c[0].value * 100).toFixed(2)}%`) : null;
  const notes = dq.map((a) => el("div", { class: "error" }, `${clock(a.ts)} ${a.subject}: ${fmt(a.statistic)}`));
  box.classList.remove("muted");
  box.replaceChildren(...[big, ...parts, ...notes].filter(Boolean));
}

function renderProblems(p) {
  const entries = Object.entries(p || {});
  $("card-problems").hidden = !entries.length;
  $("problems").replaceChildren(...entries.map(([k, v]) => el("li", {}, `${k}: ${v}`)));
}

function render(snap) {
  if (!snap.now) return;
  const now = snap.now;
  renderStream(snap.stream, now);
  renderFreshness(snap.freshness, now);
  renderApi(snap.api, now);
  renderDeadletters(snap.deadletters, now);
  renderDrift(snap.drift, now);
  renderAlerts(snap.alerts);
  renderModels(snap.models, snap.serving, now);
  renderConsistency(snap.consistency || [], snap.alerts);
  renderProblems(snap.problems);
  const s = snap.serving;
  $("serving").textContent = s ? (s.version ? `serving ${s.model} v${s.version}` : `${s.model}: no model served yet`) : "";
  $("status").textContent = `live · ${clock(now)}`;
  $("status").className = "status live";
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  firstSnapshot = false;
}

function connect() {
  const source = new EventSource("/ui/events");
  source.addEventListener("snapshot", (ev) => render(JSON.parse(ev.data)));
  source.onerror = () => {
    $("status").textContent = "reconnecting…";
    $("status").className = "status down";
  };
}

// --- feature browser ------------------------------------------------------------------

function windowText(s) {
  if (s % 86400 === 0) return s / 86400 + " d";
  if (s % 3600 === 0) return s / 3600 + " h";
  if (s % 60 === 0) return s / 60 + " min";
  return s + " s";
}

async function loadFeatures() {
  const box = $("views");
  box.replaceChildren(el("span", { class: "muted" }, "reading the Feast registry…"));
  const resp = await fetch("/ui/api/features");
  if (!resp.ok) { box.replaceChildren(el("span", { class: "error" }, `failed: ${resp.status}`)); return; }
  const cat = await resp.json();
  $("project").textContent = `project ${cat.project} · ${cat.views.length} views`;
  box.replaceChildren(...cat.views.map(viewSection));
}

function viewSection(v) {
  const sec = el("div", { class: "view", "data-view": v.name });
  sec.appendChild(el("h3", {}, v.name));
  const ents = v.entities.map((e) => `${e.name}${e.description ? " (" + e.description + ")" : ""}`).join(", ");
  sec.appendChild(el("p", { class: "muted" },
    `${v.description || "no description"} · topic ${v.topic} · keys ${v.join_keys.join(", ")} · entities ${ents || "–"} · TTL ${windowText(v.ttl_s)} · lateness ${windowText(v.lateness_s)}`));
  const form = el("form", {});
  for (const k of v.join_keys) {
    form.appendChild(el("label", { for: `${v.name}-${k}` }, k));
    form.appendChild(el("input", { id: `${v.name}-${k}`, name: k, required: "" }));
  }
  form.appendChild(el("button", { type: "submit" }, "current values"));
  const out = el("pre", { hidden: "" });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams({ view: v.name });
    for (const k of v.join_keys) q.set(k, form.elements[k].value);
    const resp = await fetch("/ui/api/entity?" + q);
    const body = await resp.json();
    out.hidden = false;
    out.textContent = resp.ok ? entityText(body) : body.detail;
  });
  sec.appendChild(form);
  sec.appendChild(out);
  const table = el("table", {});
  const head = el("tr", {});
  for (const h of ["feature", "function", "column", "window", "slide", "type", "description"]) head.appendChild(el("th", {}, h));
  table.appendChild(el("thead", {})).appendChild(head);
  const body = el("tbody", {});
  for (const f of v.features) {
    const tr = el("tr", { "data-feature": f.name });
    for (const c of [f.name, f.function, f.column, windowText(f.window_s), windowText(f.slide_s), f.dtype, f.description]) tr.appendChild(el("td", {}, c));
    body.appendChild(tr);
  }
  table.appendChild(body);
  sec.appendChild(table);
  return sec;
}

function entityText(resp) {
  const names = resp.metadata.feature_names;
  return names.map((n, i) => {
    const r = resp.results[i];
    return `${n.padEnd(40)} ${JSON.stringify(r.values[0])}  ${r.statuses[0]}  ${r.event_timestamps[0]}`;
  }).join("\n");
}

function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  $("live").hidden = name !== "live";
  $("features").hidden = name !== "features";
  if (name === "features" && !$("views").dataset.loaded) { $("views").dataset.loaded = "1"; loadFeatures(); }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  connect();
});
