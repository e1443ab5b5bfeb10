"""The operator's console: accounts and sessions (scrypt hashes, HttpOnly cookie, CSRF tokens, lockout), every
/console route closed without a session, a session as the credential of the API routes, stored text shown as
text; and in Chromium, an admin who uploads data, trains the tiny model, promotes it and reviews feedback.
Screenshots land in test-artifacts/ (git-ignored)."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
import sqlalchemy as sa
from conftest import ARTIFACTS
from typer.testing import CliRunner

from forja.cli import app as cli
from forja.config import load_settings
from forja.console import accounts, routes as console_routes
from forja.serve.app import create_app
from forja.store import Store, console_users

ADMIN_KEY = "root-admin-key-0123456789"
ROOT, ANA = ("root", "root-password-1"), ("ana", "ana-password-22")
XSS = "<img src=x onerror=alert(1)>"
FAST = {"jobs": {"poll_seconds": 0.2, "stale_seconds": 30, "cancel_seconds": 15}}
PAIRS = [("hola", "buenas"), ("¿horario?", "de 9 a 18"), ("¿dónde estáis?", "calle Mayor 3")]


def jsonl(pairs) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                              ensure_ascii=False) + "\n" for q, a in pairs).encode()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp("console-home"), model=str(tiny_model_dir),
                             dtype="float32", serve={"api_keys": [{"name": "ops", "key": ADMIN_KEY, "admin": True}]},
                             **FAST)
    app = create_app(settings)  # no --model: follows the registry, so promotion shows
    server = start_server(app)
    store = server.app.state.forja.store
    accounts.add_user(store, *ROOT)  # the first user: an admin
    accounts.add_user(store, *ANA)
    server.store, server.model = store, str(tiny_model_dir)
    return server


def login_csrf(client: httpx.Client) -> str:
    form = client.get("/console/login")
    assert form.status_code == 200
    return re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)


def sign_in(server, user=ROOT) -> tuple[httpx.Client, str]:
    """A client holding a session cookie, and the session's CSRF token (as the page's meta tag gives it)."""
    client = httpx.Client(base_url=server.url)
    response = client.post("/console/login", data={"name": user[0], "password": user[1], "csrf": login_csrf(client)})
    assert response.status_code == 303, response.text
    page = client.get("/console/data")
    assert page.status_code == 200
    return client, re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def seed_feedback(store: Store, tag: str) -> list[int]:
    ids = []
    for n, (question, answer, correction) in enumerate([
            (f"¿Quién fundó Forja? {tag}", "No sé.", f"{XSS} Ana Herrera."),
            (f"¿Abrís el domingo? {tag}", "Sí.", "No, el domingo cerramos.")]):
        store.log_exchange(id=f"chatcmpl-{tag}-{n}", route="chat", model="tiny", persona=XSS,
                           messages=[{"role": "user", "content": question}], answers=[answer], params={},
                           prompt_tokens=5, completion_tokens=3, latency_ms=10.0, finish_reason="stop",
                           api_key_name=None)
        ids.append(store.add_feedback(f"chatcmpl-{tag}-{n}", rating="down", correction=correction)["id"])
    return ids


def wait_until(page, script: str, timeout: float = 30_000) -> None:
    """page.wait_for_function without its eval, which the console's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout / 1000:.0f} s: {script}")
        time.sleep(0.1)


def test_passwords_are_stored_as_salted_scrypt_hashes(server):
    with server.store.engine.connect() as conn:
        stored = {r.name: r.password_hash for r in conn.execute(console_users.select())}
    assert stored["root"].startswith("scrypt$") and ROOT[1] not in stored["root"]
    assert accounts.verify_password(ROOT[1], stored["root"]) and not accounts.verify_password("wrong", stored["root"])
    assert accounts.hash_password("same") != accounts.hash_password("same")  # salted


def test_every_console_page_redirects_to_login_and_every_console_api_route_is_401_without_a_session(server):
    open_paths = {"/console/login", "/console/logout", "/console/static/{name}"}
    routes = [r for r in console_routes.router.routes if r.path not in open_paths]
    assert len(routes) >= 12
    anonymous = httpx.Client(base_url=server.url)
    for route in routes:
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in route.methods - {"HEAD"}:
            response = anonymous.request(method, path, json={})
            if route.path.startswith("/console/api/"):
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["code"] == "not_signed_in"
            else:
                assert response.status_code == 303, (method, path)
                assert response.headers["location"].startswith("/console/login")
    # a forged or stale cookie is no session either
    assert httpx.get(server.url + "/console/api/me", cookies={"forja_console": "made-up"}).status_code == 401


