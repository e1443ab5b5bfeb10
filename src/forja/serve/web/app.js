// The chat page: keeps the conversation, streams answers from /v1/chat/completions (server-sent
// events), persona selector, stop button, and under each answer thumbs up/down and an "improve this
// answer" box that send feedback to /v1/feedback; a persona with knowledge lists the sources under its
// answer, each opening the quoted passage on click. Its words are the operator's (serve.page), in
// Spanish or English, from the JSON block the server renders into index.html (routes/page.py). Text from
// the operator, the user, the documents or the model is only ever set with textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };
const config = JSON.parse($("page-config").textContent);
const browserLanguage = ((navigator.languages && navigator.languages[0]) || navigator.language || "").toLowerCase();
const language = config.language !== "auto" ? config.language : browserLanguage.startsWith("es") ? "es" : "en";
const texts = config.texts[language];

// A text in the page's language with its {placeholders} filled in (plain text: it is set with textContent).
function t(key, values) {
  let text = texts[key] !== undefined ? texts[key] : key;
  for (const [name, value] of Object.entries(values || {})) text = text.split("{" + name + "}").join(String(value));
  return text;
}

// The selected persona's own title or welcome (Persona.page), else the page's.
function pageText(key) {
  const own = config.personas[$("persona").value] || {};
  return own[key] || t(key);
}

function showTitle() {
  $("title").textContent = pageText("title");
  document.title = pageText("title");
}

function showTexts() {
  document.documentElement.lang = language;
  showTitle();
  $("assistant-label").textContent = t("assistant_label");
  $("persona").setAttribute("aria-label", t("assistant_label"));
  $("reset").textContent = t("new_chat");
  $("reset").title = t("new_chat_title");
  $("ai-notice").textContent = t("ai_notice");
  $("ai-notice").hidden = !t("ai_notice");
  $("prompt").placeholder = t("placeholder");
  $("prompt").setAttribute("aria-label", t("message_label"));
  $("send").textContent = t("send");
  $("stop").textContent = t("stop");
  $("key-summary").textContent = t("key_summary");
  $("past-summary").textContent = t("past_summary");
  $("api-key").placeholder = t("key_placeholder");
  if (config.logo) {
    const logo = $("logo");
    logo.addEventListener("error", () => { logo.hidden = true; });
    logo.src = config.logo;
    logo.hidden = false;
  }
}

// A console user signed in on this server (GET /console/api/me): without a key typed, the page asks with
// their session, which acts only with its CSRF token.
let session = null;

async function loadSession() {
  try {
    const response = await fetch("/console/api/me", { credentials: "same-origin" });
    session = response.ok ? await response.json() : null;
  } catch (_) { session = null; }
  const link = $("sign-in");
  link.textContent = session ? t("signed_in_as", { name: session.name }) : t("sign_in");
  link.href = session ? "/console" : "/console/login?next=/";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("forja-api-key") || "";
  if (key) h.Authorization = "Bearer " + key;
  else if (session) h["X-CSRF-Token"] = session.csrf;
  return h;
}

// The conversation scrolls, not the page: the newest message is brought into view above the input box.
function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function atEnd() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").append(div);
  scrollToEnd();
  return div;
}

function setStatus(text) { $("status").textContent = text || ""; }

async function errorText(response) {
  let message;
  try {
    const body = await response.json();
    message = body.error ? body.error.message : response.statusText;
  } catch (_) { message = response.status + " " + response.statusText; }
  if (response.status === 401) {
    $("key-box").open = true;
    return t("key_needed") + " (" + message + ")";
  }
  return message;
}

// What a failed fetch or stream says: the server's error, or that the server could not be reached.
function failure(err) {
  return err instanceof TypeError ? t("offline") : String(err.message || err);
}

