"""Batch requests: an OpenAI batch file (one request a line) answered through forja's own request path, in
process: the app `forja serve` runs, entered without a socket, with many requests in flight so that the engine
decodes them together. `forja generate --input FILE --output FILE` runs it (a table of prompts too), and so do
batch jobs. Every answer is appended as soon as it comes, so an interrupted run continues where it stopped."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request  # at the top: FastAPI reads the override's annotation from this module

from forja.config import ForjaError, Settings

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
CHAT_URL = URLS[0]
# a table's prompt column, when --column does not name it and the table has more than one
PROMPT_COLUMNS = ("prompt", "question", "pregunta", "input", "consulta", "text")
QUEUE_FULL_RETRY_SECONDS = 0.05  # a 429 (the engine's queue full, e.g. requests with n > 1): sent again after this
QUEUE_FULL_PATIENCE_SECONDS = 120.0  # a queue full for longer: the line gets its 429


class BatchError(ForjaError):
    """A batch file that cannot be run, naming the line and the problem."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


@dataclass
class Counts:
    total: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        return self.completed + self.failed


Progress = Callable[[Counts], None] | None
Cancelled = Callable[[], bool] | None


# ------------------------------------------------------------------------------------------------ the file


def read_requests(path: Path) -> list[dict]:
    """Every line of an OpenAI batch file checked: JSON object with custom_id (string, unique in the file),
    method "POST", url in URLS, body an object; all lines must have the same url (as OpenAI requires: the
    batch's endpoint). Raise BatchError("file line N: ...") naming the line and the problem."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise BatchError(f"file line {line}: not UTF-8 text (save the file as UTF-8)", line) from None
    requests: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue

        def bad(problem: str, number: int = number) -> BatchError:
            return BatchError(f"file line {number}: {problem}", number)

        try:
            request = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(request, dict):
            raise bad(f"expected a JSON object with custom_id, method, url and body, found {type(request).__name__}")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise bad("custom_id is missing or not a non-empty string")
        if custom_id in seen:
            raise bad(f"custom_id {custom_id!r} is already on line {seen[custom_id]}; each request needs its own")
        if request.get("method") != "POST":
            raise bad(f"method is {request.get('method')!r}; batch requests are \"POST\"")
        url = request.get("url")
        if url not in URLS:
            raise bad(f"url is {url!r}; a batch answers {', '.join(URLS)}")
        if requests and url != requests[0]["url"]:
            first = seen[requests[0]["custom_id"]]
            raise bad(f"url is {url}, line {first}'s is {requests[0]['url']}: a batch has one endpoint")
        if not isinstance(request.get("body"), dict):
            raise bad("body is missing or not a JSON object")
        seen[custom_id] = number
        requests.append(request)
    if not requests:
        raise BatchError("file has no requests (one JSON object a line: custom_id, method, url, body)")
    return requests


def is_batch_file(path: Path) -> bool:
    """A .jsonl whose first line is a batch request (custom_id and body), not a table's row."""
    if Path(path).suffix.lower() != ".jsonl":
        return False
    with Path(path).open(encoding="utf-8-sig", errors="replace") as file:
        for line in file:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "custom_id" in first and "body" in first
    return False


