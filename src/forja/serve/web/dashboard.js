// The dashboard: fetches /admin/stats (with the admin key when the server has keys), draws its figures as
// inline SVG (no library: the page works offline) and runs the capacity plan. Text is set with
// textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const W = 480, H = 190, PAD = { left: 44, right: 8, top: 10, bottom: 22 };
let planDefaultsSet = false;

function headers() {
  const key = $("api-key").value.trim() || localStorage.getItem("forja-admin-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  return Math.ceil(value / step) * step;
}

function clock(seconds, window) {
  const d = new Date(seconds * 1000);
  return window > 48 * 3600 ? d.toLocaleDateString([], { month: "short", day: "numeric" })
    : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// A frame with a y axis from 0 to `top` and x labels at the first, middle and last bucket.
function frame(svg, top, buckets, span) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  for (const v of [0, top / 2, top]) {
    svg.append(el("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    svg.append(el("text", { x: PAD.left - 4, y: y(v) + 4, "text-anchor": "end" }, String(+v.toPrecision(3))));
  }
  const step = (W - PAD.left - PAD.right) / Math.max(buckets.length, 1);
  [[0, "start"], [Math.floor(buckets.length / 2), "middle"], [buckets.length - 1, "end"]].forEach(([i, anchor]) => {
    const x = PAD.left + (i + (anchor === "end" ? 1 : 0)) * step;
    if (buckets[i]) svg.append(el("text", { x, y: H - 6, "text-anchor": anchor }, clock(buckets[i].start, span)));
  });
  return { y, step };
}

function bars(svg, buckets, field, span, cls = "bar") {
  const top = niceMax(Math.max(0, ...buckets.map((b) => b[field] || 0)));
  const { y, step } = frame(svg, top, buckets, span);
  buckets.forEach((b, i) => {
    if (!b[field]) return;
    const rect = el("rect", { class: cls, x: PAD.left + i * step + 1, y: y(b[field]), width: Math.max(step - 2, 1),
                              height: y(0) - y(b[field]) });
    rect.append(el("title", {}, `${clock(b.start, span)}: ${b[field]}`));
    svg.append(rect);
  });
}

function lines(svg, buckets, fields, span) {
  const top = niceMax(Math.max(0, ...buckets.flatMap((b) => fields.map((f) => b[f] || 0))));
  const { y, step } = frame(svg, top, buckets, span);
  for (const field of fields) {
    const points = buckets.map((b, i) => (b[field] == null ? null : `${PAD.left + (i + 0.5) * step},${y(b[field])}`))
      .filter(Boolean);
    if (!points.length) continue;
    svg.append(el("polyline", { class: "line " + field.replace("_ms", "").replace("tokens_per_s", "speed"),
                                points: points.join(" ") }));
    for (const p of points) {
      const [cx, cy] = p.split(",");
      svg.append(el("circle", { cx, cy, r: 2.5, class: "dot" }));
    }
  }
  if (fields.length > 1) {
    fields.forEach((f, i) => svg.append(el("text", { x: W - PAD.right - 70 + i * 36, y: PAD.top + 4,
      class: "legend " + f.replace("_ms", "") }, f.replace("_ms", ""))));
  }
}

function versions(svg, rows) {
  svg.replaceChildren();
  const rated = rows.filter((v) => v.up_ratio != null);
  svg.setAttribute("viewBox", `0 0 ${W} ${Math.max(H, 24 * rated.length + 20)}`);
  if (!rated.length) { svg.append(el("text", { x: PAD.left, y: 40 }, "No ratings in this window yet.")); return; }
  const width = W - 200;
  rated.forEach((v, i) => {
    const y0 = 10 + i * 24;
    const name = v.model.split("/").pop();
    svg.append(el("text", { x: 0, y: y0 + 13 }, name.length > 22 ? name.slice(0, 21) + "…" : name));
    svg.append(el("rect", { class: "axis", x: 150, y: y0, width, height: 16, fill: "#eee" }));
    const bar = el("rect", { class: "up", x: 150, y: y0, width: width * v.up_ratio, height: 16 });
    bar.append(el("title", {}, `${v.model}: ${v.up} up, ${v.down} down`));
    svg.append(bar);
    svg.append(el("text", { x: 155 + width, y: y0 + 13 }, `${Math.round(v.up_ratio * 100)}% (${v.up + v.down})`));
  });
}

function guardDecisions(svg, rows) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${Math.max(H, 24 * rows.length + 20)}`);
  if (!rows.length) { svg.append(el("text", { x: PAD.left, y: 40 }, "No guardrail decisions in this window.")); return; }
  const most = Math.max(...rows.map((r) => r.count)), width = W - 220;
  rows.forEach((r, i) => {
    const y0 = 10 + i * 24;
    svg.append(el("text", { x: 0, y: y0 + 13 }, `${r.category} · ${r.action}`));
    const bar = el("rect", { class: r.action === "block" ? "blocked" : "bar", x: 150, y: y0,
                             width: Math.max(2, width * r.count / most), height: 16 });
    bar.append(el("title", {}, `${r.category}: ${r.count} ${r.action}`));
    svg.append(bar);
    svg.append(el("text", { x: 155 + width, y: y0 + 13 }, String(r.count)));
  });
}

function totals(stats) {
  const t = stats.totals;
  const items = [["requests", t.requests], ["p50 latency", t.p50_ms == null ? "–" : t.p50_ms + " ms"],
    ["p95 latency", t.p95_ms == null ? "–" : t.p95_ms + " ms"], ["tokens/s", t.tokens_per_s ?? "–"],
    ["tokens per call", t.tokens_per_call ?? "–"], ["generated tokens", t.completion_tokens],
    ["refused by guardrails", t.blocked]];
  $("totals").replaceChildren(...items.map(([label, value]) => {
    const div = document.createElement("div");
    const b = document.createElement("b");
    b.textContent = String(value);
    div.append(b, label);
    return div;
  }));
}

function plan() {
  const tokens = +$("plan-tokens").value, calls = +$("plan-calls").value, users = +$("plan-users").value;
  const speed = +$("plan-speed").value;
  const perDay = tokens * calls * users;
  const servers = speed > 0 ? Math.max(1, Math.ceil(perDay / (speed * 86400))) : NaN;
  $("plan-result").textContent = `${Math.round(perDay).toLocaleString()} generated tokens/day ` +
    `(${Math.round(tokens * calls).toLocaleString()} per user) → ${servers} server${servers === 1 ? "" : "s"} ` +
    `at ${speed} tokens/s, busy around the clock`;
}

async function refresh() {
  const hours = $("hours").value;
  const response = await fetch(`/admin/stats?hours=${hours}`, { headers: headers() });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    if (response.status === 401 || response.status === 403) $("key-box").open = true;
    $("status").textContent = message;
    return;
  }
  $("status").textContent = "";
  const stats = await response.json();
  const span = stats.until - stats.since;
  totals(stats);
  bars($("chart-requests"), stats.buckets, "requests", span);
  lines($("chart-latency"), stats.buckets, ["p50_ms", "p95_ms"], span);
  lines($("chart-speed"), stats.buckets, ["tokens_per_s"], span);
  versions($("chart-feedback"), stats.versions);
  bars($("chart-blocked"), stats.buckets, "blocked", span, "blocked");
  guardDecisions($("chart-guard"), stats.guard);
  if (!planDefaultsSet && stats.totals.requests) {
    $("plan-tokens").value = Math.max(1, Math.round(stats.totals.tokens_per_call));
    $("plan-speed").value = stats.totals.tokens_per_s;
    planDefaultsSet = true;
  }
  plan();
  document.body.dataset.loaded = "true";
}

$("api-key").value = localStorage.getItem("forja-admin-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("forja-admin-key", $("api-key").value.trim());
  refresh();
});
$("hours").addEventListener("change", refresh);
$("refresh").addEventListener("click", refresh);
$("plan").addEventListener("input", plan);
refresh();
