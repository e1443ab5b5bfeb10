"""The chat page as the shop's customers see it (serve.page): its language, the operator's title, logo and
welcome, a persona's own, operator text never taken as HTML, the phone layout after six turns, and what
/v1/models lists to whom. Screenshots land in test-artifacts/ (git-ignored)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from conftest import ARTIFACTS

from forja.config import ConfigError, PageSettings, load_settings
from forja.engine.pytorch import PyTorchEngine
from forja.models import VERSION_FILE, load
from forja.serve.app import create_app
from forja.serve.routes.page import built_in_texts, page_config

ADMIN_KEY, CHAT_KEY = "page-admin-key-0123456789", "page-chat-key-0123456789"
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360f80f0000010101001f6d2bd40000000049454e44ae426082")
PAGE = {"title": "Panadería Sol", "welcome": "¡Bienvenido a Panadería Sol!", "logo": "logo.png", "send": "Preguntar"}
ANSWER = "Sí, tenemos pan de centeno recién hecho de lunes a sábado. "
PERSONAS = [{"name": "panadero", "description": "Atiende la panadería", "system": "Eres el panadero.",
             "page": {"title": "El panadero", "welcome": "Pregúntame por el pan del día."}},
            {"name": "pirata", "description": "Habla como un pirata"}]


def home_with_versions(path):
    """A FORJA_HOME holding two trained versions (only their description: they are listed, never loaded)
    and the page's logo."""
    for name in ("shop-v1", "shop-v2"):
        (path / "models" / "versions" / name).mkdir(parents=True)
        (path / "models" / "versions" / name / VERSION_FILE).write_text("{}")
    (path / "logo.png").write_bytes(PNG)
    return path


@pytest.fixture(scope="module")
def server(varied_model_dir, tmp_path_factory, start_server):
    home = home_with_versions(tmp_path_factory.mktemp("page-home"))
    settings = load_settings(home=home, model=str(varied_model_dir), generate={"max_new_tokens": 16},
                             serve={"personas": PERSONAS, "page": PAGE}, jobs={"run_in_server": False})
    engine = PyTorchEngine(load(str(varied_model_dir), settings), name=str(varied_model_dir))
    # the random tiny model answers bytes that are not text (the rails would refuse them back in the history)
    # and may stop after a token: here every answer is this sentence, max_new_tokens long, as a shop's would be
    words, accept = engine.loaded.tokenizer.encode(ANSWER), engine._accept
    engine._accept = lambda seq, token: accept(seq, None if token is None else
                                               words[seq.usage.completion_tokens % len(words)])
    return start_server(create_app(settings, engine=engine))


@pytest.fixture(scope="module")
def locked(tiny_model_dir, tmp_path_factory, start_server):
    home = home_with_versions(tmp_path_factory.mktemp("page-locked"))
    settings = load_settings(home=home, model=str(tiny_model_dir), jobs={"run_in_server": False},
                             serve={"personas": PERSONAS, "api_keys": [{"name": "me", "key": ADMIN_KEY, "admin": True},
                                                                      {"name": "web", "key": CHAT_KEY}]})
    return start_server(create_app(settings))


def open_page(browser, server, locale, **options):
    context = browser.new_context(locale=locale, **options)
    page = context.new_page()
    errors, dialogs = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#persona option').length > 0")
    return context, page, errors, dialogs


def model_ids(server, key=None):
    response = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert response.status_code == 200, response.text
    return [(card["id"], card["kind"]) for card in response.json()["data"]]


# ------------------------------------------------------------------------------------------------ settings


def test_every_text_is_built_in_in_spanish_and_english_and_the_operator_can_set_the_main_ones():
    texts = built_in_texts()
    assert set(texts) == {"es", "en"} and set(texts["es"]) == set(texts["en"])
    assert all(texts["es"].values()) and all(texts["en"].values())
    own = set(PageSettings.model_fields) - {"language", "logo"}
    assert own <= set(texts["es"])  # every serve.page text replaces a built-in one
    config = page_config(load_settings(serve={"page": {"send": "Pedir", "language": "es"}}))
    assert config["language"] == "es"
    assert config["texts"]["es"]["send"] == config["texts"]["en"]["send"] == "Pedir"
    assert config["texts"]["es"]["stop"] == "Parar" and config["texts"]["en"]["stop"] == "Stop"


@pytest.mark.parametrize("logo", ["logo.txt", "/etc/passwd", "https://shop.example/logo", "javascript:alert(1)"])
def test_a_logo_that_is_not_an_image_is_refused_by_the_config(logo):
    with pytest.raises(ConfigError, match=r"serve\.page\.logo.*not an image"):
        load_settings(serve={"page": {"logo": logo}})