// The selector lists what /v1/models shows this caller: the personas and the active model (an admin key
// also sees the base model, the trained versions and the loaded engines).
function optionText(model, admin) {
  const name = model.id.split("/").pop();
  if (model.kind === "active") return admin ? t("default_assistant") + " (" + name + ")" : t("default_assistant");
  if (model.kind === "base") return t("base_model", { name });
  if (model.kind === "version") return model.id + " — " + t("trained_version");
  if (model.kind === "loaded") return name + " (" + t("loaded_model") + ")";
  const label = (config.personas[model.id] || {}).title || model.id;
  return model.description ? label + " — " + model.description : label;
}

async function loadPersonas() {
  let models;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { setStatus(await errorText(response)); return; }
    models = (await response.json()).data.filter((m) => m.kind !== "embedding"); // it makes vectors, not answers
  } catch (err) { setStatus(failure(err)); return; }
  const admin = models.some((m) => ["base", "version", "loaded"].includes(m.kind));
  const select = $("persona");
  select.replaceChildren();
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = optionText(model, admin);
    option.title = model.id;
    option.dataset.kind = model.kind;
    select.append(option);
  }
  const saved = localStorage.getItem("forja-persona");
  if (saved && [...select.options].some((o) => o.value === saved)) select.value = saved;
  setStatus("");
  showTitle();
  if (!state.history.length && !state.controller) reset(); // the selected persona's welcome
}

// ------------------------------------------------------------------ past conversations
// Each conversation is kept on the server (/v1/conversations) after every answer, with the turns as this page
// has them (a corrected answer included). The browser remembers which are its own (their ids), so visitors
// of an open server, or customers sharing the shop's key, never see each other's.
const PAST_KEY = "forja-conversations", PAST_KEPT = 50;

function pastIds() {
  try { return JSON.parse(localStorage.getItem(PAST_KEY) || "[]"); } catch (_) { return []; }
}

function rememberPast(ids) { localStorage.setItem(PAST_KEY, JSON.stringify(ids.slice(0, PAST_KEPT))); }

// One save at a time: an answer and its correction right after it must not make two conversations.
function keepConversation() {
  state.keeping = (state.keeping || Promise.resolve()).then(keepOnce);
  return state.keeping;
}

async function keepOnce() {
  if (!state.history.length || state.noStore) return;
  const path = state.conversation ? "/v1/conversations/" + encodeURIComponent(state.conversation) : "/v1/conversations";
  try {
    const response = await fetch(path, { method: "POST", headers: headers(),
                                         body: JSON.stringify({ messages: state.history }) });
    if (response.status === 409) { state.noStore = true; return; } // a server without a database keeps none
    if (response.status === 404) { state.conversation = null; return keepOnce(); } // deleted meanwhile
    if (!response.ok) return;
    const kept = await response.json();
    state.conversation = kept.id;
    rememberPast([kept.id, ...pastIds().filter((id) => id !== kept.id)]);
    if ($("past-box").open) showPast();
  } catch (_) { /* kept at the next answer */ }
}

async function showPast() {
  const list = $("past");
  const found = [];
  for (const id of pastIds()) {
    try {
      const response = await fetch("/v1/conversations/" + encodeURIComponent(id), { headers: headers() });
      if (response.ok) found.push(await response.json());
      else if (response.status === 404) rememberPast(pastIds().filter((x) => x !== id)); // deleted elsewhere
    } catch (_) { /* shown next time */ }
  }
  list.replaceChildren();
  if (!found.length) {
    const empty = document.createElement("li");
    empty.textContent = t("past_none");
    list.append(empty);
  }
  for (const c of found) {
    const item = document.createElement("li");
    item.dataset.conversation = c.id;
    const title = c.forja.title || t("past_untitled");
    const open = button(title, title, () => continueConversation(c));
    open.className = "open";
    if (c.id === state.conversation) open.setAttribute("aria-current", "true");
    const turns = document.createElement("span");
    turns.className = "turns";
    turns.textContent = t("past_turns", { turns: c.forja.turns });
    const rename = button("✎", t("past_rename"), () => renameConversation(c));
    rename.className = "rename";
    const remove = button("×", t("past_delete"), () => deleteConversation(c));
    remove.className = "delete";
    item.append(open, turns, rename, remove);
    list.append(item);
  }
}