def written_lines(path: Path) -> list[dict[str, Any]]:
    """The lines an earlier run wrote to `path` (none when it does not exist). A last line cut short (the
    process killed while writing it) is removed from the file: its request is answered again."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as file:
            file.truncate(len(data))
    lines = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("custom_id"), str):
            raise BatchError(f"{path} line {number}: not a line forja wrote (no custom_id); move the file away "
                             "to start over", number)
        lines.append(value)
    return lines


class Lines:
    """A JSONL file appended one line at a time, each flushed as soon as written (opened when first written)."""

    def __init__(self, path: Path):
        self.path, self.file = Path(path), None

    def write(self, value: dict[str, Any]) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        self.file.write(json.dumps(value, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ------------------------------------------------------------------------------------------------ answering


def run_batch(settings: Settings, input_path: Path, output_path: Path, error_path: Path, *, owner: str | None = None,
              endpoint: str | None = None, progress: Progress = None, cancelled: Cancelled = None,
              model: str | None = None) -> Counts:
    """Answer every request not already answered; output lines as OpenAI writes them:
    {"id": "batch_req_<hex>", "custom_id": ..., "response": {"status_code": 200, "request_id": ..., "body": {...}},
    "error": null}; a request answered with an error status goes to error_path with the same shape. Resume:
    custom_ids already in output_path or error_path are skipped; each line is appended and flushed as soon as
    its request is answered. `endpoint`, when given, must be the file's url. `progress(Counts)` after each
    answer; `cancelled()` polled before each request is sent (True: no more are sent, those in flight are
    answered and written). `model`: the one the app loads (default: the active version, as `forja serve`)."""
    requests = read_requests(input_path)
    if endpoint is not None and requests[0]["url"] != endpoint:
        raise BatchError(f"the batch's endpoint is {endpoint} but the file's url is {requests[0]['url']}")
    ids = {r["custom_id"] for r in requests}
    done: dict[str, set[str]] = {}
    for name, path in (("output", output_path), ("error", error_path)):
        done[name] = {line["custom_id"] for line in written_lines(path)}
        if done[name] - ids:
            raise BatchError(f"{path} has custom_id {sorted(done[name] - ids)[0]!r}, which the input does not: "
                             "it was written for another batch (choose another output file)")
    counts = Counts(len(requests), len(done["output"]), len(done["error"] - done["output"]))
    todo = [r for r in requests if r["custom_id"] not in done["output"] | done["error"]]
    if not todo:
        return counts
    output, errors = Lines(output_path), Lines(error_path)

    def answered(request: dict, status: int, body: dict[str, Any]) -> None:
        line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request["custom_id"],
                "response": {"status_code": status, "request_id": body.get("id") or uuid.uuid4().hex, "body": body},
                "error": None}
        if status == 200:
            output.write(line)
            counts.completed += 1
        else:
            errors.write(line)
            counts.failed += 1
        if progress is not None:
            progress(counts)

    try:
        answer_requests(settings, todo, answered, owner=owner, cancelled=cancelled, model=model)
    finally:
        output.close()
        errors.close()
    return counts


def answer_requests(settings: Settings, requests: list[dict], on_answer: Callable[[dict, int, dict[str, Any]], None],
                    *, owner: str | None = None, cancelled: Cancelled = None, model: str | None = None,
                    on_ready: Callable[[], None] | None = None) -> None:
    """Send each request ({"url", "body", ...}) through the server's app in this process and call
    `on_answer(request, status, body)` as each is answered (in the order they finish). `on_ready()` is called
    once the model is loaded, before the first request is sent (the benchmark starts its clock there)."""
    from forja.engine import run_coroutine

    run_coroutine(lambda: _answer_all(settings, requests, on_answer, owner, cancelled, model, on_ready))


def in_flight(settings: Settings) -> int:
    """Requests sent at once: two batches' worth, so a batch is ready as soon as one ends, within what the
    engine takes without a 429 (its batch slots plus serve.max_queue waiting)."""
    serve = settings.serve
    return max(1, min(2 * serve.max_batch_size, serve.max_batch_size + serve.max_queue))


async def _answer_all(settings: Settings, requests: list[dict], on_answer: Callable[[dict, int, dict[str, Any]], None],
                      owner: str | None, cancelled: Cancelled, model: str | None,
                      on_ready: Callable[[], None] | None) -> None:
    import httpx

    from forja.serve.app import create_app
    from forja.keys import Limited
    from forja.serve.deps import ApiError, Caller, check_api_key, check_chat_caller

    # the worker is the one running this: the app it builds must not start another
    local = settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"run_in_server": False})})
    app = create_app(local, model)

    def as_owner(request: Request) -> str | None:
        """No key is sent: each request runs as the batch's owner (its exchanges recorded under that name), held
        to the owner's tokens per day like any of its requests."""
        request.state.api_key_name = owner
        ring = request.app.state.forja.keyring
        held = next((k for k in local.serve.api_keys if k.name == owner), None) or ring.named(owner)
        if held is not None:
            try:
                ring.check(held, per_minute=False)
            except Limited as exc:
                raise ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from None
        return owner

    def as_owner_caller(request: Request) -> Caller:
        return Caller(as_owner(request), False)

    app.dependency_overrides[check_api_key] = as_owner
    app.dependency_overrides[check_chat_caller] = as_owner_caller
    async with app.router.lifespan_context(app):
        state = app.state.forja
        while not state.ready:
            if state.load_error:
                raise BatchError(f"the model {state.base} failed to load: {state.load_error}")
            await asyncio.sleep(0.05)
        if on_ready is not None:
            on_ready()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://forja", timeout=None) as client:
            limit, pending = in_flight(local), set()

            async def finish() -> set:
                done, left = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    on_answer(*task.result())
                return left

            try:
                for request in requests:
                    if cancelled is not None and cancelled():
                        break
                    while len(pending) >= limit:
                        pending = await finish()
                    pending.add(asyncio.create_task(_send(client, request)))
                while pending:
                    pending = await finish()
            finally:
                for task in pending:  # interrupted (Ctrl-C): what is not answered is not written
                    task.cancel()