def test_login_gives_an_http_only_same_site_cookie_secure_over_https_and_logout_ends_it(server):
    client = httpx.Client(base_url=server.url)
    bad = client.post("/console/login", data={"name": "root", "password": "wrong", "csrf": login_csrf(client)})
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    csrf = login_csrf(client)
    response = client.post("/console/login", data={"name": ROOT[0], "password": ROOT[1], "csrf": csrf,
                                                   "next": "//evil.example/"})
    assert response.status_code == 303 and response.headers["location"] == "/console"  # never another site
    cookie = response.headers["set-cookie"].lower()
    assert "forja_console=" in cookie and "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    me = client.get("/console/api/me").json()
    assert (me["name"], me["admin"]) == ("root", True) and me["expires_at"] > time.time() + 3600
    page = client.get("/console/versions")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    assert me["csrf"] == token

    assert client.post("/console/logout", data={}).status_code == 403  # the form's CSRF token is missing
    assert client.get("/console/api/me").status_code == 200
    assert client.post("/console/logout", data={"csrf": token}).status_code == 303
    assert client.get("/console/api/me").status_code == 401
    kept = response.cookies.get("forja_console")
    assert httpx.get(server.url + "/console/api/me", cookies={"forja_console": kept}).status_code == 401

    # behind a proxy that ends TLS (uvicorn trusts X-Forwarded-Proto from 127.0.0.1) both cookies are Secure;
    # httpx keeps a Secure cookie off plain http, so the form's cookie is sent back by hand
    form = httpx.get(server.url + "/console/login", headers={"X-Forwarded-Proto": "https"})
    assert "secure" in form.headers["set-cookie"].lower()
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    response = httpx.post(server.url + "/console/login", data={"name": ROOT[0], "password": ROOT[1], "csrf": token},
                          headers={"X-Forwarded-Proto": "https",
                                   "Cookie": f"{console_routes.LOGIN_CSRF_COOKIE}={form.cookies[console_routes.LOGIN_CSRF_COOKIE]}"})
    assert response.status_code == 303 and "secure" in response.headers["set-cookie"].lower()


def test_the_login_form_without_its_csrf_token_is_refused(server):
    client = httpx.Client(base_url=server.url)
    login_csrf(client)
    response = client.post("/console/login", data={"name": ROOT[0], "password": ROOT[1]})
    assert response.status_code == 403 and "forja_console" not in response.headers.get("set-cookie", "")
    other = httpx.Client(base_url=server.url)  # a token from another browser's form
    response = other.post("/console/login", data={"name": ROOT[0], "password": ROOT[1], "csrf": login_csrf(client)})
    assert response.status_code == 403