function continueConversation(c) {
  reset();
  state.conversation = c.id;
  state.history = c.forja.messages.filter((m) => m.role === "user" || m.role === "assistant")
    .map((m) => ({ role: m.role, content: m.content }));
  for (const m of state.history) addMessage(m.role, m.content);
  setStatus(t("past_continued", { title: c.forja.title || t("past_untitled") }));
  showPast();
  $("prompt").focus();
}

async function renameConversation(c) {
  const title = (prompt(t("past_rename_prompt"), c.forja.title || "") || "").trim();
  if (!title) return;
  const response = await fetch("/v1/conversations/" + encodeURIComponent(c.id), { method: "POST", headers: headers(),
                                                                                 body: JSON.stringify({ title }) });
  if (!response.ok) setStatus(await errorText(response));
  showPast();
}

async function deleteConversation(c) {
  const response = await fetch("/v1/conversations/" + encodeURIComponent(c.id), { method: "DELETE", headers: headers() });
  if (!response.ok && response.status !== 404) { setStatus(await errorText(response)); return; }
  rememberPast(pastIds().filter((id) => id !== c.id));
  if (state.conversation === c.id) reset();
  showPast();
}

function reset(note) {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.conversation = null;
  $("messages").replaceChildren();
  if (note) addMessage("note", note);
  const welcome = pageText("welcome");
  if (welcome) addMessage("welcome", welcome); // shown, never sent to the model
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

// POST /v1/feedback for the answer `id`; throws the server's message when it is refused.
async function sendFeedback(id, body) {
  const response = await fetch("/v1/feedback", { method: "POST", headers: headers(),
                                                 body: JSON.stringify({ id, ...body }) });
  if (!response.ok) throw new Error(await errorText(response));
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
  area.placeholder = t("correction_placeholder");
  area.setAttribute("aria-label", t("correction_label"));
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = t("send_correction");
  box.append(area, send);

  async function post(body, done) {
    try {
      await sendFeedback(id, body);
      note.textContent = done;
      bar.classList.add("sent");
      return true;
    } catch (err) {
      note.textContent = t("feedback_failed", { error: failure(err) });
      return false;
    }
  }
  const up = button(t("good"), t("good_title"), () => post({ rating: "up" }, t("thanks")));
  const down = button(t("bad"), t("bad_title"), () => { post({ rating: "down" }, t("thanks_bad")); box.hidden = false; });
  const improve = button(t("improve"), t("improve"), () => { box.hidden = !box.hidden; if (!box.hidden) area.focus(); });
  box.addEventListener("submit", async (event) => {
    event.preventDefault();
    const correction = area.value.trim();
    if (!correction) { area.focus(); return; }
    if (await post({ rating: "down", correction }, t("correction_saved"))) {
      box.hidden = true;
      if (state.history[turn]) state.history[turn].content = correction; // the conversation goes on from it
      keepConversation();
    }
  });
  bar.append(up, down, improve, note);
  bubble.after(bar, box);
}

function where(cite) {
  const parts = [cite.filename];
  if (cite.page !== null && cite.page !== undefined) parts.push(t("page", { page: cite.page }));
  if (cite.headings && cite.headings.length) parts.push(cite.headings.join(" › "));
  return parts.join(", ");
}

function sourcesList(annotations) {
  const box = document.createElement("div");
  box.className = "sources";
  const title = document.createElement("span");
  title.className = "sources-title";
  title.textContent = t("sources");
  box.append(title);
  for (const note of annotations) {
    const cite = note.file_citation;
    const item = document.createElement("details");
    item.className = "source" + (cite.cited ? " cited" : "");
    const summary = document.createElement("summary");
    summary.textContent = "[" + cite.index + "] " + where(cite);
    summary.title = cite.cited ? t("source_cited") : t("source_given");
    const quote = document.createElement("blockquote");
    quote.textContent = cite.quote;
    item.append(summary, quote);
    box.append(item);
  }
  return box;
}

// One step of an agent persona's tool loop, folded above its answer: the tool, its arguments, its result.
function stepBox(step) {
  const item = document.createElement("details");
  item.className = "step" + (step.ok ? "" : " failed");
  const summary = document.createElement("summary");
  summary.textContent = t("tool_step", { step: step.step, tool: step.tool }) + (step.ok ? "" : " " + t("tool_failed"));
  const call = document.createElement("code");
  call.textContent = JSON.stringify(step.arguments);
  const result = document.createElement("pre");
  result.textContent = step.result;
  item.append(summary, call, result);
  item.step = step;
  return item;
}

// Under a step of a stored answer `id`: a box to correct the call's arguments (it trains as the call it should
// have been).
function callCorrection(item, id) {
  const step = item.step;
  const call = item.querySelector("code");
  const box = document.createElement("form");
  box.className = "call-correction";
  box.hidden = true;
  const area = document.createElement("textarea");
  area.rows = 3;
  area.value = JSON.stringify(step.arguments, null, 1);
  area.setAttribute("aria-label", t("call_label"));
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = t("send_call");
  const note = document.createElement("span");
  note.className = "feedback-note";
  box.append(area, send, note);
  const open = button(t("correct_call"), t("correct_call"), () => { box.hidden = !box.hidden; if (!box.hidden) area.focus(); });
  open.className = "correct-call";
  box.addEventListener("submit", async (event) => {
    event.preventDefault();
    let args;
    try {
      args = JSON.parse(area.value);
    } catch (err) {
      note.textContent = t("call_not_json", { error: err.message });
      return;
    }
    try {
      await sendFeedback(id, { tool_call: { step: step.step, arguments: args } });
      note.textContent = t("call_saved");
      const fixed = document.createElement("code");  // next to the call as it was made (its result is above)
      fixed.className = "corrected";
      fixed.textContent = "→ " + JSON.stringify(args);
      call.after(fixed);
      box.classList.add("sent");
    } catch (err) {
      note.textContent = t("feedback_failed", { error: failure(err) });
    }
  });
  item.append(open, box);
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
  const steps = [];
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
        if (chunk.forja && chunk.forja.step) { // an agent's tool step
          const item = stepBox(chunk.forja.step);
          steps.push(item);
          bubble.before(item);
        }
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            const follow = atEnd(); // unless the reader scrolled up to read something earlier
            bubble.textContent = answer;
            if (follow) scrollToEnd();
          }
          if (choice.delta && choice.delta.annotations) annotations = choice.delta.annotations;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else setStatus(failure(err));
  } finally {
    const follow = atEnd();
    bubble.classList.remove("streaming");
    if (!answer && finish !== "stopped") bubble.classList.add("empty");
    if (answer) {
      state.history.push({ role: "assistant", content: answer });
      keepConversation();
    }
    if (answer && responseId && finish !== "stopped") {
      feedbackBar(bubble, responseId, state.history.length - 1);
      for (const item of steps) callCorrection(item, responseId); // once the answer (and its steps) is stored
    }
    if (annotations.length) bubble.after(sourcesList(annotations)); // between the answer and its feedback bar
    if (["stopped", "length", "content_filter"].includes(finish)) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = t(finish, { bad: t("bad") });
      bubble.append(meta);
    }
    if (follow) scrollToEnd(); // the whole answer, its sources and its rating buttons
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
  const select = $("persona");
  const option = select.selectedOptions[0];
  localStorage.setItem("forja-persona", select.value);
  showTitle();
  const own = config.personas[select.value] || {};
  reset(t("new_conversation", { name: own.title || (option.dataset.kind === "persona" ? select.value : option.textContent) }));
});
$("api-key").value = localStorage.getItem("forja-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("forja-api-key", $("api-key").value.trim());
  loadPersonas();
});
showTexts();
reset();
loadSession().finally(loadPersonas);
$("past-box").addEventListener("toggle", () => { if ($("past-box").open) showPast(); });
