"""Talk to a running `forja serve` over HTTP: `forja ask "question"` and the `forja chat` REPL.

Plain httpx against the OpenAI-compatible routes; nothing here imports the model or the server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from forja.config import ForjaError

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=5.0)


class ClientError(ForjaError):
    """The server is unreachable or answered with an error; the message is one line for the user."""


@dataclass
class Answer:
    text: str = ""
    id: str = ""
    model: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)  # a persona with knowledge: its file citations

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "id": self.id, "model": self.model, "finish_reason": self.finish_reason,
                "usage": self.usage, "sources": self.sources}

    def sources_text(self) -> str:
        """The sources as `forja ask` and `forja chat` print them under the answer."""
        lines = []
        for note in self.sources:
            cite = note.get("file_citation") or {}
            where = [str(cite.get("filename"))]
            if cite.get("page") is not None:
                where.append(f"p. {cite['page']}")
            if cite.get("headings"):
                where.append(" > ".join(cite["headings"]))
            quote = " ".join(str(cite.get("quote", "")).split())
            lines.append(f"  [{cite.get('index')}] {', '.join(where)}{' (cited)' if cite.get('cited') else ''}: "
                         f"\"{quote[:160]}{'…' if len(quote) > 160 else ''}\"")
        return "Sources:\n" + "\n".join(lines) + "\n" if lines else ""


class Client:
    """A forja (or any OpenAI-compatible) server at `url`."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None):
        self.url = url.rstrip("/")
        key = api_key or os.environ.get("FORJA_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models").json()["data"]

    def chat(self, messages: list[dict[str, str]], *, model: str | None = None, **sampling: Any) -> Answer:
        body = {"messages": messages, **({"model": model} if model else {}), **_present(sampling)}
        reply = self._call("POST", "/v1/chat/completions", json=body).json()
        choice = reply["choices"][0]
        return Answer(choice["message"]["content"], reply["id"], reply["model"], choice["finish_reason"], reply["usage"],
                      choice["message"].get("annotations") or [])

    def stream_chat(self, messages: list[dict[str, str]], answer: Answer, *, model: str | None = None,
                    **sampling: Any) -> Iterator[str]:
        """Yield text deltas; `answer` is filled in as they come (usage at the end)."""
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **({"model": model} if model else {}), **_present(sampling)}
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_error_line(response))
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ClientError(f"the server failed while answering: {chunk['error'].get('message')}")
                    answer.id, answer.model = chunk["id"], chunk["model"]
                    if chunk.get("usage"):
                        answer.usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        text = choice["delta"].get("content") or ""
                        if text:
                            answer.text += text
                            yield text
                        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                        answer.sources = choice["delta"].get("annotations") or answer.sources
        except httpx.TransportError as exc:
            raise ClientError(self._unreachable(exc)) from None

    def feedback(self, exchange_id: str, *, rating: str | None = None, correction: str | None = None,
                 comment: str | None = None) -> dict[str, Any]:
        """Rate or correct the answer with this id; returns the stored feedback row."""
        body = _present({"id": exchange_id, "rating": rating, "correction": correction, "comment": comment})
        return self._call("POST", "/v1/feedback", json=body).json()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(self._unreachable(exc)) from None
        if response.status_code >= 400:
            raise ClientError(_error_line(response))
        return response

    def _unreachable(self, exc: Exception) -> str:
        return f"cannot reach the forja server at {self.url} ({type(exc).__name__}); start it with `forja serve` or pass --url"


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _error_line(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    return f"the server answered {response.status_code}: {message}"


def ask(client: Client, question: str, *, model: str | None, system: str | None, stream: bool, out: TextIO,
        **sampling: Any) -> Answer:
    """`forja ask`: one question; streams the answer to `out` unless stream is False."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if not stream:
        return client.chat(messages, model=model, **sampling)
    answer = Answer()
    for delta in client.stream_chat(messages, answer, model=model, **sampling):
        out.write(delta)
        out.flush()
    out.write("\n" + answer.sources_text())
    return answer


FEEDBACK_PROMPT = "Was this answer right? [g]ood, [b]ad, [f]ix (type the right answer), Enter to skip: "


def ask_feedback(client: Client, answer: Answer, inp: TextIO, out: TextIO) -> dict[str, Any] | None:
    """After `forja ask --feedback`: one line from the user becomes a rating or a correction."""
    out.write(FEEDBACK_PROMPT)
    out.flush()
    reply = inp.readline().strip()
    choice, _, rest = reply.partition(" ")
    choice = choice.lower()
    if choice in ("g", "good", "y", "yes", "+"):
        row = client.feedback(answer.id, rating="up")
    elif choice in ("b", "bad", "n", "no", "-"):
        row = client.feedback(answer.id, rating="down")
    elif choice in ("f", "fix"):
        correction = rest.strip()
        if not correction:
            out.write("the right answer: ")
            out.flush()
            correction = inp.readline().strip()
        if not correction:
            out.write("(no correction given; nothing sent)\n")
            return None
        row = client.feedback(answer.id, rating="down", correction=correction)
    else:
        return None
    out.write(f"(feedback {row['id']} stored, thank you)\n")
    return row


CHAT_HELP = ("Commands: /persona NAME (switch; /persona alone lists them), /reset (forget the conversation), "
             "/good or /bad (rate the last answer), /fix TEXT (correct it), /exit")


def chat_models(client: Client) -> list[str]:
    """What a conversation can talk to: every model and persona but the embedding model."""
    return [m["id"] for m in client.models() if m.get("kind") != "embedding"]


def chat(client: Client, *, model: str | None, inp: TextIO, out: TextIO, **sampling: Any) -> None:
    """`forja chat`: a conversation that remembers its turns; reads lines from `inp` until /exit or EOF."""
    history: list[dict[str, str]] = []
    last: Answer | None = None  # the answer /good, /bad and /fix apply to
    names = chat_models(client)  # also checks the server is there before the first question
    if model and model not in names:  # a trained version is listed to admin keys only, but answers anyone
        out.write(f"({model} is not among what the server lists to this key: {', '.join(names)}; asking it anyway)\n")
    current = model or names[0]
    interactive = inp.isatty()
    out.write(f"Talking to {current} at {client.url} (an AI model: answers can be wrong). {CHAT_HELP}\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            last = None
            out.write("(conversation forgotten)\n")
            continue
        if text == "/help":
            out.write(CHAT_HELP + "\n")
            continue
        command = text.split()[0]
        if command in ("/good", "/bad", "/fix"):
            correction = text.removeprefix("/fix").strip() if command == "/fix" else None
            if last is None or not last.id:
                out.write("(no answer to rate yet)\n")
            elif command == "/fix" and not correction:
                out.write("usage: /fix THE RIGHT ANSWER\n")
            else:
                try:
                    row = client.feedback(last.id, rating="up" if command == "/good" else "down", correction=correction)
                except ClientError as exc:
                    out.write(f"error: {exc}\n")
                    continue
                if correction:  # the conversation goes on from the corrected answer
                    history[-1] = {"role": "assistant", "content": correction}
                out.write(f"(feedback {row['id']} stored)\n")
            continue
        if text.startswith("/persona"):
            name = text.removeprefix("/persona").strip()
            names = chat_models(client)
            if not name:
                out.write("available: " + ", ".join(names) + "\n")
            elif name not in names:
                out.write(f"no persona {name!r}; available: {', '.join(names)} (a trained version that is not "
                          "listed: forja chat --model NAME)\n")
            else:
                current = name
                history.clear()
                last = None
                out.write(f"(now talking to {current}; new conversation)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}. {CHAT_HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        out.write(f"{current}> ")
        answer = Answer()
        try:
            for delta in client.stream_chat(history, answer, model=current, **sampling):
                out.write(delta)
                out.flush()
        except ClientError as exc:  # say it and keep the conversation going
            history.pop()
            out.write(f"\nerror: {exc}\n")
            continue
        out.write("\n" + answer.sources_text())
        history.append({"role": "assistant", "content": answer.text})
        last = answer
    out.write("bye\n")