def test_a_session_is_the_api_credential_and_changes_things_only_with_its_csrf_token(server):
    client, csrf = sign_in(server)
    ids = seed_feedback(server.store, "csrf")
    review = {"ids": ids[:1], "decision": "approved"}
    missing = client.post("/console/api/feedback/review", json=review)
    assert missing.status_code == 403 and missing.json()["error"]["code"] == "csrf_token_missing"
    wrong = client.post("/console/api/feedback/review", json=review, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "csrf_token_invalid"
    assert server.store.feedback_rows()[1]["review"] is None
    done = client.post("/console/api/feedback/review", json=review, headers={"X-CSRF-Token": csrf})
    assert done.json() == {"reviewed": 1, "decision": "approved"}

    # the API routes: reads with the cookie alone; a change with the cookie but no token is made by nobody
    assert client.get("/v1/files").status_code == 200
    assert client.get("/admin/models").json()["active"] == server.model
    files = {"file": ("faq.jsonl", jsonl(PAIRS), "application/jsonl")}
    assert client.post("/v1/files", data={"purpose": "fine-tune"}, files=files).status_code == 401
    assert client.post("/admin/models/rollback", headers={"X-CSRF-Token": "forged"}).status_code == 403
    uploaded = client.post("/v1/files", data={"purpose": "fine-tune"}, files=files, headers={"X-CSRF-Token": csrf})
    assert uploaded.status_code == 200, uploaded.text
    with server.store.engine.connect() as conn:  # the upload is the user's
        owner = conn.execute(sa.text("select api_key_name from files where id = :i"), {"i": uploaded.json()["id"]})
        assert owner.scalar_one() == "console:root"
    # a bearer key needs no CSRF token
    bearer = httpx.post(server.url + "/v1/files", data={"purpose": "fine-tune"}, files=files,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert bearer.status_code == 200

    report = client.get(f"/console/api/files/{uploaded.json()['id']}/report").json()
    assert report["filename"] == "faq.jsonl" and report["files"][0]["rows"] == 3
    assert report["files"][0]["kind"] == "dialogue" and sum(b["rows"] for b in report["histogram"]) == 3
    assert report["prepared"]["train_rows"] == 3 and len(report["preview"]) == 3
    assert report["preview"][0]["messages"][0]["role"] == "user" and report["preview"][0]["source"].startswith("faq.jsonl")
    assert str(server.app.state.forja.settings.home) not in json.dumps(report)  # no server path leaks


def test_a_user_who_is_not_an_admin_trains_but_cannot_promote_review_or_manage_users(server):
    client, csrf = sign_in(server, ANA)
    headers = {"X-CSRF-Token": csrf}
    assert client.get("/console/api/me").json()["admin"] is False
    nav = client.get("/console/training").text
    assert 'href="/console/data"' in nav and 'href="/console/keys"' not in nav  # admin pages left out
    promote = client.post("/admin/models/activate", json={"model": server.model}, headers=headers)
    assert promote.status_code == 403 and promote.json()["error"]["code"] == "admin_key_required"
    assert client.post("/admin/models/rollback", headers=headers).status_code == 403
    assert client.get("/console/api/feedback").status_code == 403
    assert client.post("/console/api/feedback/review", json={"ids": [1], "decision": "rejected"},
                       headers=headers).status_code == 403
    assert client.post("/console/api/users", json={"name": "eve", "password": "x" * 12, "admin": True},
                       headers=headers).status_code == 403
    files = {"file": ("mine.jsonl", jsonl(PAIRS), "application/jsonl")}
    mine = client.post("/v1/files", data={"purpose": "fine-tune"}, files=files, headers=headers)
    assert mine.status_code == 200  # the train scope
    assert [f["filename"] for f in client.get("/v1/files").json()["data"]] == ["mine.jsonl"]  # only her own


def test_repeated_wrong_passwords_lock_the_user_out_with_429_and_retry_after(server):
    accounts.add_user(server.store, "carla", "carla-password-3")
    client = httpx.Client(base_url=server.url)
    for _ in range(accounts.MAX_FAILURES):
        response = client.post("/console/login", data={"name": "carla", "password": "guess", "csrf": login_csrf(client)})
        assert response.status_code == 401
    locked = client.post("/console/login", data={"name": "carla", "password": "carla-password-3",
                                                 "csrf": login_csrf(client)})
    assert locked.status_code == 429 and "forja_console" not in locked.headers.get("set-cookie", "")
    assert 0 < int(locked.headers["Retry-After"]) <= accounts.LOCKOUT_SECONDS
    assert sign_in(server)[0].get("/console/api/me").status_code == 200  # other users are not locked out
    later = time.time() + accounts.LOCKOUT_SECONDS + 1
    assert accounts.login(server.store, "carla", "carla-password-3", now=later).name == "carla"


def test_users_are_added_listed_and_removed_from_the_cli():
    runner = CliRunner()
    first = runner.invoke(cli, ["users", "add", "maria", "--password-stdin"], input="maria-password-1\n")
    assert first.exit_code == 0 and "maria (admin)" in first.output
    second = runner.invoke(cli, ["users", "add", "jose", "--password-stdin"], input="jose-password-12\n")
    assert second.exit_code == 0 and "(admin)" not in second.output
    prompted = runner.invoke(cli, ["users", "add", "lu"], input="lu-password-123\nlu-password-123\n")
    assert prompted.exit_code == 0, prompted.output
    assert runner.invoke(cli, ["users", "add", "x", "--password-stdin"], input="short\n").exit_code == 1
    assert runner.invoke(cli, ["users", "add", "jose", "--password-stdin"], input="jose-password-12\n").exit_code == 1
    listed = [json.loads(line) for line in runner.invoke(cli, ["users", "list", "--json"]).output.splitlines()]
    assert [(u["name"], u["admin"]) for u in listed] == [("jose", False), ("lu", False), ("maria", True)]
    assert runner.invoke(cli, ["users", "remove", "jose"]).exit_code == 0
    assert runner.invoke(cli, ["users", "remove", "jose"]).exit_code == 1
    store = Store.open(load_settings())
    assert [u.name for u in accounts.list_users(store)] == ["lu", "maria"]
    store.close()


def test_an_admin_uploads_trains_promotes_and_reviews_in_chromium(server, browser):
    ids = seed_feedback(server.store, "browser")
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))

    page.goto(server.url + "/console")
    assert page.url.startswith(server.url + "/console/login")
    page.fill("#name", ROOT[0])
    page.fill("#password", ROOT[1])
    page.click("#sign-in")
    page.wait_for_url("**/console/data")
    page.wait_for_selector("body[data-loaded]")

    # Data: a file with a bad row is refused naming it; a good one shows its inspection report
    page.set_input_files("#upload-file", files=[{"name": f"{XSS}.jsonl", "mimeType": "application/jsonl",
                                                 "buffer": jsonl([("hola", "buenas"), ("¿horario?", "")])}])
    page.click("#upload-send")
    page.wait_for_selector("#upload-error:not([hidden])")
    error = page.locator("#upload-error").inner_text()
    assert f"{XSS}.jsonl row 2" in error and '"content" is empty' in error
    page.set_input_files("#upload-file", files=[{"name": f"{XSS}faq.jsonl", "mimeType": "application/jsonl",
                                                 "buffer": jsonl(PAIRS + PAIRS[:1])}])
    page.click("#upload-send")
    page.wait_for_selector("#report:not([hidden])")
    wait_until(page, f"[...document.querySelectorAll('#files .filename')].some((td) => td.textContent === "
                     f"{json.dumps(XSS + 'faq.jsonl')})")
    assert page.locator("#report-name").inner_text() == f"{XSS}faq.jsonl"
    assert page.locator("#report-duplicates").inner_text() == "1"
    assert page.locator("#report-preview li").count() == 3 and "buenas" in page.locator("#report-preview").inner_text()
    assert page.locator("#files .filename").first.inner_text() == f"{XSS}faq.jsonl"  # newest first
    page.screenshot(path=str(ARTIFACTS / "console-data.png"), full_page=True)

    # Training: a job on the tiny model, its loss chart filling in from the streamed events
    page.click("nav >> text=Training")
    page.wait_for_selector("body[data-loaded]")
    page.fill("#job-model", server.model)
    page.fill("#job-train", '{"max_steps": 4, "eval_every": null, "stop_when_learned": false}')
    page.fill("#job-suffix", "console")
    page.click("#job-start")
    page.wait_for_selector("#job:not([hidden])")
    wait_until(page, "document.querySelectorAll('#loss-chart .point').length >= 1", 240_000)
    wait_until(page, "document.getElementById('job-status').textContent === 'succeeded'", 240_000)
    wait_until(page, "document.querySelectorAll('#loss-chart .point').length >= 4")  # every step's loss
    wait_until(page, "document.getElementById('job-step').textContent === '4 / 4'")
    assert page.locator("#job-speed").inner_text() != "–"
    version = page.locator("#job-result").inner_text()
    assert version.startswith("ft-console-")
    page.screenshot(path=str(ARTIFACTS / "console-training.png"), full_page=True)

    # Versions: the new one with its loss curve; promote it
    page.click("nav >> text=Versions")
    page.wait_for_selector("body[data-loaded]")
    card = page.locator(f'[data-version="{version}"]')
    card.locator("button.promote").click()
    wait_until(page, f"document.getElementById('active').textContent === {json.dumps(version)}",
                           60_000)
    assert server.app.state.forja.active == version
    wait_until(page, f"""() => {{ const img = document.querySelector('[data-version="{version}"] img');
        return img && img.complete && img.naturalWidth > 0; }}""")
    page.screenshot(path=str(ARTIFACTS / "console-versions.png"), full_page=True)

    # Feedback: approve one correction, reject the other; the persona and correction are shown as text
    page.click("nav >> text=Feedback review")
    page.wait_for_selector("body[data-loaded]")
    page.wait_for_selector(f'[data-feedback="{ids[0]}"]')
    assert XSS in page.locator(f'[data-feedback="{ids[0]}"] .correction').inner_text()
    assert XSS in page.locator(f'[data-feedback="{ids[0]}"] .persona').inner_text()
    assert page.locator('img[src="x"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / "console-feedback.png"), full_page=True)
    page.locator(f'[data-feedback="{ids[0]}"] textarea.edit').fill("Abrimos de 8 a 15, ana@example.com.")
    page.locator(f'[data-feedback="{ids[0]}"] button.approve').click()  # approved in the operator's words
    page.wait_for_selector(f'[data-feedback="{ids[0]}"]', state="detached")
    edited = next(r for r in server.store.feedback_rows() if r["id"] == ids[0])
    assert edited["correction"] == "Abrimos de 8 a 15, [EMAIL]."  # redacted like any correction
    page.locator(f'[data-feedback="{ids[1]}"] button.reject').click()
    page.wait_for_selector(f'[data-feedback="{ids[1]}"]', state="detached")
    reviews = {r["id"]: r["review"] for r in server.store.feedback_rows()}
    assert (reviews[ids[0]], reviews[ids[1]]) == ("approved", "rejected")
    page.click("#retrain")  # a feedback job on the active version (cancelled here: the gate's run is long)
    page.wait_for_selector("#retrain-result a")
    job_id = page.locator("#retrain-result a").inner_text()
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    job = admin.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["model"], job["forja"]["source"], job["training_file"]) == (version, "feedback", None)
    assert admin.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200

    # Keys and usage
    page.click("nav >> text=Keys and usage")
    page.wait_for_selector("body[data-loaded]")
    wait_until(page, "document.querySelectorAll('#users tbody tr').length >= 2")
    page.screenshot(path=str(ARTIFACTS / "console-keys.png"), full_page=True)

    # at phone width nothing runs off the side
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.context.add_cookies(page.context.cookies())
    for name in ("data", "training", "versions", "feedback", "knowledge", "keys"):
        phone.goto(f"{server.url}/console/{name}")
        phone.wait_for_selector("body[data-loaded]")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 392, name
    phone.goto(f"{server.url}/console/versions")
    phone.wait_for_selector("body[data-loaded]")
    phone.screenshot(path=str(ARTIFACTS / "console-versions-phone.png"), full_page=True)
    assert page.locator('img[src="x"]').count() == 0
    assert problems == [], problems


