"""The chat page at `/` in the operator's words (serve.page): index.html rendered with its texts, in Spanish
and English, as a JSON block the page reads (app.js sets every text with textContent), and `GET /page/logo`.
The built-in texts are web/texts.json; an operator's text in serve.page replaces the built-in one."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from forja.config import PageSettings, Settings
from forja.serve.deps import ApiError, StateDep

router = APIRouter(include_in_schema=False)
WEB_DIR = Path(__file__).parents[1] / "web"
# an operator's SVG logo opened on its own is a document of this origin: it may run nothing
LOGO_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff"}


@cache
def built_in_texts() -> dict[str, dict[str, str]]:
    """The page's texts by language: {"es": {key: text}, "en": {...}}."""
    return json.loads((WEB_DIR / "texts.json").read_text(encoding="utf-8"))


@cache
def templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(WEB_DIR), autoescape=True)


def operator_texts(page: PageSettings) -> dict[str, str]:
    return page.model_dump(exclude={"language", "logo"}, exclude_none=True)


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page needs to speak as the operator's: its language (auto: the browser's), every text in
    each language, the logo's URL and each persona's own title and welcome."""
    page = settings.serve.page
    own = operator_texts(page)
    return {"language": page.language,
            "texts": {language: {**texts, **own} for language, texts in built_in_texts().items()},
            "logo": page.logo_url,
            "personas": {p.name: p.page.model_dump(exclude_none=True) for p in settings.serve.personas
                         if p.page is not None}}


@router.get("/")
async def chat_page(state: StateDep) -> HTMLResponse:
    # tojson escapes <, > and & as \u003c...: no text can close the <script> block it sits in
    html = templates().get_template("index.html").render(config=page_config(state.settings))
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/page/logo")
async def logo(state: StateDep) -> FileResponse:
    path = state.settings.serve.page.logo_file(state.settings.home)
    if path is None or not path.is_file():
        raise ApiError(404, "no logo file: set serve.page.logo to an image file (absolute, or relative to FORJA_HOME)",
                       code="not_found")
    return FileResponse(path, headers=LOGO_HEADERS)
