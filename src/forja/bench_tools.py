"""`forja bench tools`: how well a model calls tools and follows a JSON schema when asked through `forja serve`
(the Spanish and English prompts of data/bench/tools_es_en.jsonl, each with the tool it should call or none),
and what decoding under the grammar costs per token against free text. Greedy throughout, per backend.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forja.bench import _decode_rate, _free_port, _wait_ready, stop
from forja.config import ForjaError
from forja.data import read_rows
from forja.models import cpu_line

BENCH_DATA = Path(__file__).resolve().parents[2] / "data" / "bench" / "tools_es_en.jsonl"


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    _function("get_weather", "Today's weather in a city",
              {"city": {"type": "string", "minLength": 1, "maxLength": 40},
               "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _function("get_order_status", "Where a customer's order is, by its 5-digit order number",
              {"order_id": {"type": "string", "pattern": "^[0-9]{5}$"}}, ["order_id"]),
    _function("book_table", "Book a table at the restaurant",
              {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "description": "YYYY-MM-DD"},
               "people": {"type": "integer", "minimum": 1, "maximum": 12}}, ["date", "people"]),
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
INTENT_SCHEMA = {"type": "object", "properties": {
    "intent": {"enum": [*SCHEMAS, "none"]}, "language": {"enum": ["es", "en"]},
    "reply": {"type": "string", "maxLength": 100}}, "required": ["intent", "language", "reply"],
    "additionalProperties": False}
INTENT_FORMAT = {"type": "json_schema", "json_schema": {"name": "intent", "schema": INTENT_SCHEMA, "strict": True}}
INTENT_SYSTEM = ("Classify the user's message as JSON. intent: the function it needs (get_weather, get_order_status, "
                 "book_table) or none; language: es or en; reply: one short sentence for the user.")
SPEED_PROMPT = "What's the weather like in Madrid today, and what should I wear?"
TARGET_RATIO = 1.10  # the target: constrained decoding costs at most 10% more per token than free text
MAX_TOKENS = 200  # a whole call or intent object fits with room to spare, even from the random test model
SPEED_TOKENS = 64
THREAD_VARIABLES = ("FORJA_THREADS", "OMP_NUM_THREADS")  # what the server's threads were told: recorded with the figures


def tools_benchmark(model: str, *, backends: list[str] | None = None, data: Path = BENCH_DATA, rounds: int = 5,
                    extra_env: dict[str, str] | None = None, log: Any = print) -> dict[str, Any]:
    """Per backend, one `forja serve` subprocess asked every prompt with tool_choice "required" and "auto" and
    for a json_schema answer, then the decode rate of free text, a json_schema answer and a required call on
    one prompt, alternated `rounds` times."""
    from forja.engine import llamacpp

    rows = read_rows(data)
    if not rows:
        raise ForjaError(f"{data}: no prompts (one JSON object a line: prompt, lang, tool or null, arguments)")
    backends = backends or (["llamacpp", "pytorch"] if llamacpp.available() else ["pytorch"])
    env = {**os.environ, **(extra_env or {})}
    report: dict[str, Any] = {"model": model, "cpu": cpu_line(), "prompts": len(rows),
                              "expect_a_tool": sum(bool(r.get("tool")) for r in rows),
                              "languages": {lang: sum(r.get("lang") == lang for r in rows) for lang in ("es", "en")},
                              "rounds": rounds, "target_ratio": TARGET_RATIO,
                              "threads": {name: env.get(name) for name in THREAD_VARIABLES}, "backends": {}}
    for backend in backends:
        with _served(model, backend, extra_env, log) as client:
            log(f"{backend}: {len(rows)} prompts with tool_choice required ...")
            required = required_calls(client, model, rows)
            log(f"{backend}: the same with tool_choice auto ...")
            auto = auto_calls(client, model, rows)
            log(f"{backend}: a json_schema answer to each ...")
            structured = json_answers(client, model, rows)
            log(f"{backend}: decode rate, free text vs json_schema vs a tool call, {rounds} rounds ...")
            cost = constraint_cost(client, model, rounds)
        report["backends"][backend] = {"required": required, "auto": auto, "json_schema": structured, "cost": cost}
    return report


@contextmanager
def _served(model: str, backend: str, extra_env: dict[str, str] | None, log: Any) -> Iterator[Any]:
    """`forja serve --backend X` in a subprocess, its output in a log file; an openai client for it."""
    import openai

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"starting forja serve --model {model} --backend {backend} on {url} ...")
    with tempfile.TemporaryFile("w+") as output:
        server = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--model", model, "--port", str(port),
                                   "--backend", backend], env={**os.environ, **(extra_env or {})},
                                  stdout=output, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_ready(url, server, timeout=600)
            except RuntimeError as exc:
                output.seek(0)
                raise ForjaError(f"{exc}; its output ends: {output.read()[-1500:]}") from None
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        finally:
            stop(server)


# ------------------------------------------------------------------------------------------------ quality


def required_calls(client: Any, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """tool_choice "required", one call: does it parse and validate (the grammar's promise), is it the
    expected tool, with the expected argument values."""
    done = []
    for row in rows:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": row["prompt"]}],
                                               tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                               temperature=0, max_tokens=MAX_TOKENS)
        choice = reply.choices[0]
        calls = [_checked(call) for call in choice.message.tool_calls or []]
        named = bool(calls) and calls[0]["name"] == row.get("tool")
        done.append({"prompt": row["prompt"], "expected": row.get("tool"), "finish_reason": choice.finish_reason,
                     "calls": calls, "valid": bool(calls) and all(c["valid"] for c in calls),
                     "expected_tool": named, "arguments_right": named and _as_expected(calls[0], row)})
    with_tool = [r for r in done if r["expected"]]
    return {"requests": len(done), "valid": _share(r["valid"] for r in done),
            "expected_tool": _share(r["expected_tool"] for r in with_tool),
            "arguments_right": _share(r["arguments_right"] for r in with_tool), "rows": done}


def auto_calls(client: Any, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """tool_choice "auto": the model decides between a call and a text answer."""
    done = []
    for row in rows:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": row["prompt"]}],
                                               tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
                                               temperature=0, max_tokens=MAX_TOKENS)
        choice = reply.choices[0]
        calls = [_checked(call) for call in choice.message.tool_calls or []]
        expected = row.get("tool")
        if not calls:
            outcome = "text"
        elif expected and calls[0]["name"] == expected:
            outcome = "expected_tool"
        else:
            outcome = "other_tool" if expected else "tool"
        done.append({"prompt": row["prompt"], "expected": expected, "outcome": outcome, "calls": calls,
                     "content": (choice.message.content or "")[:200], "finish_reason": choice.finish_reason})
    with_tool = [r for r in done if r["expected"]]
    without = [r for r in done if not r["expected"]]
    calls = [c for r in done for c in r["calls"]]
    return {"requests": len(done), "expected_tool": _share(r["outcome"] == "expected_tool" for r in with_tool),
            "other_tool": _share(r["outcome"] == "other_tool" for r in with_tool),
            "text_when_tool_expected": _share(r["outcome"] == "text" for r in with_tool),
            "tool_when_none_expected": _share(r["outcome"] == "tool" for r in without),
            "calls": len(calls), "calls_valid": _share(c["valid"] for c in calls), "rows": done}


def json_answers(client: Any, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """response_format json_schema (INTENT_SCHEMA): does the answer parse and validate; is its intent (the
    expected tool, or "none") and language right."""
    import jsonschema

    done = []
    for row in rows:
        reply = client.chat.completions.create(model=model, messages=[{"role": "system", "content": INTENT_SYSTEM},
                                                                      {"role": "user", "content": row["prompt"]}],
                                               response_format=INTENT_FORMAT, temperature=0, max_tokens=MAX_TOKENS)
        content = reply.choices[0].message.content or ""
        try:
            answer = json.loads(content)
            jsonschema.validate(answer, INTENT_SCHEMA)
            valid, error = True, None
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            answer, valid, error = None, False, str(exc)[:200]
        done.append({"prompt": row["prompt"], "content": content, "valid": valid, "error": error,
                     "finish_reason": reply.choices[0].finish_reason,
                     "intent_right": valid and answer["intent"] == (row.get("tool") or "none"),
                     "language_right": valid and answer["language"] == row.get("lang")})
    return {"requests": len(done), "valid": _share(r["valid"] for r in done),
            "intent_right": _share(r["intent_right"] for r in done),
            "language_right": _share(r["language_right"] for r in done), "rows": done}


def _checked(call: Any) -> dict[str, Any]:
    """A tool call as the client got it: its name, its arguments, and whether they validate."""
    import jsonschema

    name, arguments = call.function.name, call.function.arguments
    checked: dict[str, Any] = {"name": name, "arguments": arguments, "valid": False}
    try:
        parsed = json.loads(arguments)
        if name not in SCHEMAS:
            raise ValueError(f"no tool is called {name!r}")
        jsonschema.validate(parsed, SCHEMAS[name])
        checked["valid"] = True
    except (ValueError, jsonschema.ValidationError) as exc:  # JSONDecodeError is a ValueError
        checked["error"] = str(exc)[:200]
    return checked


def _as_expected(call: dict[str, Any], row: dict[str, Any]) -> bool:
    """Every argument value the row expects is in the call (strings compared without case)."""
    if not call["valid"]:
        return False
    got = json.loads(call["arguments"])

    def folded(value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    return all(key in got and folded(got[key]) == folded(value) for key, value in (row.get("arguments") or {}).items())


def _share(values: Any) -> float | None:
    values = list(values)
    return sum(map(bool, values)) / len(values) if values else None


# ------------------------------------------------------------------------------------------------ cost


def constraint_cost(client: Any, model: str, rounds: int) -> dict[str, Any]:
    """Decode tokens/s on one prompt, single stream, greedy, after the first token: free text, a json_schema
    answer, free text with logprobs and a required tool call (a call streams whole once written, so its tokens
    are timed by their logprobs chunks; free text with logprobs is its like-for-like baseline). Every mode reads
    the same prompt (the tools' system prompt, then the question), one after the other in each round; the
    per-token cost ratio is the median of the rounds' ratios (the verdict), and also that of the fastest runs."""
    from forja.chat import render_tools_system

    question = {"role": "user", "content": SPEED_PROMPT}
    plain = [{"role": "system", "content": render_tools_system(TOOLS)}, question]
    modes = {
        "free": {"messages": plain},
        "json_schema": {"messages": plain, "response_format": INTENT_FORMAT},
        "free_logprobs": {"messages": plain, "logprobs": True},
        "tool_call": {"messages": [question], "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
                      "logprobs": True},
    }
    for body in modes.values():  # warm-up: each grammar compiled, the prompt's prefix cached
        _timed(client, model, body, 8)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    names = list(modes)
    for round_ in range(rounds):  # each round starts one mode later, so none always follows another
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            runs[name].append(_timed(client, model, modes[name], SPEED_TOKENS))
    figures: dict[str, Any] = {"rounds": rounds, "max_tokens": SPEED_TOKENS, "prompt": SPEED_PROMPT}
    for name, done in runs.items():
        figures[name] = {"tokens_per_s": round(statistics.median(r["rate"] for r in done), 2),
                         "runs_tokens_per_s": [round(r["rate"], 2) for r in done],
                         "tokens": statistics.median(r["tokens"] for r in done),
                         "prompt_tokens": done[0]["prompt_tokens"]}

    def ratio(base: str, other: str) -> float:
        """Per-token cost of `other` over `base` (= base's rate / other's), round by round; the median."""
        return round(statistics.median(b["rate"] / max(o["rate"], 1e-9) for b, o in zip(runs[base], runs[other])), 3)

    def best(base: str, other: str) -> float:
        """The same from each mode's fastest run: what is left when other work on the machine comes in bursts."""
        return round(max(r["rate"] for r in runs[base]) / max(max(r["rate"] for r in runs[other]), 1e-9), 3)

    for name, base, other in (("json_schema_over_free", "free", "json_schema"),
                              ("tool_call_over_free_logprobs", "free_logprobs", "tool_call"),
                              ("logprobs_over_free", "free", "free_logprobs")):
        figures[name], figures[name + "_best"] = ratio(base, other), best(base, other)
    figures["holds"] = max(figures["json_schema_over_free"], figures["tool_call_over_free_logprobs"]) <= TARGET_RATIO
    return figures


def _timed(client: Any, model: str, body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """One streamed answer: decode tokens/s after the first piece. With logprobs every chunk says how many
    tokens it carries; without, the usage's count, as forja.bench's `_decode_rate`."""
    stream = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, **body)
    stamps: list[tuple[float, int]] = []  # when each piece came, and the tokens it carries (its logprobs)
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            tokens = len(choice.logprobs.content or []) if choice.logprobs else 0
            if tokens or choice.delta.content or choice.delta.tool_calls:
                stamps.append((time.perf_counter(), tokens))
    completion = usage.completion_tokens if usage else 0
    if not stamps:
        rate = 0.0
    elif body.get("logprobs"):
        after = sum(n for _, n in stamps[1:])
        rate = after / (stamps[-1][0] - stamps[0][0]) if after and stamps[-1][0] > stamps[0][0] else 0.0
    else:
        rate = _decode_rate(completion, stamps[0][0], stamps[-1][0])
    return {"rate": rate, "tokens": completion, "prompt_tokens": usage.prompt_tokens if usage else 0}


# ------------------------------------------------------------------------------------------------ report


def render_tools(report: dict[str, Any]) -> str:
    backends = list(report["backends"])
    n, tools = report["prompts"], report["expect_a_tool"]

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(report["backends"][b]) for b in backends) + " |"

    def pct(value: float | None, of: int) -> str:
        return "-" if value is None else f"{value:.0%} ({round(value * of)}/{of})"

    def rate(cost: dict[str, Any], mode: str) -> str:
        return f"{cost[mode]['tokens_per_s']:.1f}"

    def verdict(cost: dict[str, Any], name: str) -> str:
        value = cost[name]
        return f"{value:.2f}x {'yes' if value <= TARGET_RATIO else 'NO'} (fastest runs {cost[name + '_best']:.2f}x)"

    langs = report["languages"]
    lines = [
        f"forja bench tools: {report['model']}, {n} prompts ({langs['es']} Spanish, {langs['en']} English; {tools} "
        f"expect a tool), 3 tools, greedy, one call per answer; CPU: {report['cpu']}"
        + "".join(f"; {name}={value}" for name, value in report["threads"].items() if value),
        "| what | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
        row("required: calls that parse and validate (target 100%)", lambda f: pct(f["required"]["valid"], n)),
        row("required: the expected tool named", lambda f: pct(f["required"]["expected_tool"], tools)),
        row("required: with the expected argument values", lambda f: pct(f["required"]["arguments_right"], tools)),
        row("auto: the expected tool called", lambda f: pct(f["auto"]["expected_tool"], tools)),
        row("auto: another tool called", lambda f: pct(f["auto"]["other_tool"], tools)),
        row("auto: text when a tool was expected", lambda f: pct(f["auto"]["text_when_tool_expected"], tools)),
        row("auto: a tool called when none was expected", lambda f: pct(f["auto"]["tool_when_none_expected"], n - tools)),
        row("auto: calls that validate", lambda f: pct(f["auto"]["calls_valid"], f["auto"]["calls"])),
        row("json_schema: answers that parse and validate", lambda f: pct(f["json_schema"]["valid"], n)),
        row("json_schema: intent right / language right",
            lambda f: f"{pct(f['json_schema']['intent_right'], n)} / {pct(f['json_schema']['language_right'], n)}"),
        row(f"decode tokens/s, median of {report['rounds']}: free text / json_schema",
            lambda f: f"{rate(f['cost'], 'free')} / {rate(f['cost'], 'json_schema')}"),
        row("decode tokens/s with logprobs: free text / required tool call",
            lambda f: f"{rate(f['cost'], 'free_logprobs')} / {rate(f['cost'], 'tool_call')}"),
        row(f"per-token cost, json_schema / free text (target ≤ {TARGET_RATIO:.2f}x)",
            lambda f: verdict(f["cost"], "json_schema_over_free")),
        row(f"per-token cost, tool call / free text, both with logprobs (target ≤ {TARGET_RATIO:.2f}x)",
            lambda f: verdict(f["cost"], "tool_call_over_free_logprobs")),
        row("per-token cost of logprobs themselves (free text)",
            lambda f: f"{f['cost']['logprobs_over_free']:.2f}x (fastest runs {f['cost']['logprobs_over_free_best']:.2f}x)"),
    ]
    for backend in backends:
        missed = [r for r in report["backends"][backend]["required"]["rows"] if r["expected"] and not r["expected_tool"]]
        if missed:
            lines.append(f"{backend}, required, another tool: " + "; ".join(
                f"{r['prompt']!r} -> {r['calls'][0]['name'] if r['calls'] else 'none'}" for r in missed[:6]))
    return "\n".join(lines)