def test_the_logo_is_served_from_forja_home_or_loaded_from_its_url(server, tmp_path):
    response = httpx.get(server.url + "/page/logo")
    assert response.status_code == 200 and response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    url = load_settings(serve={"page": {"logo": "https://shop.example/img/logo.svg?v=2"}}).serve.page
    assert url.logo_url == "https://shop.example/img/logo.svg?v=2" and url.logo_file(tmp_path) is None
    assert load_settings(serve={"page": {"logo": "/srv/logo.webp"}}).serve.page.logo_file(tmp_path).as_posix() == \
        "/srv/logo.webp"


# ------------------------------------------------------------------------------------------------ the page


def test_the_page_is_spanish_for_a_spanish_browser_with_the_shops_title_logo_and_welcome(server, browser):
    context, page, errors, _ = open_page(browser, server, "es-ES")
    assert page.evaluate("document.documentElement.lang") == "es"
    assert page.locator("#title").inner_text() == "Panadería Sol" and page.title() == "Panadería Sol"
    assert page.locator(".message.welcome").inner_text() == "¡Bienvenido a Panadería Sol!"
    assert page.locator("#ai-notice").inner_text().startswith("Estás hablando con un modelo de IA")
    assert page.locator("#send").inner_text() == "Preguntar"  # the operator's text, whatever the language
    assert page.locator("#stop").inner_text() == "Parar" and page.locator("#reset").inner_text() == "Nueva conversación"
    assert page.get_attribute("#prompt", "placeholder").startswith("Escribe un mensaje")
    assert page.evaluate("document.getElementById('logo').naturalWidth") == 1  # /page/logo, loaded
    assert page.locator("#persona option").all_inner_texts()[0] == "Asistente general"
    page.fill("#prompt", "Hola")
    page.keyboard.press("Enter")
    page.wait_for_selector(".feedback button", timeout=30_000)
    assert page.locator(".feedback button").all_inner_texts() == ["✓ Bien", "✗ Mal", "Mejorar esta respuesta"]
    page.screenshot(path=str(ARTIFACTS / "page-es.png"), full_page=True)
    assert errors == []
    context.close()


def test_the_page_is_english_for_an_english_browser(server, browser):
    context, page, errors, _ = open_page(browser, server, "en-GB")
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.locator("#title").inner_text() == "Panadería Sol"  # the operator's own words stay as written
    assert page.locator("#ai-notice").inner_text().startswith("You are talking to an AI model")
    assert page.locator("#stop").inner_text() == "Stop" and page.locator("#send").inner_text() == "Preguntar"
    assert page.get_attribute("#prompt", "placeholder").startswith("Write a message")
    assert page.locator("#key-summary").inner_text() == "Access key"
    page.screenshot(path=str(ARTIFACTS / "page-en.png"), full_page=True)
    assert errors == []
    context.close()


def test_a_persona_shows_its_own_title_and_welcome_when_selected(server, browser):
    context, page, errors, _ = open_page(browser, server, "es-ES")
    options = page.locator("#persona option").all_inner_texts()
    assert options[1] == "El panadero — Atiende la panadería" and options[2] == "pirata — Habla como un pirata"
    page.select_option("#persona", "panadero")
    assert page.locator("#title").inner_text() == "El panadero" and page.title() == "El panadero"
    assert page.locator(".message.welcome").inner_text() == "Pregúntame por el pan del día."
    assert page.locator(".message.note").inner_text() == "Nueva conversación con El panadero"
    page.screenshot(path=str(ARTIFACTS / "page-persona.png"), full_page=True)
    page.select_option("#persona", "pirata")  # no page of its own: the shop's
    assert page.locator("#title").inner_text() == "Panadería Sol"
    assert page.locator(".message.welcome").inner_text() == "¡Bienvenido a Panadería Sol!"
    page.select_option("#persona", "panadero")
    page.reload()  # the choice is remembered, and with it the persona's title and welcome
    page.wait_for_function("document.getElementById('title').textContent === 'El panadero'")
    assert page.locator(".message.welcome").inner_text() == "Pregúntame por el pan del día."
    assert errors == []
    context.close()


def test_operator_text_is_shown_as_text_never_as_html(tiny_model_dir, tmp_path_factory, start_server, browser):
    title = "<img src=x onerror=alert(1)>"
    settings = load_settings(home=tmp_path_factory.mktemp("page-xss"), model=str(tiny_model_dir),
                             jobs={"run_in_server": False},
                             serve={"page": {"title": title, "welcome": "</script><script>alert(2)</script>",
                                             "ai_notice": "<b>IA</b>", "language": "en"},
                                    "personas": [{"name": "x", "description": "<i>d</i>",
                                                  "page": {"title": "<svg onload=alert(3)>"}}]})
    server = start_server(create_app(settings))
    try:
        html = httpx.get(server.url + "/").text
        block = re.search(r'<script type="application/json" id="page-config">(.*?)</script>', html, re.S).group(1)
        assert json.loads(block)["texts"]["en"]["title"] == title and "<img" not in block
        context, page, errors, dialogs = open_page(browser, server, "es-ES")  # language: en, whatever the browser
        assert page.evaluate("document.documentElement.lang") == "en"
        assert page.locator("#title").inner_text() == title and page.title() == title
        assert page.locator(".message.welcome").inner_text() == "</script><script>alert(2)</script>"
        assert page.locator("#ai-notice").inner_text() == "<b>IA</b>"
        assert page.locator("#persona option").all_inner_texts()[1] == "<svg onload=alert(3)> — <i>d</i>"
        page.select_option("#persona", "x")
        assert page.locator("#title").inner_text() == "<svg onload=alert(3)>"
        assert page.evaluate("document.querySelectorAll('img:not(#logo), b, i, svg').length") == 0  # no element made
        assert page.evaluate("document.scripts.length") == 2  # the JSON block and app.js
        page.screenshot(path=str(ARTIFACTS / "page-xss.png"))
        assert dialogs == [] and errors == []
        context.close()
    finally:
        server.stop()