def test_the_keys_page_shows_a_new_key_once_lists_and_revokes_it_and_shows_usage_in_chromium(server, browser):
    client, _ = sign_in(server)
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.add_cookies([{"name": "forja_console", "value": client.cookies["forja_console"], "url": server.url}])
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    marked = admin.post("/admin/keys", json={"name": XSS}).json()["key"]  # a key whose name is markup
    ask(server, marked)
    page.goto(server.url + "/console/keys")
    page.wait_for_selector("body[data-loaded]")
    assert page.locator("#usage tbody td", has_text=XSS).count() == 1  # a key's name, as text
    assert page.locator("#usage img").count() == 0
    page.fill("#key-name", "shop-site")
    page.check("#scope-train")
    page.fill("#key-rpm", "60")
    page.click("#key-create")
    page.wait_for_selector("#new-key:not([hidden])")
    assert page.locator("#new-key-value").inner_text().startswith("fk-")
    row = page.locator('#keys tr:has-text("shop-site")')
    row.wait_for()
    assert "chat, train" in row.inner_text() and "60/min" in row.inner_text()
    assert page.locator('#keys tr:has-text("ops") button').count() == 0  # a config key is not revoked here
    page.screenshot(path=str(ARTIFACTS / "console-keys-created.png"), full_page=True)
    secret = page.locator("#new-key-value").inner_text()
    ask(server, secret)  # the new key works from the openai client, twice
    ask(server, secret)
    row.locator("button.revoke").click()
    row.wait_for(state="detached")
    with pytest.raises(openai.AuthenticationError):  # revoked: the next call is refused
        ask(server, secret)
    page.reload()
    page.wait_for_selector("body[data-loaded]")
    counted = page.locator('#usage tr:has-text("shop-site")')
    counted.wait_for()
    assert " 2 " in f" {counted.inner_text()} ".replace("\t", " ")  # the usage table counted both calls
    page.screenshot(path=str(ARTIFACTS / "console-usage.png"), full_page=True)
    context.close()