async def _send(client: Any, request: dict) -> tuple[dict, int, dict[str, Any]]:
    """One request through the app: (request, status, body); a 429 (queue full) is sent again."""
    body = request["body"]
    if body.get("stream"):
        return request, 400, _error("stream is not supported in a batch: the whole answer is written; leave it out",
                                    "stream")
    waited = 0.0
    while True:
        try:
            response = await client.post(request["url"], json=body)
        except Exception as exc:  # an error the app did not answer itself: recorded, the batch goes on
            return request, 500, _error(f"internal error: {type(exc).__name__}: {exc}", None, "server_error")
        # a full queue clears in moments; a limit (the owner's tokens, an upstream's rate) is the line's answer
        if response.status_code != 429 or response.json().get("error", {}).get("code") != "queue_full" \
                or waited > QUEUE_FULL_PATIENCE_SECONDS:
            break
        await asyncio.sleep(QUEUE_FULL_RETRY_SECONDS)
        waited += QUEUE_FULL_RETRY_SECONDS
    try:
        answer = response.json()
    except ValueError:
        answer = _error(response.text or f"status {response.status_code}", None, "server_error")
    return request, response.status_code, answer


def _error(message: str, param: str | None, type: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": "invalid_value" if param else None}}


# ------------------------------------------------------------------------------------------------ tables


def prompt_column(columns: list[str], column: str | None, path: Path) -> str:
    """The column holding the prompts: `column`, else the only one, else one named as PROMPT_COLUMNS."""
    shown = ", ".join(columns) or "(none)"
    if column is not None:
        if column.strip().lower() not in columns:
            raise BatchError(f"{path}: no column {column!r}; its columns are {shown}")
        return column.strip().lower()
    if len(columns) == 1:
        return columns[0]
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise BatchError(f"{path}: no column named {', '.join(PROMPT_COLUMNS)}; its columns are {shown}: "
                     "give the one with the prompts as --column NAME")


def table_requests(path: Path, column: str | None, body: dict[str, Any]) -> list[dict]:
    """A chat request per data row of a table (csv, tsv, xlsx, json, jsonl, parquet, read as `forja data` reads
    them): custom_id row-N (N counts data rows from 1), `body` with the row's cell as the user's message."""
    from forja.data import read_records

    records = read_records(Path(path))
    columns = list(dict.fromkeys(key for _, values in records for key in values))
    name = prompt_column(columns, column, path)
    requests = []
    for number, (label, values) in enumerate(records, 1):
        cell = values.get(name)
        prompt = "" if cell is None else str(cell).strip()
        messages = [*body.get("messages", []), {"role": "user", "content": prompt}]
        requests.append({"custom_id": f"row-{number}", "method": "POST", "url": CHAT_URL, "row": number,
                         "label": label, "prompt": prompt, "body": {**body, "messages": messages}})
    return requests


def run_table(settings: Settings, input_path: Path, output_path: Path, *, column: str | None = None,
              body: dict[str, Any] | None = None, model: str | None = None, progress: Progress = None,
              cancelled: Cancelled = None) -> Counts:
    """Answer every row of a table not already in `output_path`, one line a row:
    {"custom_id", "row", "prompt", "answer", "finish_reason", "usage"}, or {"custom_id", "row", "prompt", "error"}.
    Lines are appended as answered (a few rows out of order while they are decoded together); once every row
    is answered the file is rewritten in row order. An empty prompt is an error line, never sent."""
    requests = table_requests(input_path, column, body or {})
    by_id = {r["custom_id"]: r for r in requests}
    earlier = written_lines(output_path)
    for line in earlier:
        request = by_id.get(line["custom_id"])
        if request is None or line.get("prompt") != request["prompt"]:
            raise BatchError(f"{output_path} was written for another table (its {line['custom_id']} is not this "
                             f"table's); choose another --output, or remove it to start over")
    done = {line["custom_id"] for line in earlier}
    counts = Counts(len(requests), sum("error" not in line for line in earlier), sum("error" in line for line in earlier))
    output = Lines(output_path)

    def write(request: dict, line: dict[str, Any], failed: bool) -> None:
        output.write({"custom_id": request["custom_id"], "row": request["row"], "prompt": request["prompt"], **line})
        if failed:
            counts.failed += 1
        else:
            counts.completed += 1
        if progress is not None:
            progress(counts)

    def answered(request: dict, status: int, body: dict[str, Any]) -> None:
        if status != 200:
            error = (body.get("error") or {}).get("message") or f"status {status}"
            return write(request, {"error": f"{status}: {error}"}, True)
        choice = body["choices"][0]
        write(request, {"answer": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                        "usage": body.get("usage")}, False)

    try:
        todo = []
        for request in requests:
            if request["custom_id"] in done:
                continue
            if not request["prompt"]:
                write(request, {"error": f"{input_path} {request['label']}: the prompt cell is empty"}, True)
            else:
                todo.append(request)
        if todo:
            answer_requests(settings, todo, answered, cancelled=cancelled, model=model)
    finally:
        output.close()
    if counts.done == counts.total:
        _sort_by_row(output_path)
    return counts


def _sort_by_row(path: Path) -> None:
    """The finished file rewritten in row order, atomically (a reader never sees half of it)."""
    lines = sorted(written_lines(path), key=lambda line: line.get("row", 0))
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as file:
        for line in lines:
            file.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(partial, path)
