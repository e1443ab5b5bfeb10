// The training page: start a job (POST /v1/fine_tuning/jobs), follow one through its events (server-sent,
// ?stream=true) with its loss chart, tokens/s and ETA, cancel it, list the jobs.
"use strict";

const FINAL = ["succeeded", "failed", "cancelled"];
let watched = null, stream = null, lastEvent = null, train = [], valid = [], pollTimer = null;

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  return s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
}

async function loadChoices() {
  const [files, versions] = await Promise.all([api("GET", "/v1/files?purpose=fine-tune&order=desc"),
    api("GET", "/console/api/versions")]);
  $("job-file").replaceChildren(...files.data.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id})`)));
  const names = [versions.active, ...versions.data.map((v) => v.name)];
  $("models").replaceChildren(...[...new Set(names)].map((n) => el("option", { value: n })));
  if (!$("job-model").value) $("job-model").value = versions.active;
}

function jobRow(job) {
  return el("tr", { "data-job": job.id },
    el("td", {}, job.id), el("td", {}, el("span", { class: "badge " + job.status }, job.status)),
    el("td", {}, job.model), el("td", {}, job.fine_tuned_model || "–"), el("td", {}, when(job.created_at)),
    el("td", {}, el("button", { type: "button", class: "secondary", onclick: () => watch(job.id).catch((e) => status(e.message, true)) }, "Watch")));
}

async function listJobs() {
  const jobs = await api("GET", "/v1/fine_tuning/jobs?limit=50");
  $("jobs").tBodies[0].replaceChildren(...jobs.data.map(jobRow));
  return jobs.data;
}

function showJob(job) {
  $("job-status").textContent = job.status + (job.error && job.error.message ? `: ${job.error.message}` : "");
  $("job-result").textContent = job.fine_tuned_model || "–";
  $("job-cancel").disabled = FINAL.includes(job.status);
  const progress = job.forja && job.forja.progress;
  if (progress) showProgress(progress);
}

function showProgress(data) {
  if (data.step !== undefined) $("job-step").textContent = data.total_steps ? `${data.step} / ${data.total_steps}` : String(data.step);
  if (data.train_loss !== undefined && data.train_loss !== null) $("job-loss").textContent = String(data.train_loss);
  if (data.tokens_per_second !== undefined) $("job-speed").textContent = String(data.tokens_per_second);
  if (data.eta_seconds !== undefined) $("job-eta").textContent = fmtSeconds(data.eta_seconds);
}

function addEvent(event) {
  lastEvent = event.id;
  const data = event.data || {};
  if (event.type === "metrics") {
    if (typeof data.train_loss === "number") train.push([data.step, data.train_loss]);
    if (typeof data.valid_loss === "number") valid.push([data.step, data.valid_loss]);
    showProgress(data);
    lineChart($("loss-chart"), [{ name: "training loss", points: train }, { name: "validation loss", cls: "valid", points: valid }], "step");
  }
  $("job-events").append(el("li", {}, `${when(event.created_at)} ${event.message}`));
  $("job-events").scrollTop = $("job-events").scrollHeight;
}

function follow(id) {
  if (stream) stream.close();
  const after = lastEvent ? `&after=${encodeURIComponent(lastEvent)}` : "";
  stream = new EventSource(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?stream=true${after}`);
  stream.onmessage = (message) => {
    if (message.data === "[DONE]") { stream.close(); stream = null; refreshJob().catch(() => {}); return; }
    addEvent(JSON.parse(message.data));
  };
  stream.onerror = () => {  // the server closed it or the network dropped: pick up after the last event
    if (stream) stream.close();
    stream = null;
    setTimeout(() => { if (watched === id) refreshJob(true).catch((e) => status(e.message, true)); }, 2000);
  };
}

async function refreshJob(resume) {
  if (!watched) return;
  const job = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(watched)}`);
  showJob(job);
  if (resume && !FINAL.includes(job.status) && !stream) follow(job.id);
  await listJobs();
}

async function watch(id) {
  watched = id; lastEvent = null; train = []; valid = [];
  history.replaceState(null, "", "#" + id);
  $("job").hidden = false;
  $("job-id").textContent = id;
  for (const f of ["job-step", "job-loss", "job-speed", "job-eta"]) $(f).textContent = "–";
  $("job-events").replaceChildren();
  lineChart($("loss-chart"), [{ name: "training loss", points: [] }], "step");
  const job = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
  showJob(job);
  follow(id);
  clearInterval(pollTimer);
  pollTimer = setInterval(() => { if (watched === id) refreshJob(false).catch(() => {}); }, 3000);
}

$("start").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError($("start-error"), null);
  let extra = {};
  try {
    const text = $("job-train").value.trim();
    extra = text ? JSON.parse(text) : {};
    if (typeof extra !== "object" || Array.isArray(extra) || extra === null) throw new Error("not an object");
  } catch (error) {
    showError($("start-error"), new Error(`More train settings: give a JSON object such as {"max_steps": 200} (${error.message})`));
    return;
  }
  const hyper = {};
  if ($("job-epochs").value) hyper.n_epochs = +$("job-epochs").value;
  if ($("job-lr").value) hyper.learning_rate_multiplier = +$("job-lr").value;
  const body = { model: $("job-model").value.trim(), training_file: $("job-file").value,
    forja: { train: { method: $("job-method").value, ...extra } } };
  if (Object.keys(hyper).length) body.hyperparameters = hyper;
  if ($("job-suffix").value.trim()) body.suffix = $("job-suffix").value.trim();
  $("job-start").disabled = true;
  try {
    const job = await api("POST", "/v1/fine_tuning/jobs", body);
    status(`Started ${job.id}; it makes ${job.forja.name}.`);
    await watch(job.id);
    await listJobs();
  } catch (error) {
    showError($("start-error"), error);
  } finally {
    $("job-start").disabled = false;
  }
});

$("job-cancel").addEventListener("click", async () => {
  try {
    const job = await api("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(watched)}/cancel`);
    showJob(job);
    status(`Cancelling ${job.id} …`);
  } catch (error) { status(error.message, true); }
});
$("jobs-refresh").addEventListener("click", () => listJobs().catch((e) => status(e.message, true)));

Promise.all([loadChoices(), listJobs()])
  .then(() => { if (location.hash.length > 1) return watch(decodeURIComponent(location.hash.slice(1))); })
  .catch((e) => status(e.message, true))
  .finally(() => { document.body.dataset.loaded = "true"; });
