// The chat page: keeps the conversation, streams answers from /v1/chat/completions (server-sent
// events), persona selector and stop button. Text from the user or the model is only ever set with
// textContent, never innerHTML.
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
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = model.kind === "base" ? model.id.split("/").pop() + " (plain model)"
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
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            bubble.textContent = answer;
            bubble.scrollIntoView({ block: "end" });
          }
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
    if (finish === "stopped" || finish === "length") {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = finish === "stopped" ? "(stopped)" : "(cut at the length limit)";
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