def ask(server, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hola"}], max_tokens=2)


def test_the_versions_list_has_each_versions_gate_and_what_it_learned_from(server):
    client, _ = sign_in(server)
    settings = server.app.state.forja.settings
    version = settings.versions_dir / "ft-from-feedback-1"
    version.mkdir(parents=True)
    (version / "version.json").write_text(json.dumps({
        "name": version.name, "base": "ft-console-x", "method": "full", "created_at": "2026-12-01T10:00:00Z",
        "data_hash": "abc123", "metrics": {"train_loss": 1.5, "answers": {"nested": "left out"}},
        "from_feedback": {"started_from": "ft-console-x", "train_feedback_ids": [3], "holdout_feedback_ids": [],
                          "replayed_rows": 2, "replaced_rows": 0, "skipped": {}}}))
    (version / "gate.json").write_text(json.dumps({"passed": False, "reason": "rewordings got worse",
                                                   "decided_by": "feedback", "cases": []}))
    listed = {v["name"]: v for v in client.get("/console/api/versions").json()["data"]}
    row = listed["ft-from-feedback-1"]
    assert row["gate"] == {"passed": False, "reason": "rewordings got worse", "decided_by": "feedback"}
    assert row["from_feedback"]["train_feedback_ids"] == [3] and row["metrics"] == {"train_loss": 1.5}
    assert row["loss_plot"] is False and row["active"] is False
    for name in ("ft-from-feedback-1", "..", "%2E%2E%2Fforja.db", "smollm2-135m"):
        assert client.get(f"/console/api/versions/{name}/loss.png").status_code == 404


def make_version(settings, name: str, source, **meta) -> str:
    """A full-weights version copied from a model directory (what `forja train --method full` leaves)."""
    import shutil

    target = settings.versions_dir / name
    shutil.copytree(source, target)
    (target / "version.json").write_text(json.dumps({"name": name, "method": "full", "base": str(source), **meta}))
    return name


def finished_task(client: httpx.Client, task_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = client.get(f"/console/api/tasks/{task_id}").json()
        if task["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return task
        time.sleep(0.3)


TESTSET = "question,answer\nhola,buenas\n¿horario?,de 9 a 18\n"


def test_comparing_versions_and_exporting_one_are_jobs_whose_bad_input_is_refused_first(server, varied_model_dir):
    settings = server.app.state.forja.settings
    plain = make_version(settings, "cmp-plain", server.model)
    varied = make_version(settings, "cmp-varied", varied_model_dir)
    client, csrf = sign_in(server)
    headers = {"X-CSRF-Token": csrf}
    upload = client.post("/v1/files", headers=headers, data={"purpose": "evals"},
                         files={"file": ("preguntas.csv", TESTSET.encode())})
    assert upload.status_code == 200, upload.text
    testset = upload.json()["id"]
    bad = client.post("/v1/files", headers=headers, data={"purpose": "evals"},
                      files={"file": ("mal.csv", b"pregunta,respuesta\nhola,buenas\n")})
    assert bad.status_code == 400 and "mal.csv" in bad.json()["error"]["message"]
    fine_tune = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                            files={"file": ("faq.jsonl", jsonl(PAIRS))}).json()["id"]

    def compare(**body):
        return client.post("/console/api/compare", headers=headers,
                           json={"models": [plain, varied], "testset_file_id": testset, **body})

    refused = {
        "unknown model": compare(models=[plain, "no-such-version"]),
        "same model twice": compare(models=[plain, plain]),
        "one model": compare(models=[plain]),
        "unknown file": compare(testset_file_id="file-nope"),
        "wrong purpose": compare(testset_file_id=fine_tune),
        "unknown field": compare(temperature=1.0),
    }
    schema = ("one model", "unknown field")  # refused by the request's schema, as every route does
    assert {why: r.status_code for why, r in refused.items()} == {why: 422 if why in schema else 400
                                                                  for why in refused}, \
        {why: r.text for why, r in refused.items()}
    assert "no-such-version" in refused["unknown model"].json()["error"]["message"]
    assert "purpose evals" in refused["wrong purpose"].json()["error"]["message"]

    started = compare(max_tokens=8)
    assert started.status_code == 201, started.text
    task = finished_task(client, started.json()["id"])
    assert task["status"] == "succeeded", task
    assert task["summary"]["models"] == [plain, varied] and task["summary"]["cases"] == 2
    answered = {(r["model"], r["question"]): r for r in task["rows"]}
    assert set(answered) == {(m, q) for m in (plain, varied) for q in ("hola", "¿horario?")}
    assert all(isinstance(r["token_f1"], float) for r in task["rows"])
    report = client.get(f"/v1/files/{task['report_file_id']}/content")
    assert report.status_code == 200 and b"cmp-varied" in report.content

    # export: admins only, of versions only; its files download through the files API
    ana, ana_csrf = sign_in(server, ANA)
    assert ana.post(f"/console/api/versions/{plain}/export", headers={"X-CSRF-Token": ana_csrf},
                    json={}).status_code == 403
    assert client.post("/console/api/versions/no-such/export", headers=headers, json={}).status_code == 404
    assert client.post(f"/console/api/versions/{plain}/export", headers=headers,
                       json={"format": "safetensors"}).status_code == 422
    assert ana.get(f"/console/api/tasks/{task['id']}").status_code == 404  # someone else's
    started = client.post(f"/console/api/versions/{plain}/export", headers=headers, json={"format": "ollama",
                                                                                           "quant": "f16"})
    assert started.status_code == 201, started.text
    task = finished_task(client, started.json()["id"])
    assert task["status"] == "succeeded", task
    names = sorted(f["filename"] for f in task["files"])
    assert names == ["Modelfile", f"{plain}-f16.gguf"]
    gguf = next(f for f in task["files"] if f["filename"].endswith(".gguf"))
    download = client.get(f"/v1/files/{gguf['id']}/content")
    assert download.status_code == 200 and download.content[:4] == b"GGUF" and len(download.content) == gguf["bytes"]


def test_the_versions_page_compares_two_versions_side_by_side_and_exports_one_in_chromium(server, browser,
                                                                                           varied_model_dir):
    settings = server.app.state.forja.settings
    plain = make_version(settings, "page-plain", server.model)
    varied = make_version(settings, "page-varied", varied_model_dir)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.goto(server.url + "/console/login?next=/console/versions")
    page.fill("#name", ROOT[0])
    page.fill("#password", ROOT[1])
    page.click("#sign-in")
    page.wait_for_url("**/console/versions")
    page.wait_for_selector("body[data-loaded]")
    page.select_option("#compare-a", plain)
    page.select_option("#compare-b", varied)
    page.set_input_files("#compare-file", files=[{"name": f"{XSS}.csv", "mimeType": "text/csv",
                                                  "buffer": TESTSET.encode()}])
    page.click("#compare-send")
    page.wait_for_selector("table.compare", timeout=240_000)
    header = page.locator("table.compare thead th").all_inner_texts()
    assert header == ["Question", "Expected", plain, varied]
    rows = page.locator("table.compare tbody tr:not(.means)")
    assert rows.count() == 2 and rows.first.locator("td").first.inner_text() == "hola"
    assert "token_f1" in page.locator(f'table.compare td.answer[data-model="{varied}"]').first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "console-compare.png"), full_page=True)

    card = page.locator(f'[data-version="{plain}"]')
    card.locator('button.export[data-format="gguf"]').click()
    card.locator(".downloads a").wait_for(timeout=240_000)
    link = card.locator(".downloads a")
    assert link.inner_text() == f"{plain}-q8_0.gguf"
    with page.expect_download() as download:
        link.click()
    assert open(download.value.path(), "rb").read(4) == b"GGUF"
    assert page.locator('img[src="x"]').count() == 0
    assert problems == [], problems