def test_at_phone_size_the_sixth_answer_is_fully_visible_above_the_input_box(server, browser):
    context, page, errors, _ = open_page(browser, server, "es-ES", viewport={"width": 390, "height": 844},
                                         is_mobile=True, has_touch=True)
    for turn in range(1, 7):
        page.fill("#prompt", f"¿Pan {turn}?")  # short: six turns fit the tiny model's context of 256 tokens
        page.click("#send")
        page.wait_for_function(f"document.querySelectorAll('.message.assistant').length === {turn} && "
                               "!document.getElementById('send').disabled", timeout=30_000)
        assert page.locator("#status").inner_text() == "" and page.locator(".feedback").count() == turn
    box = page.evaluate("""() => {
        const rect = (el) => { const r = el.getBoundingClientRect(); return {top: r.top, bottom: r.bottom}; };
        const answers = document.querySelectorAll('.message.assistant'), bars = document.querySelectorAll('.feedback');
        const messages = document.getElementById('messages');
        return {answer: rect(answers[answers.length - 1]), bar: rect(bars[bars.length - 1]),
                input: rect(document.getElementById('ask')), prompt: rect(document.getElementById('prompt')),
                conversation: rect(messages),
                height: innerHeight, pageScroll: scrollY, pageHeight: document.documentElement.scrollHeight,
                overflows: messages.scrollHeight > messages.clientHeight, scrolled: messages.scrollTop};
    }""")
    page.screenshot(path=str(ARTIFACTS / "page-phone-six-turns.png"))
    assert page.locator(".message.assistant").count() == 6
    assert box["overflows"] and box["scrolled"] > 0  # the conversation is longer than the screen, and scrolled
    assert box["pageScroll"] == 0 and box["pageHeight"] <= box["height"]  # the page itself does not scroll
    assert box["conversation"]["top"] <= box["answer"]["top"]  # not under the header
    assert 0 <= box["answer"]["top"] < box["answer"]["bottom"] <= box["input"]["top"]  # above the input box
    assert box["bar"]["bottom"] <= box["input"]["top"]  # its rating buttons too
    assert box["prompt"]["bottom"] <= box["height"]  # the input box stays on screen, at the bottom
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows sideways
    assert errors == []
    context.close()


# ------------------------------------------------------------------------------------------------ /v1/models


def test_an_anonymous_caller_sees_personas_and_the_active_model_only(server, varied_model_dir):
    assert model_ids(server) == [(str(varied_model_dir), "active"), ("panadero", "persona"), ("pirata", "persona"),
                                 ("universal-sentence-encoder-multilingual-3", "embedding"),
                                 ("all-MiniLM-L6-v2", "embedding")]
    hidden = httpx.get(server.url + "/v1/models/shop-v1")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert "shop-v" not in hidden.json()["error"]["message"].split("available: ")[1]  # only what the caller sees
    assert httpx.get(server.url + "/v1/models/panadero").json()["kind"] == "persona"


def test_an_admin_key_sees_every_version_and_loaded_engine(locked, tiny_model_dir):
    state = locked.app.state.forja
    customers = [(str(tiny_model_dir), "active"), ("panadero", "persona"), ("pirata", "persona"),
                 ("universal-sentence-encoder-multilingual-3", "embedding"), ("all-MiniLM-L6-v2", "embedding")]
    assert model_ids(locked, CHAT_KEY) == customers  # a key without admin is a customer
    state.engines["other-model"] = state.engines[state.base]  # as if a request had loaded it by name
    try:
        assert model_ids(locked, ADMIN_KEY) == customers[:3] + [("shop-v1", "version"), ("shop-v2", "version"),
                                                                ("other-model", "loaded"), *customers[3:]]
    finally:
        del state.engines["other-model"]
    admin = httpx.get(locked.url + "/v1/models/shop-v2", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200 and admin.json()["kind"] == "version"
    chat = httpx.get(locked.url + "/v1/models/shop-v2", headers={"Authorization": f"Bearer {CHAT_KEY}"})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    assert httpx.get(locked.url + "/v1/models").status_code == 401
