"""`forja bench agent`: does training on a few corrected traces teach the model to use its tools? A persona with
the calculator and current_time answers held-out questions through the agent loop before and after a version is
trained on tool-calling conversations (other numbers and cities, the same shapes), on each backend asked for, in
one command: arithmetic (one step) and the time in a city then arithmetic (two steps); how many made the right
calls in order, and how many answers hold the right number.
"""

from __future__ import annotations

import json
import operator
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forja.agents.builtin import SPECS, current_time
from forja.config import ForjaError, Persona, Settings


class BenchError(ForjaError):
    """The benchmark's server refused a question (the message says why)."""


SYSTEM = ("You are a shop assistant. For any arithmetic call the calculator tool with the expression; for the "
          "time somewhere call current_time with its time zone.")
OPERATIONS = {"*": operator.mul, "+": operator.add, "-": operator.sub}
CITIES = {"Tokyo": "Asia/Tokyo", "Madrid": "Europe/Madrid", "New York": "America/New_York", "Lima": "America/Lima",
          "Mexico City": "America/Mexico_City", "Buenos Aires": "America/Argentina/Buenos_Aires",
          "London": "Europe/London", "Sydney": "Australia/Sydney"}
KINDS = ("one_step", "two_steps")  # the calculator alone; the time in a city, then the calculator


@dataclass(frozen=True)
class Task:
    a: int
    op: str
    b: int
    city: str | None = None  # two_steps: the time here first

    @property
    def kind(self) -> str:
        return "two_steps" if self.city else "one_step"

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def value(self) -> int:
        return OPERATIONS[self.op](self.a, self.b)

    @property
    def question(self) -> str:
        if self.city:
            return f"What time is it in {self.city}? And how much is {self.expression}?"
        return f"How much is {self.expression}?"

    @property
    def tools(self) -> list[str]:
        """The tools a right answer calls, in order."""
        return ["current_time", "calculator"] if self.city else ["calculator"]


def tasks(count: int, seed: int) -> list[Task]:
    """`count` tasks, every other one of two steps."""
    chance = random.Random(seed)
    return [Task(chance.randint(11, 999), chance.choice(list(OPERATIONS)), chance.randint(11, 99),
                 chance.choice(list(CITIES)) if i % 2 else None) for i in range(count)]


def _call(number: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{number}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def trace(task: Task) -> dict[str, Any]:
    """A corrected trace in OpenAI's fine-tuning format: the call (the time first, for a two-step task), its
    result, the next call, its result, the answer."""
    tools = [{"type": "function", "function": {"name": name, **SPECS[name]}} for name in ("calculator", "current_time")]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.question}]
    answer = f"{task.expression} is {task.value}."
    if task.city:
        now = current_time({"timezone": CITIES[task.city]})
        messages += [{"role": "assistant", "content": "", "tool_calls": [_call(1, "current_time", {"timezone": CITIES[task.city]})]},
                     {"role": "tool", "tool_call_id": "call_1", "content": now}]
        answer = f"In {task.city} it is {now.split()[2][:5]}. {answer}"
    messages += [{"role": "assistant", "content": "", "tool_calls": [_call(2, "calculator", {"expression": task.expression})]},
                 {"role": "tool", "tool_call_id": "call_2", "content": f"{task.expression} = {task.value}"},
                 {"role": "assistant", "content": answer}]
    return {"tools": tools, "messages": messages}


def agent_benchmark(settings: Settings, base: str, *, traces: int = 12, held_out: int = 12, steps: int = 60,
                    seed: int = 1, backends: tuple[str, ...] = ("pytorch",),
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `base` on `traces` corrected traces, then ask `held_out` other questions (half of them of two steps)
    to a persona with the calculator and current_time, on `base` and on the new version, on each backend; per
    backend, persona and kind: the tasks asked, those whose calls were the right tools in order (`called`), and
    those whose answer holds the right number (`right`); and the training time."""
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
                                               "max_seq_length": max(settings.train.max_seq_length, 2048)})
    train(settings, new_run(settings, [data], name, base, config), progress=False)
    seconds = time.perf_counter() - started
    personas = [Persona(name=persona, model=model, system=SYSTEM, tools=["calculator", "current_time"], max_steps=3)
                for persona, model in (("before", base), ("after", name))]
    results: dict[str, Any] = {"base": base, "version": name, "traces": traces, "held_out": held_out,
                               "steps": steps, "train_seconds": round(seconds, 1), "backends": {}}
    for backend in backends:
        served = settings.model_copy(update={
            "serve": settings.serve.model_copy(update={"personas": personas, "backend": backend}),
            "jobs": settings.jobs.model_copy(update={"run_in_server": False})})
        app = create_app(served, base)
        figures: dict[str, Any] = {}
        with TestClient(app) as client:
            while not app.state.forja.ready:  # the model loads in the background
                if app.state.forja.load_error:
                    raise BenchError(f"{base}: {app.state.forja.load_error}")
                time.sleep(0.1)
            for persona in ("before", "after"):
                counts = {kind: {"asked": 0, "called": 0, "right": 0} for kind in KINDS}
                for task in asked:
                    reply = client.post("/v1/chat/completions", json={
                        "model": persona, "messages": [{"role": "user", "content": task.question}], "max_tokens": 48,
                        "temperature": 0}).json()
                    if "error" in reply:
                        raise BenchError(f"{persona} ({backend}): {reply['error']['message']}")
                    made = [s["tool"] for s in reply["forja"]["steps"]]
                    count = counts[task.kind]
                    count["asked"] += 1
                    count["called"] += made == task.tools
                    count["right"] += str(task.value) in (reply["choices"][0]["message"]["content"] or "")
                figures[persona] = counts
                log(f"{backend} {persona}: " + "; ".join(f"{kind} called {c['called']}/{c['asked']}, right {c['right']}/{c['asked']}"
                                                          for kind, c in counts.items()))
        results["backends"][backend] = figures
    return results


def render_agent(results: dict[str, Any]) -> str:
    from forja.models import cpu_line

    lines = [f"agent loop on {results['base']}: {results['held_out']} held-out questions (one step: the calculator; "
             f"two steps: current_time, then the calculator), a persona with both tools ({cpu_line()})",
             f"trained {results['steps']} steps on {results['traces']} traces ({results['train_seconds']} s, version "
             f"{results['version']}); called = the right tools in order, right = the right number in the answer"]
    for backend, figures in results["backends"].items():
        for persona in ("before", "after"):
            told = "; ".join(f"{kind.replace('_', ' ')}: called {c['called']}/{c['asked']}, right {c['right']}/{c['asked']}"
                             for kind, c in figures[persona].items() if c["asked"])
            lines.append(f"  {backend:8} {persona + ' training':16} {told}")
    return "\n".join(lines)