MANUAL = ("# Envíos\n\nEl envío a la península cuesta 4,90 € y tarda dos días laborables.\n\n"
          "# Devoluciones\n\nTienes 30 días para devolver un pedido sin dar explicaciones.\n")


def test_the_knowledge_page_creates_a_collection_indexes_a_document_searches_it_and_indexes_again_in_chromium(
        server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: dialog.accept())
    ana, ana_csrf = sign_in(server, ANA)
    assert ana.get("/console/api/knowledge").status_code == 403  # admins only, like /v1/vector_stores
    assert ana.get("/console/knowledge").status_code == 200 and 'href="/console/knowledge"' not in \
        ana.get("/console/data").text
    page.goto(server.url + "/console/login?next=/console/knowledge")
    page.fill("#name", ROOT[0])
    page.fill("#password", ROOT[1])
    page.click("#sign-in")
    page.wait_for_url("**/console/knowledge")
    page.wait_for_selector("body[data-loaded]")
    page.fill("#create-name", "tienda")
    page.click("#create-send")
    page.wait_for_selector('#collections [data-collection="tienda"]')
    assert page.locator("#collection-name").inner_text() == "tienda"
    page.set_input_files("#add-file", files=[{"name": f"{XSS}.md", "mimeType": "text/markdown",
                                              "buffer": MANUAL.encode()}])
    page.click("#add-send")
    wait_until(page, "[...document.querySelectorAll('#files tbody tr')].some((tr) => tr.textContent.includes('completed'))",
               120_000)
    assert page.locator("#files .filename").first.inner_text() == f"{XSS}.md"
    wait_until(page, "document.querySelector('#collections [data-collection=\"tienda\"] td:nth-child(3)')"
                     ".textContent !== '0'")
    page.fill("#search-query", "¿Cuánto cuesta el envío?")
    page.click("#search-send")
    page.wait_for_selector("#hits .hit")
    assert "4,90 €" in page.locator("#hits .hit").first.inner_text()
    assert f"{XSS}.md" in page.locator("#hits .hit .label").first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "console-knowledge.png"), full_page=True)
    page.click("#reindex")
    page.wait_for_selector("#reindexed li")
    assert page.locator("#reindexed li").first.inner_text().startswith(f"{XSS}.md: unchanged")
    page.locator("#files button.detach").first.click()
    wait_until(page, "document.querySelector('#files tbody').textContent.includes('No documents yet.')")
    page.click("#delete-collection")
    page.wait_for_selector('#collections [data-collection="tienda"]', state="detached")
    assert page.locator('img[src="x"]').count() == 0
    assert problems == [], problems


