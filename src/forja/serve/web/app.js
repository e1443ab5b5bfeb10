// The chat page: keeps the conversation, streams answers from /v1/chat/completions (server-sent
// events), persona selector, stop button, and under each answer thumbs up/down and an "improve this
// answer" box that send feedback to /v1/feedback; a persona with knowledge lists the sources under its
// answer, each opening the quoted passage on click. Text from the user, the documents or the model is
// only ever set with textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("forja-api-key") || "";
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setStatus(text) { $("status").textContent = text || ""; }

async function errorText(response) {
  try {
    const body = await response.json();
    if (response.status === 401) $("key-box").open = true;
    return body.error ? body.error.message : response.statusText;
  } catch (_) { return response.status + " " + response.statusText; }
}

async function loadPersonas() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { setStatus(await errorText(response)); return; }
  const select = $("persona");
  select.replaceChildren();
  for (const model of (await response.json()).data) {
    if (model.kind === "embedding") continue; // it makes vectors, not answers
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = model.kind === "active" ? model.id.split("/").pop() + " (active model)"
      : model.kind === "base" ? model.id.split("/").pop() + " (plain model)"
      : model.description ? model.id + " — " + model.description : model.id;
    option.dataset.kind = model.kind;
    select.append(option);
  }
  const saved = localStorage.getItem("forja-persona");
  if (saved && [...select.options].some((o) => o.value === saved)) select.value = saved;
}

function reset(note) {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  if (note) addMessage("note", note);
  setStatus("");
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

// Thumbs up/down and a correction box under an answer; `turn` is the answer's place in the history.
function feedbackBar(bubble, id, turn) {
  const bar = document.createElement("div");
  bar.className = "feedback";
  const note = document.createElement("span");
  note.className = "feedback-note";
  const box = document.createElement("form");
  box.className = "improve";
  box.hidden = true;
  const area = document.createElement("textarea");
  area.rows = 3;
  area.placeholder = "What should the answer have been?";
  area.setAttribute("aria-label", "Corrected answer");
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = "Send correction";
  box.append(area, send);

  async function post(body, done) {
    try {
      const response = await fetch("/v1/feedback", { method: "POST", headers: headers(),
                                                     body: JSON.stringify({ id, ...body }) });
      if (!response.ok) throw new Error(await errorText(response));
      note.textContent = done;
      bar.classList.add("sent");
      return true;
    } catch (err) {
      note.textContent = "Feedback not sent: " + String(err.message || err);
      return false;
    }
  }
  const up = button("✓ Good", "Good answer", () => post({ rating: "up" }, "Thanks!"));
  const down = button("✗ Bad", "Bad answer", () => { post({ rating: "down" }, "Thanks — you can also correct it."); box.hidden = false; });
  const improve = button("Improve this answer", "Improve this answer", () => { box.hidden = !box.hidden; if (!box.hidden) area.focus(); });
  box.addEventListener("submit", async (event) => {
    event.preventDefault();
    const correction = area.value.trim();
    if (!correction) { area.focus(); return; }
    if (await post({ rating: "down", correction }, "Correction saved — the next version learns from it.")) {
      box.hidden = true;
      if (state.history[turn]) state.history[turn].content = correction; // the conversation goes on from it
    }
  });
  bar.append(up, down, improve, note);
  bubble.after(bar, box);
}

function where(cite) {
  const parts = [cite.filename];
  if (cite.page !== null && cite.page !== undefined) parts.push("p. " + cite.page);
  if (cite.headings && cite.headings.length) parts.push(cite.headings.join(" › "));
  return parts.join(", ");
}

function sourcesList(annotations) {
  const box = document.createElement("div");
  box.className = "sources";
  const title = document.createElement("span");
  title.className = "sources-title";
  title.textContent = "Sources";
  box.append(title);
  for (const note of annotations) {
    const cite = note.file_citation;
    const item = document.createElement("details");
    item.className = "source" + (cite.cited ? " cited" : "");
    const summary = document.createElement("summary");
    summary.textContent = "[" + cite.index + "] " + where(cite);
    summary.title = cite.cited ? "cited in the answer" : "given to the model";
    const quote = document.createElement("blockquote");
    quote.textContent = cite.quote;
    item.append(summary, quote);
    box.append(item);
  }
  return box;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function ask(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant streaming", "");
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  setStatus("");
  let answer = "";
  let finish = null;
  let responseId = null;
  let annotations = [];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("persona").value, messages: state.history, stream: true,
                             stream_options: { include_usage: true } }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder(); // stream mode keeps a character split across reads whole
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.id) responseId = chunk.id;
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            bubble.textContent = answer;
            bubble.scrollIntoView({ block: "end" });
          }
          if (choice.delta && choice.delta.annotations) annotations = choice.delta.annotations;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else setStatus(String(err.message || err));
  } finally {
    bubble.classList.remove("streaming");
    if (!answer && finish !== "stopped") bubble.classList.add("empty");
    if (answer) state.history.push({ role: "assistant", content: answer });
    if (answer && responseId && finish !== "stopped") feedbackBar(bubble, responseId, state.history.length - 1);
    if (annotations.length) bubble.after(sourcesList(annotations)); // between the answer and its feedback bar
    const notes = { stopped: "(stopped)", length: "(cut at the length limit)",
                    content_filter: "(refused by the guardrails; rate it ✗ Bad if it should have answered)" };
    if (notes[finish]) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = notes[finish];
      bubble.append(meta);
    }
    if (state.controller === controller) state.controller = null;
    busy(false);
    $("prompt").focus();
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  ask(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("reset").addEventListener("click", () => reset());
$("persona").addEventListener("change", () => {
  localStorage.setItem("forja-persona", $("persona").value);
  reset("New conversation with " + $("persona").value);
});
$("api-key").value = localStorage.getItem("forja-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("forja-api-key", $("api-key").value.trim());
  loadPersonas();
});
loadPersonas();
