// The feedback review page: the queue (GET /console/api/feedback), approve (with the correction as written, or
// edited first) / reject (POST /console/api/feedback/review), and "retrain now" (a feedback job on the active version).
"use strict";

function item(row) {
  const card = el("article", { class: "card item feedback", "data-feedback": String(row.id) });
  const rating = row.rating === "up" ? "thumbs up" : row.rating === "down" ? "thumbs down" : "comment";
  card.append(el("h2", {}, `#${row.id} · ${rating} `, row.review ? el("span", { class: "badge " + row.review }, row.review) : null));
  card.append(el("p", { class: "hint" }, `${when(row.created_at)} · ${row.model}`,
    row.persona ? el("span", { class: "persona" }, ` · persona ${row.persona}`) : null,
    row.sender ? ` · from ${row.sender}` : ""));
  card.append(el("p", { class: "question" }, el("span", { class: "label" }, "Question"), row.question));
  card.append(el("p", { class: "answer" }, el("span", { class: "label" }, "Answer"), row.answer));
  if (row.correction) card.append(el("p", { class: "correction" }, el("span", { class: "label" }, "Correction"), row.correction));
  if (row.tool_call) {  // an agent's step corrected: it trains as this call
    const call = row.tool_call;
    card.append(el("p", { class: "correction tool-call" }, el("span", { class: "label" }, `Corrected call (step ${call.step})`),
      el("code", {}, `${call.name}(${JSON.stringify(call.arguments)})`)));
  }
  if (row.comment) card.append(el("p", { class: "comment" }, el("span", { class: "label" }, "Comment"), row.comment));
  if (row.used_in.length) card.append(el("p", { class: "hint" }, "Trained into " + row.used_in.join(", ")));
  const edit = el("textarea", { class: "edit", rows: "2", placeholder: "The answer it should teach (optional)" });
  edit.value = row.correction || "";
  if (row.rating === "down" || row.correction) {
    card.append(el("label", { class: "label" }, "Correction to approve", edit));
  }
  card.append(el("div", { class: "actions" },
    el("button", { type: "button", class: "approve", onclick: () => {
      const text = edit.value.trim();  // an edited (or newly written) correction goes with the approval
      review(row.id, "approved", text && text !== (row.correction || "") ? text : null);
    } }, "Approve"),
    el("button", { type: "button", class: "reject danger", onclick: () => review(row.id, "rejected") }, "Reject")));
  return card;
}

async function load() {
  const rows = await api("GET", `/console/api/feedback?status=${$("filter").value}`);
  $("queue").replaceChildren(...(rows.data.length ? rows.data.map(item)
    : [el("p", { class: "card" }, "Nothing to review.")]));
}

async function review(id, decision, correction = null) {
  try {
    await api("POST", "/console/api/feedback/review", correction ? { ids: [id], decision, correction }
      : { ids: [id], decision });
    status(`Feedback #${id} ${decision}.`);
  } catch (error) { status(error.message, true); }
  await load().catch((e) => status(e.message, true));
}

$("filter").addEventListener("change", () => load().catch((e) => status(e.message, true)));
$("retrain").addEventListener("click", async () => {
  $("retrain").disabled = true;
  try {
    const versions = await api("GET", "/console/api/versions");
    const job = await api("POST", "/v1/fine_tuning/jobs", { model: versions.active, training_file: null,
      forja: { source: "feedback" } });
    $("retrain-result").replaceChildren(`Retraining ${versions.active} from feedback: `,
      el("a", { href: `/console/training#${encodeURIComponent(job.id)}` }, job.id));
  } catch (error) { status(error.message, true); }
  $("retrain").disabled = false;
});

load().catch((e) => status(e.message, true)).finally(() => { document.body.dataset.loaded = "true"; });