def test_the_chat_page_of_a_locked_server_offers_a_sign_in_and_then_answers_with_the_session_in_chromium(
        server, browser):
    page = browser.new_page(viewport={"width": 1000, "height": 800}, locale="en-US")
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.goto(server.url + "/")
    page.fill("#prompt", "hola")
    page.click("#send")
    wait_until(page, "document.getElementById('key-box').open")
    wait_until(page, "document.body.innerText.includes('enter it below, or sign in')")
    link = page.locator("#sign-in")
    assert link.inner_text() == "Do you run this assistant? Sign in"
    link.click()
    page.wait_for_url("**/console/login**")
    page.fill("#name", ROOT[0])
    page.fill("#password", ROOT[1])
    page.click("#sign-in")
    page.wait_for_url(server.url + "/")
    wait_until(page, "document.getElementById('sign-in').textContent === 'Signed in as root · console'")
    assert page.locator("#sign-in").get_attribute("href") == "/console"
    before = page.locator("#messages .message.assistant").count()
    page.fill("#prompt", "hola")
    page.click("#send")
    wait_until(page, f"document.querySelectorAll('#messages .message.assistant').length > {before} && "
                     "!document.getElementById('send').disabled", 60_000)
    answer = page.locator("#messages .message.assistant").last.inner_text()
    assert answer and "API key" not in answer and "401" not in answer
    assert problems == [], problems


