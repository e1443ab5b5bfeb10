// The versions page: every trained version (GET /console/api/versions) with its metrics, gate result and
// loss curve; promote (POST /admin/models/activate) and roll back (POST /admin/models/rollback); export one
// (POST /console/api/versions/NAME/export, a job whose files are downloaded from /v1/files/ID/content);
// compare two on a test set (POST /v1/files purpose evals, then POST /console/api/compare, a forja eval job).
"use strict";

const TASK_POLL_MS = 1000;
const SCORES = ["exact_match", "token_f1", "rouge_l", "semantic", "judge"];
const SHOWN_METRICS = ["train_loss", "val_loss", "valid_loss", "step", "steps", "epochs", "tokens", "seconds"];

function versionCard(v) {
  const card = el("article", { class: "card item version", "data-version": v.name });
  card.append(el("h2", {}, v.name, " ", v.active ? el("span", { class: "badge active" }, "active") : null));
  if (v.error) { card.append(el("p", { class: "error" }, v.error)); return card; }
  const facts = el("dl", { class: "facts" },
    el("dt", {}, "Base"), el("dd", {}, v.base || "–"),
    el("dt", {}, "Method"), el("dd", {}, v.method || "–"),
    el("dt", {}, "Created"), el("dd", {}, v.created_at ? when(v.created_at) : "–"),
    el("dt", {}, "Data hash"), el("dd", { title: v.data_hash || "" }, v.data_hash ? v.data_hash.slice(0, 12) : "–"));
  for (const key of SHOWN_METRICS) {
    if (v.metrics[key] !== undefined) {
      const value = typeof v.metrics[key] === "number" ? +v.metrics[key].toPrecision(4) : v.metrics[key];
      facts.append(el("dt", {}, key.replace("_", " ")), el("dd", {}, String(value)));
    }
  }
  card.append(facts);
  if (v.gate) {
    const verdict = v.gate.passed ? "passed" : "failed";
    card.append(el("p", { class: "gate" }, el("span", { class: "label" }, "Promotion gate"),
      el("span", { class: "badge " + verdict }, verdict), " ", v.gate.reason || ""));
  }
  const learned = v.from_feedback;
  if (learned) {
    card.append(el("p", { class: "learned" }, el("span", { class: "label" }, "Learned from feedback"),
      `retrained from ${learned.started_from} on feedback ${(learned.train_feedback_ids || []).map((i) => "#" + i).join(", ") || "–"}` +
      ((learned.holdout_feedback_ids || []).length ? `, held out ${learned.holdout_feedback_ids.map((i) => "#" + i).join(", ")}` : "") +
      (learned.replayed_rows ? `, with ${learned.replayed_rows} rows of its own data replayed` : "")));
  }
  if (v.loss_plot) {
    card.append(el("img", { src: `/console/api/versions/${encodeURIComponent(v.name)}/loss.png`,
      alt: `Loss curve of ${v.name}`, loading: "lazy" }));
  }
  const actions = el("div", { class: "actions" });
  if (!v.active) actions.append(el("button", { type: "button", class: "promote", onclick: () => promote(v.name) }, "Promote"));
  const exported = el("div", { class: "exported" });
  for (const format of ["gguf", "ollama"]) {
    actions.append(el("button", { type: "button", class: "export", "data-format": format,
      onclick: (event) => exportVersion(v.name, format, event.target, exported) }, `Export ${format === "gguf" ? "GGUF" : "Ollama"}`));
  }
  card.append(actions, exported);
  return card;
}

// Poll a comparison or export until it ends; `onChange(task)` after each look.
async function follow(id, onChange) {
  for (;;) {
    const task = await api("GET", `/console/api/tasks/${encodeURIComponent(id)}`);
    onChange(task);
    if (["succeeded", "failed", "cancelled"].includes(task.status)) return task;
    await new Promise((done) => setTimeout(done, TASK_POLL_MS));
  }
}

function lastEvent(task) {
  return task.events && task.events.length ? task.events[0].message : task.status;
}

async function exportVersion(name, format, button, into) {
  button.disabled = true;
  into.replaceChildren(el("p", { class: "hint" }, `Exporting ${name} as ${format} …`));
  try {
    const started = await api("POST", `/console/api/versions/${encodeURIComponent(name)}/export`, { format });
    const task = await follow(started.id, (t) => { into.firstChild.textContent = `${format}: ${lastEvent(t)}`; });
    if (task.status !== "succeeded") throw new Error((task.error && task.error.message) || lastEvent(task));
    into.replaceChildren(el("p", { class: "hint" }, `${format} export of ${name}:`), el("ul", { class: "downloads" },
      ...task.files.map((f) => el("li", {}, el("a", { href: `/v1/files/${encodeURIComponent(f.id)}/content`,
        download: f.filename }, f.filename), ` (${(f.bytes / 2 ** 20).toFixed(1)} MiB)`))));
  } catch (error) {
    into.replaceChildren(el("p", { class: "error" }, error.message));
  } finally { button.disabled = false; }
}

