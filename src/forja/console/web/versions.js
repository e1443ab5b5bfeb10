// The versions page: every trained version (GET /console/api/versions) with its metrics, gate result and
// loss curve; promote (POST /admin/models/activate) and roll back (POST /admin/models/rollback).
"use strict";

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
  card.append(actions);
  return card;
}

async function load() {
  const versions = await api("GET", "/console/api/versions");
  $("active").textContent = versions.active;
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