def test_a_locked_out_user_is_unlocked_and_a_forgotten_password_is_set_from_the_cli(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["users", "add", "pilar", "--password-stdin"], input="pilar-password-1\n").exit_code == 0
    store = Store.open(load_settings())
    try:
        for _ in range(accounts.MAX_FAILURES):
            assert accounts.login(store, "pilar", "guess") is None
        with pytest.raises(accounts.LockedOut):
            accounts.login(store, "pilar", "pilar-password-1")
        unlocked = runner.invoke(cli, ["users", "unlock", "pilar"])
        assert unlocked.exit_code == 0 and unlocked.output.strip() == "unlocked pilar"
        assert accounts.login(store, "pilar", "pilar-password-1").name == "pilar"
        token, _ = accounts.open_session(store, accounts.list_users(store)[0])
        assert runner.invoke(cli, ["users", "password", "pilar", "--password-stdin"],
                             input="short\n").exit_code == 1
        changed = runner.invoke(cli, ["users", "password", "pilar", "--password-stdin"], input="pilar-new-pass-2\n")
        assert changed.exit_code == 0, changed.output
        assert accounts.session_of(store, token) is None  # the old sessions end
        assert accounts.login(store, "pilar", "pilar-password-1") is None
        assert accounts.login(store, "pilar", "pilar-new-pass-2").name == "pilar"
        for verb in ("unlock", "password"):
            missing = runner.invoke(cli, ["users", verb, "nadie", "--password-stdin"][:3 if verb == "unlock" else 4],
                                    input="whatever-pass-1\n")
            assert missing.exit_code == 1 and "no user named 'nadie'" in missing.output, missing.output
    finally:
        store.close()