function score(row, metric) {
  const value = row[metric];
  return typeof value === "number" ? value.toFixed(2) : "–";
}

// The comparison: one row per question, each model's answer and scores next to each other, then the means.
function comparison(task) {
  const names = task.summary.models;
  const shown = SCORES.filter((m) => names.some((n) => task.summary.means[n] && task.summary.means[n][m] !== undefined));
  const byQuestion = new Map();
  for (const row of task.rows) {
    const key = row.case;
    if (!byQuestion.has(key)) byQuestion.set(key, { question: row.question, truth: row.ground_truth, answers: {} });
    byQuestion.get(key).answers[row.model] = row;
  }
  const head = el("tr", {}, el("th", {}, "Question"), el("th", {}, "Expected"), ...names.map((n) => el("th", {}, n)));
  const body = [...byQuestion.values()].map((q) => el("tr", {}, el("td", {}, q.question), el("td", {}, q.truth || ""),
    ...names.map((n) => {
      const row = q.answers[n] || {};
      return el("td", { class: "answer", "data-model": n }, el("p", {}, row.answer || ""),
        el("p", { class: "scores" }, shown.map((m) => `${m} ${score(row, m)}`).join(" · ")));
    })));
  const means = el("tr", { class: "means" }, el("th", {}, "Mean"), el("td", {}, ""), ...names.map((n) =>
    el("td", { "data-model": n }, shown.map((m) => `${m} ${score(task.summary.means[n] || {}, m)}`).join(" · "))));
  return el("div", {}, el("table", { class: "compare" }, el("thead", {}, head),
    el("tbody", {}, ...body, means)),
    el("p", {}, el("a", { href: `/v1/files/${encodeURIComponent(task.report_file_id)}/content` }, "The full report (HTML)")));
}

$("compare").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("compare-file").files[0];
  showError($("compare-error"), null);
  $("compare-result").replaceChildren();
  $("compare-send").disabled = true;
  try {
    const form = new FormData();
    form.append("purpose", "evals");
    form.append("file", file);
    const uploaded = await api("POST", "/v1/files", form);
    const started = await api("POST", "/console/api/compare", { models: [$("compare-a").value, $("compare-b").value],
      testset_file_id: uploaded.id, judge: $("compare-judge").value.trim() || null });
    const task = await follow(started.id, (t) => { $("compare-state").textContent = lastEvent(t); });
    if (task.status !== "succeeded") throw new Error((task.error && task.error.message) || lastEvent(task));
    $("compare-result").replaceChildren(comparison(task));
  } catch (error) {
    showError($("compare-error"), error);
  } finally { $("compare-send").disabled = false; }
});

function fillChoices(versions) {
  const names = versions.data.filter((v) => !v.error).map((v) => v.name);
  if (!names.includes(versions.active)) names.push(versions.active);
  for (const [id, pick] of [["compare-a", 0], ["compare-b", 1]]) {
    const select = $(id), before = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    select.value = names.includes(before) ? before : names[Math.min(pick, names.length - 1)] || "";
  }
}

async function load() {
  const versions = await api("GET", "/console/api/versions");
  $("active").textContent = versions.active;
  fillChoices(versions);
  $("versions").replaceChildren(...(versions.data.length ? versions.data.map(versionCard)
    : [el("p", { class: "card" }, "No trained version yet: start a job on the Training page.")]));
  $("log").replaceChildren(...versions.log.map((entry) =>
    el("li", {}, `${entry.at} ${entry.action} ${entry.model} (before: ${entry.previous}) — ${entry.reason || ""}`)));
}

async function promote(name) {
  status(`Loading ${name} and making it active …`);
  try {
    const result = await api("POST", "/admin/models/activate", { model: name });
    status(result.changed ? `${result.active} is now active (was ${result.previous}).` : `${result.active} was already active.`);
  } catch (error) { status(error.message, true); }
  await load().catch((e) => status(e.message, true));
}

$("rollback").addEventListener("click", async () => {
  try {
    const result = await api("POST", "/admin/models/rollback");
    status(`Rolled back: ${result.active} is active again (was ${result.previous}).`);
  } catch (error) { status(error.message, true); }
  await load().catch((e) => status(e.message, true));
});

load().catch((e) => status(e.message, true)).finally(() => { document.body.dataset.loaded = "true"; });
