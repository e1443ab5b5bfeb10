// The data page: upload a fine-tune file (POST /v1/files), show what `forja data inspect` says about it
// (GET /console/api/files/{id}/report), list the uploads.
"use strict";

async function showReport(file) {
  const report = await api("GET", `/console/api/files/${encodeURIComponent(file.id)}/report`);
  $("report").hidden = false;
  $("report-name").textContent = report.filename;
  $("report-files").replaceChildren(...report.files.map((f) => {
    const box = el("div", { class: "file-report" });
    if (f.error) { box.append(el("p", { class: "error" }, f.error)); return box; }
    const what = f.kind === "dialogue" ? `${f.rows} conversations, ${f.turns} turns`
      : f.kind === "knowledge" ? `${f.rows} rows, ${f.chunks} knowledge chunks` : "no rows";
    box.append(el("dl", { class: "facts" },
      el("dt", {}, "Read as"), el("dd", {}, f.container + (f.detail ? ` (${f.detail})` : "")),
      el("dt", {}, "Format"), el("dd", {}, `${f.format || "–"} → ${f.kind || "–"}`),
      el("dt", {}, "Rows"), el("dd", { id: "report-rows" }, what),
      el("dt", {}, "Tokens"), el("dd", { title: report.token_unit }, f.tokens.toLocaleString()),
      el("dt", {}, "Duplicates"), el("dd", { id: "report-duplicates" }, String(f.duplicates)),
      el("dt", {}, "Bad rows"), el("dd", {}, String(f.bad_rows.length))));
    box.append(el("p", { class: "hint" }, `Tokens: ${report.token_unit}`));
    if (f.bad_rows.length) box.append(el("ul", { class: "bad-rows" }, ...f.bad_rows.map((m) => el("li", {}, m))));
    if (f.notes.length) box.append(el("ul", { class: "hint" }, ...f.notes.map((m) => el("li", {}, m))));
    return box;
  }));
  histogram($("report-histogram"), report.histogram);
  const split = report.prepared;
  $("report-prepared").textContent = split ? `Prepared as ${split.train_rows} training and ${split.val_rows} validation ` +
    `rows (${split.duplicates_removed} duplicates removed, ${split.skipped} bad rows skipped).` : "";
  $("report-preview").replaceChildren(...report.preview.map((row) => el("li", { class: "item" },
    ...(row.messages ? row.messages.map((m) => el("p", {}, el("span", { class: "label" }, m.role), m.content))
      : [el("p", {}, row.text.length > 400 ? row.text.slice(0, 400) + " …" : row.text)]),
    el("p", { class: "hint" }, row.source || ""))));
  $("report-quality").textContent = report.quality.join("\n");
}

function histogram(node, bins) {
  const W = 560, H = 180, L = 40, B = 24, T = 10;
  node.replaceChildren();
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const shown = bins.slice(0, Math.max(4, bins.map((b) => b.rows > 0).lastIndexOf(true) + 1));
  const top = Math.max(1, ...shown.map((b) => b.rows));
  const step = (W - L) / shown.length;
  shown.forEach((b, i) => {
    const height = (b.rows / top) * (H - T - B);
    const bar = svg("rect", { class: "bar", x: L + i * step + 2, y: H - B - height, width: Math.max(step - 4, 1), height });
    bar.append(svg("title", {}, `${b.tokens} tokens: ${b.rows} rows`));
    node.append(bar);
    node.append(svg("text", { x: L + (i + 0.5) * step, y: H - 8, "text-anchor": "middle" }, b.tokens));
    node.append(svg("text", { x: L + (i + 0.5) * step, y: H - B - height - 3, "text-anchor": "middle" }, String(b.rows)));
  });
}

async function listFiles() {
  const files = await api("GET", "/v1/files?purpose=fine-tune&order=desc");
  $("files").tBodies[0].replaceChildren(...files.data.map((f) => el("tr", {},
    el("td", { class: "filename" }, f.filename), el("td", {}, f.id), el("td", {}, f.bytes.toLocaleString()),
    el("td", {}, when(f.created_at)),
    el("td", {}, el("button", { type: "button", class: "secondary", onclick: () => showReport(f).catch((e) => status(e.message, true)) }, "Report")))));
}

$("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("upload-file");
  if (!input.files.length) return;
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", input.files[0]);
  $("upload-send").disabled = true;
  showError($("upload-error"), null);
  status("Uploading and checking …");
  try {
    const file = await api("POST", "/v1/files", form);
    status(`Uploaded ${file.filename} as ${file.id}.`);
    await showReport(file);
    await listFiles();
  } catch (error) {
    status("");
    showError($("upload-error"), error);
  } finally {
    $("upload-send").disabled = false;
  }
});

listFiles().catch((e) => status(e.message, true)).finally(() => { document.body.dataset.loaded = "true"; });
