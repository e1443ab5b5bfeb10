// The keys and usage page: create an API key (POST /admin/keys, the key shown once), list and revoke them
// (GET, DELETE /admin/keys), usage per key and day (GET /admin/usage), and the console's own users.
"use strict";

function limitsText(limits) {
  if (!limits) return "none";
  const parts = [];
  if (limits.requests_per_minute) parts.push(`${limits.requests_per_minute}/min`);
  if (limits.tokens_per_day) parts.push(`${limits.tokens_per_day.toLocaleString()} tokens/day`);
  return parts.join(", ") || "none";
}

async function loadKeys() {
  try {
    const keys = await api("GET", "/admin/keys");
    $("keys").tBodies[0].replaceChildren(...keys.data.map((k) => el("tr", { "data-key": k.id },
      el("td", {}, k.name), el("td", {}, k.admin ? "admin" : k.scopes.join(", ")), el("td", {}, limitsText(k.limits)),
      el("td", {}, when(k.created_at)), el("td", {}, when(k.last_used_at)), el("td", {}, k.source),
      el("td", {}, k.source === "database"
        ? el("button", { type: "button", class: "danger revoke", onclick: () => revoke(k) }, "Revoke")
        : "in the config file"))));
  } catch (error) {
    $("keys").tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: "7", class: "error" }, error.message)));
  }
}

async function revoke(key) {
  if (!confirm(`Revoke the key ${key.name}? Calls with it are refused from now on.`)) return;
  try {
    await api("DELETE", `/admin/keys/${encodeURIComponent(key.id)}`);
    status(`Revoked ${key.name}.`);
  } catch (error) { status(error.message, true); }
  await loadKeys();
}

async function loadUsage() {
  try {
    const usage = await api("GET", `/admin/usage?days=${$("usage-days").value}`);
    $("usage-price").textContent = usage.price_per_1k_tokens != null
      ? `Estimated at ${usage.price_per_1k_tokens} per 1k tokens.` : "";
    $("usage").tBodies[0].replaceChildren(...usage.data.map((u) => el("tr", {},
      el("td", {}, u.key), el("td", {}, u.day), el("td", {}, String(u.requests)),
      el("td", {}, u.prompt_tokens.toLocaleString()), el("td", {}, u.completion_tokens.toLocaleString()),
      el("td", {}, u.estimated_cost == null ? "–" : (+u.estimated_cost).toFixed(4)))));
  } catch (error) {
    $("usage").tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "error" }, error.message)));
  }
}

async function loadUsers() {
  try {
    const users = await api("GET", "/console/api/users");
    $("users").tBodies[0].replaceChildren(...users.data.map((u) => el("tr", {},
      el("td", {}, u.name), el("td", {}, u.admin ? "yes" : "no"), el("td", {}, when(u.created_at)),
      el("td", {}, when(u.last_login_at)),
      el("td", {}, u.name === document.body.dataset.user ? "you"
        : el("button", { type: "button", class: "danger", onclick: () => removeUser(u.name) }, "Remove")))));
  } catch (error) {
    $("users").tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "error" }, error.message)));
  }
}

async function removeUser(name) {
  if (!confirm(`Remove the console user ${name}? Their sessions end now.`)) return;
  try { await api("DELETE", `/console/api/users/${encodeURIComponent(name)}`); status(`Removed ${name}.`); }
  catch (error) { status(error.message, true); }
  await loadUsers();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const scopes = ["scope-chat", "scope-train"].filter((id) => $(id).checked).map((id) => $(id).value);
  const body = { name: $("key-name").value.trim(), scopes, admin: $("key-admin").checked,
    limits: { requests_per_minute: $("key-rpm").value ? +$("key-rpm").value : null,
              tokens_per_day: $("key-tpd").value ? +$("key-tpd").value : null } };
  try {
    const key = await api("POST", "/admin/keys", body);
    $("new-key").hidden = false;
    $("new-key-value").textContent = key.key;
    status(`Created the key ${key.name} (${key.id}).`);
    $("key-form").reset();
  } catch (error) { status(error.message, true); }
  await loadKeys();
});

$("user-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const user = await api("POST", "/console/api/users", { name: $("new-user-name").value.trim(),
      password: $("new-user-password").value, admin: $("new-user-admin").checked });
    status(`Added the console user ${user.name}.`);
    $("user-form").reset();
  } catch (error) { status(error.message, true); }
  await loadUsers();
});

$("usage-days").addEventListener("change", loadUsage);
Promise.all([loadKeys(), loadUsage(), loadUsers()]).finally(() => { document.body.dataset.loaded = "true"; });
