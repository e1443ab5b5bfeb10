"""`forja bench agent`: does training on a few corrected traces teach the model to use its tools? A persona with
the calculator answers held-out arithmetic questions through the agent loop before and after a version is
trained on tool-calling conversations (other numbers, the same shape), in one command: how many called the
calculator, and how many answers hold the right number.
"""

from __future__ import annotations

import json
import operator
import random
import time
from collections.abc import Callable
from typing import Any

from forja.agents.builtin import SPECS
from forja.config import ForjaError, Persona, Settings

class BenchError(ForjaError):
    """The benchmark's server refused a question (the message says why)."""


SYSTEM = "You are a shop assistant. For any arithmetic call the calculator tool with the expression."
OPERATIONS = {"*": operator.mul, "+": operator.add, "-": operator.sub}


def tasks(count: int, seed: int) -> list[tuple[int, str, int]]:
    chance = random.Random(seed)
    return [(chance.randint(11, 999), chance.choice(list(OPERATIONS)), chance.randint(11, 99)) for _ in range(count)]


def question(task: tuple[int, str, int]) -> str:
    a, op, b = task
    return f"How much is {a} {op} {b}?"


def value(task: tuple[int, str, int]) -> int:
    a, op, b = task
    return OPERATIONS[op](a, b)


def trace(task: tuple[int, str, int]) -> dict[str, Any]:
    """A corrected trace in OpenAI's fine-tuning format: the call, its result, the answer."""
    expression = f"{task[0]} {task[1]} {task[2]}"
    tools = [{"type": "function", "function": {"name": "calculator", **SPECS["calculator"]}}]
    return {"tools": tools, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question(task)},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "calculator", "arguments": json.dumps({"expression": expression})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"{expression} = {value(task)}"},
        {"role": "assistant", "content": f"{expression} is {value(task)}."}]}


def agent_benchmark(settings: Settings, base: str, *, traces: int = 12, held_out: int = 12, steps: int = 60,
                    seed: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `base` on `traces` corrected traces, then ask `held_out` other questions to a calculator persona on
    `base` and on the new version; the counts, and the training time."""
    from fastapi.testclient import TestClient

    from forja.serve.app import create_app
    from forja.train import new_run, train

    learn, asked = tasks(traces, seed), tasks(held_out, seed + 1)
    name = f"bench-agent-{time.strftime('%Y%m%d-%H%M%S')}"
    data = settings.runs_dir / f"{name}-traces.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(trace(t), ensure_ascii=False) + "\n" for t in learn), encoding="utf-8")
    log(f"training {name} on {traces} traces, {steps} steps")
    started = time.perf_counter()
    config = settings.train.model_copy(update={"max_steps": steps, "eval_every": None, "checkpoint_every": None,
                                               "max_seq_length": max(settings.train.max_seq_length, 1024)})
    train(settings, new_run(settings, [data], name, base, config), progress=False)
    seconds = time.perf_counter() - started
    personas = [{"name": "before", "model": base, "system": SYSTEM, "tools": ["calculator"], "max_steps": 2},
                {"name": "after", "model": name, "system": SYSTEM, "tools": ["calculator"], "max_steps": 2}]
    served = settings.model_copy(update={
        "serve": settings.serve.model_copy(update={"personas": [Persona(**p) for p in personas]}),
        "jobs": settings.jobs.model_copy(update={"run_in_server": False})})
    results: dict[str, Any] = {"base": base, "version": name, "traces": traces, "held_out": held_out,
                               "steps": steps, "train_seconds": round(seconds, 1)}
    app = create_app(served, base)
    with TestClient(app) as client:
        while not app.state.forja.ready:  # the model loads in the background
            if app.state.forja.load_error:
                raise BenchError(f"{base}: {app.state.forja.load_error}")
            time.sleep(0.1)
        for persona in ("before", "after"):
            called = right = 0
            for task in asked:
                reply = client.post("/v1/chat/completions", json={
                    "model": persona, "messages": [{"role": "user", "content": question(task)}], "max_tokens": 40,
                    "temperature": 0}).json()
                if "error" in reply:
                    raise BenchError(f"{persona}: {reply['error']['message']}")
                steps_taken = reply["forja"]["steps"]
                called += bool(steps_taken)
                right += str(value(task)) in (reply["choices"][0]["message"]["content"] or "")
            results[persona] = {"called": called, "right": right}
            log(f"{persona}: called the calculator {called}/{held_out}, right answer {right}/{held_out}")
    return results


def render_agent(results: dict[str, Any]) -> str:
    from forja.models import cpu_line

    n = results["held_out"]
    return "\n".join([
        f"agent loop on {results['base']}: {n} held-out arithmetic questions, a calculator persona ({cpu_line()})",
        f"  before training: called {results['before']['called']}/{n}, right answer {results['before']['right']}/{n}",
        f"  after {results['steps']} steps on {results['traces']} traces ({results['train_seconds']} s, version "
        f"{results['version']}): called {results['after']['called']}/{n}, right answer {results['after']['right']}/{n}",
    ])
