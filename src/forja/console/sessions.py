"""The console's session middleware: a request with a live session cookie is the user's, and the API routes
take it as the caller's credential (request.state.console_key, read by forja.serve.deps).

A state-changing call lends the session's authority only with the session's CSRF token in `X-CSRF-Token`:
a wrong token is a 403; a missing one is a 403 on /console/api and elsewhere leaves the call to its bearer
key (or none), as if no cookie had come, so another site's form can make nobody's call but its own.
"""

from __future__ import annotations

import asyncio
import hmac
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from forja.console import accounts

COOKIE = "forja_console"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CONSOLE_API = "/console/api/"


def cookie_value(scope: Scope, name: str) -> str | None:
    """As request.cookies reads it (Starlette's lenient parser: one odd cookie does not hide the others)."""
    for key, value in scope.get("headers", ()):
        if key == b"cookie":
            found = cookie_parser(value.decode("latin-1")).get(name)
            if found:
                return found
    return None


def header_value(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def csrf_matches(sent: str | None, expected: str) -> bool:
    return bool(sent) and hmac.compare_digest(sent.encode(), expected.encode())


def refused(message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "permission_error", "param": None, "code": code}},
                        status_code=403)


class ConsoleSessions:
    """Looks the cookie up (one indexed read), sets request.state.console_session (and console_key when the
    session may act), and refuses a state-changing call whose CSRF token is wrong."""

    def __init__(self, app: ASGIApp, state):
        self.app, self.state = app, state  # forja.serve.deps.ServerState: its store holds the sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = cookie_value(scope, COOKIE) if scope["type"] == "http" else None
        store = self.state.store
        if token and store is not None:
            session = await asyncio.to_thread(accounts.session_of, store, token)
            if session is not None:
                state = scope.setdefault("state", {})
                state["console_session"] = session
                sent = header_value(scope, CSRF_HEADER.encode())
                if scope["method"] in SAFE_METHODS or csrf_matches(sent, session.csrf):
                    state["console_key"] = session.user.api_key()
                elif sent is not None:
                    return await refused("the X-CSRF-Token header does not match this session: reload the "
                                         "console page", "csrf_token_invalid")(scope, receive, send)
                elif scope["path"].startswith(CONSOLE_API):
                    return await refused("this call changes something and needs the session's CSRF token in "
                                         "the X-CSRF-Token header", "csrf_token_missing")(scope, receive, send)
        await self.app(scope, receive, send)
