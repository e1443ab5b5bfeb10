// What every console page shares: calls of the API with the session (and its CSRF token when they change
// something), elements built with text only (never innerHTML), dates, and an SVG line chart.
"use strict";

const $ = (id) => document.getElementById(id);
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const SVG = "http://www.w3.org/2000/svg";

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// fetch `path`; JSON bodies as JSON, FormData as multipart; an API error's message is thrown as an ApiFailure.
async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  if (response.status === 401 && path.startsWith("/console/api/")) {
    location.href = "/console/login?next=" + encodeURIComponent(location.pathname);
  }
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || `${response.status} ${response.statusText}`;
    throw new ApiFailure(response.status, message);
  }
  return data;
}

// el("td", {class: "x"}, "text", otherNode): strings become text nodes, so stored text is never markup.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function when(seconds) {
  if (!seconds) return "–";
  const date = typeof seconds === "number" ? new Date(seconds * 1000) : new Date(seconds);
  return date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function status(text, isError) {
  const node = $("status");
  node.textContent = text || "";
  node.classList.toggle("error", !!isError);
}

function showError(node, error) {
  node.textContent = error ? error.message || String(error) : "";
  node.hidden = !error;
}

// A line chart of series [{name, cls, points: [[x, y], ...]}] into an <svg> as wide as it is shown; the y axis
// spans the values (a loss that falls from 6.1 to 5.9 is a visible fall, not a flat line near the top).
function lineChart(node, series, xLabel) {
  const W = Math.max(280, Math.round(node.clientWidth || 560)), H = 220, L = 48, R = 12, T = 24, B = 28;
  node.replaceChildren();
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const all = series.flatMap((s) => s.points);
  if (!all.length) { node.append(svg("text", { x: L, y: H / 2 }, "No points yet.")); return; }
  const xMax = Math.max(1, ...all.map((p) => p[0]));
  let yMin = Math.min(...all.map((p) => p[1])), yMax = Math.max(...all.map((p) => p[1]));
  const pad = (yMax - yMin) * 0.1 || Math.abs(yMax) * 0.05 || 1;
  yMin -= pad; yMax += pad;
  const x = (v) => L + (v / xMax) * (W - L - R), y = (v) => H - B - ((v - yMin) / (yMax - yMin)) * (H - T - B);
  for (const v of [yMin, (yMin + yMax) / 2, yMax]) {
    node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    node.append(svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, String(+v.toPrecision(3))));
  }
  node.append(svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, `${xLabel} ${xMax}`));
  node.append(svg("text", { x: L, y: H - 6 }, `${xLabel} 0`));
  let legend = L;
  for (const s of series) {
    if (!s.points.length) continue;
    const cls = s.cls || "";
    node.append(svg("polyline", { class: "line " + cls, points: s.points.map((p) => `${x(p[0])},${y(p[1])}`).join(" ") }));
    for (const p of s.points) {
      const dot = svg("circle", { class: `dot point ${cls}`, cx: x(p[0]), cy: y(p[1]), r: 3 });
      dot.append(svg("title", {}, `${s.name}, ${xLabel} ${p[0]}: ${p[1]}`));
      node.append(dot);
    }
    node.append(svg("rect", { class: `key ${cls}`, x: legend, y: 6, width: 10, height: 10 }));
    node.append(svg("text", { x: legend + 14, y: 15 }, s.name));
    legend += 22 + 7 * s.name.length;
  }
}
