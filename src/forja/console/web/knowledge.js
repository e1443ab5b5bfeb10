// The knowledge page: the collections (GET /console/api/knowledge); create one (POST /v1/vector_stores), add a
// document (POST /v1/files purpose assistants, then POST /v1/vector_stores/ID/files, indexed in the background),
// remove a file or the collection, index it again (POST /console/api/knowledge/NAME/reindex) and try a search
// (POST /v1/vector_stores/ID/search).
"use strict";

const POLL_MS = 700;
let collections = [], chosen = null;

function statusBadge(file) {
  return el("span", { class: "badge " + (file.status === "completed" ? "passed" : file.status === "failed" ? "failed" : "") },
    file.status);
}

function showCollection() {
  const c = collections.find((x) => x.name === chosen);
  $("collection").hidden = !c;
  if (!c) return;
  $("collection-name").textContent = c.name;
  $("files").tBodies[0].replaceChildren(...c.files.map((f) => el("tr", { "data-file": f.id },
    el("td", { class: "filename" }, f.filename),
    el("td", {}, statusBadge(f), f.error ? el("span", { class: "hint" }, " " + f.error) : null),
    el("td", {}, `${(f.bytes / 1024).toFixed(1)} KiB`),
    el("td", {}, el("button", { type: "button", class: "detach", onclick: () => detach(c, f) }, "Remove")))));
  if (!c.files.length) $("files").tBodies[0].append(el("tr", {}, el("td", { colspan: 4 }, "No documents yet.")));
}

async function load() {
  collections = (await api("GET", "/console/api/knowledge")).data;
  if (chosen === null && collections.length) chosen = collections[0].name;
  $("collections").tBodies[0].replaceChildren(...collections.map((c) => el("tr", { "data-collection": c.name,
    class: c.name === chosen ? "chosen" : null },
    el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); chosen = c.name; load().catch(fail); } }, c.name)),
    el("td", {}, String(c.files.length)), el("td", {}, String(c.chunks)), el("td", {}, String(c.tokens)),
    el("td", {}, when(c.indexed_at)))));
  if (!collections.length) {
    $("collections").tBodies[0].append(el("tr", {}, el("td", { colspan: 5 }, "No collection yet: create one.")));
  }
  showCollection();
  return collections;
}

function fail(error) { showError($("collection-error"), error); }

const storeId = (name) => encodeURIComponent("vs_" + name);

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError($("create-error"), null);
  try {
    const made = await api("POST", "/v1/vector_stores", { name: $("create-name").value.trim() });
    chosen = made.name;
    $("create-name").value = "";
    await load();
  } catch (error) { showError($("create-error"), error); }
});

$("add").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = chosen, file = $("add-file").files[0];
  showError($("collection-error"), null);
  $("add-send").disabled = true;
  try {
    const form = new FormData();
    form.append("purpose", "assistants");
    form.append("file", file);
    const uploaded = await api("POST", "/v1/files", form);
    let attached = await api("POST", `/v1/vector_stores/${storeId(name)}/files`, { file_id: uploaded.id });
    await load();
    while (attached.status === "in_progress") {
      await new Promise((done) => setTimeout(done, POLL_MS));
      attached = await api("GET", `/v1/vector_stores/${storeId(name)}/files/${encodeURIComponent(uploaded.id)}`);
    }
    if (attached.status === "failed") throw new Error(attached.last_error ? attached.last_error.message : "indexing failed");
    status(`${file.name} is indexed in ${name}.`);
    $("add-file").value = "";
  } catch (error) { fail(error); } finally {
    $("add-send").disabled = false;
    await load().catch(fail);
  }
});

async function detach(c, f) {
  try {
    await api("DELETE", `/v1/vector_stores/${storeId(c.name)}/files/${encodeURIComponent(f.id)}`);
    status(`${f.filename} removed from ${c.name}.`);
  } catch (error) { fail(error); }
  await load().catch(fail);
}

$("reindex").addEventListener("click", async () => {
  showError($("collection-error"), null);
  $("reindex").disabled = true;
  try {
    const result = await api("POST", `/console/api/knowledge/${encodeURIComponent(chosen)}/reindex`);
    $("reindexed").replaceChildren(...result.files.map((f) => el("li", {}, `${f.filename}: ${f.status}` +
      (f.chunks ? ` (${f.chunks} chunks)` : "") + (f.note ? ` — ${f.note}` : ""))));
    status(`${result.name} indexed again.`);
  } catch (error) { fail(error); } finally { $("reindex").disabled = false; }
  await load().catch(fail);
});

$("delete-collection").addEventListener("click", async () => {
  if (!confirm(`Delete the collection ${chosen} and its index?`)) return;
  try {
    await api("DELETE", `/v1/vector_stores/${storeId(chosen)}`);
    status(`${chosen} deleted.`);
    chosen = null;
  } catch (error) { fail(error); }
  await load().catch(fail);
});

$("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError($("collection-error"), null);
  try {
    const page = await api("POST", `/v1/vector_stores/${storeId(chosen)}/search`,
      { query: $("search-query").value, max_num_results: 5 });
    $("hits").replaceChildren(...page.data.map((hit) => el("li", { class: "hit" },
      el("p", { class: "label" }, `${hit.filename} · score ${hit.score.toFixed(2)}`),
      el("p", {}, hit.content.map((c) => c.text).join("\n")))));
    if (!page.data.length) $("hits").append(el("li", {}, "Nothing found."));
  } catch (error) { fail(error); }
});

load().catch(fail).finally(() => { document.body.dataset.loaded = "true"; });
