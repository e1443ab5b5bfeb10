"""Benchmarks: `forja bench serve` measures the server (single stream, then concurrent streams);
`forja bench agreement` compares llama.cpp's answers with PyTorch's; `forja bench repetition` counts answers
that loop per repetition penalty. `forja bench train` lives in bench_train.py.

Each benchmark is one self-contained function returning a dict of figures; the CLI prints them.
Speed is a ratio measured within one command, never an absolute target in a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SERVE_TOPICS = ["a bakery in Madrid", "the history of bread", "a trip to Paris", "how rain forms",
                "a cat who learns to code", "the first day at a new school", "a lighthouse keeper", "making coffee"]


def story_prompts(clients: int, verb: str = "Write") -> list[str]:
    """One prompt per client, each on a topic of SERVE_TOPICS in turn; another verb makes others as long."""
    return [f"{verb} a long story about {SERVE_TOPICS[i % len(SERVE_TOPICS)]}." for i in range(clients)]


def serve_benchmark(settings: Any, model: str | None = None, *, clients: int = 8, max_tokens: int = 64,
                    compare_alone: bool = True, backends: list[str] | None = None,
                    reference_server: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Start `forja serve` on `model` once per backend (in a subprocess) and measure it: one stream,
    then `clients` concurrent streams, each ROUNDS times (medians). For scale, also: the plain decode
    loops (transformers' `model.generate`, forja's engine with one request, in process) and the bare model's decode step
    (PyTorch); llama-cpp-python's own `create_chat_completion` on the same GGUF file and the
    memory-bandwidth bound (llama.cpp); with `reference_server` (a llama-server binary), llama.cpp's own
    server on that file, measured the same way. Greedy throughout, so batched answers can be compared
    with the same prompt served alone."""
    from forja.engine import llamacpp

    model = model or settings.model
    backends = backends or (["llamacpp", "pytorch"] if llamacpp.available() else ["pytorch"])
    prompts = story_prompts(clients)
    results: dict[str, Any] = {"model": model, "clients": clients, "max_tokens": max_tokens, "backends": {}}
    for backend in backends:
        if backend == "pytorch":
            results.update(_pytorch_baselines(settings, model, prompts[0], clients, max_tokens, log))
        else:
            results.update(_llamacpp_baselines(settings, model, prompts[0], clients, max_tokens, log))
        results["backends"][backend] = _serve_figures(settings, model, backend, prompts, max_tokens, compare_alone, log)
    results["streaming_cost"] = streaming_cost(settings, model)
    if reference_server:
        results["reference_server"] = _reference_server_figures(settings, model, reference_server, prompts, max_tokens,
                                                                compare_alone, log)
    return results


def _serve_figures(settings: Any, model: str, backend: str, prompts: list[str], max_tokens: int, compare_alone: bool,
                   log: Any) -> dict[str, Any]:
    """One `forja serve --backend X` subprocess: single stream, with and without the guardrails, N concurrent
    streams, batched vs alone."""

    # a persona without guardrails, to measure what the rails add on the same server
    personas = json.dumps([{"name": UNGUARDED, "description": "forja bench: guardrails off", "guard": {"enabled": False}}])
    figures: dict[str, Any] = {}
    with forja_server(model, backend, {"FORJA_SERVE__PERSONAS": personas}, log) as url:
        asyncio.run(_stream(url, model, prompts[0], 8))  # warm-up
        log(f"{backend}: one stream, {ROUNDS} times with and {ROUNDS} without the guardrails, alternating ...")
        on, off = [], []
        for _ in range(ROUNDS):
            on.append(asyncio.run(_stream(url, model, prompts[0], max_tokens)))
            off.append(asyncio.run(_stream(url, UNGUARDED, prompts[0], max_tokens)))
        figures["single"] = _single_figures(on)
        figures["guardrails"] = _guardrail_latency(on, off)
        log(f"{backend}: {len(prompts)} concurrent streams, {ROUNDS} rounds ...")
        rounds = _concurrent_rounds(url, model, prompts, max_tokens)
        answers = rounds[0][0]
        ok = [a for a in answers if _answered(a)]
        if ok:
            figures["guardrails"]["cpu"] = guard_cpu_cost(settings, prompts, [a["text"] for a in ok])
        figures["concurrent"] = _concurrent_figures(rounds)
        # the same rounds on the unguarded persona, with prompts of their own so that its first round also
        # meets prompts no slot holds yet: what the output rails' held word costs the time to first token
        log(f"{backend}: {len(prompts)} concurrent streams with the guardrails off, {ROUNDS} rounds ...")
        unguarded = story_prompts(len(prompts), verb="Tell")
        figures["concurrent_unguarded"] = _concurrent_figures(_concurrent_rounds(url, UNGUARDED, unguarded, max_tokens))
        figures["ratio_aggregate_to_single"] = round(figures["concurrent"]["aggregate_tokens_per_s"]
                                                     / max(figures["single"]["tokens_per_s"], 1e-9), 2)
        if compare_alone and ok:
            log(f"{backend}: each prompt alone, to compare the batched answers ...")
            figures["batched_equals_alone"] = _batched_equals_alone(url, model, [
                (prompt, answer) for prompt, answer in zip(prompts, answers) if _answered(answer)], max_tokens)
    return figures


@contextmanager
def forja_server(model: str, backend: str, env: dict[str, str] | None = None, log: Any = print) -> Iterator[str]:
    """A `forja serve --model MODEL --backend BACKEND` subprocess on a free port, ready: its URL; stopped after."""
    with forja_server_process(model, backend, env, log) as (url, _):
        yield url


@contextmanager
def forja_server_process(model: str, backend: str, env: dict[str, str] | None = None,
                         log: Any = print) -> Iterator[tuple[str, subprocess.Popen]]:
    """As forja_server, with the process too (its memory is read from /proc)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"starting forja serve --backend {backend} on {url} ...")
    server = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--model", model, "--port", str(port),
                               "--backend", backend],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        _wait_ready(url, server)
        yield url, server
    finally:
        stop(server)


# ------------------------------------------------------------------------------------------------
# `forja bench serve --adapters N`: several LoRA assistants of one base on one server

ADAPTER_ANSWERS = ["Abrimos de lunes a sábado, de 7 a 14 h.", "Reinicie el router y espere dos minutos.",
                   "El envío tarda de dos a tres días laborables.", "Puede pagar con tarjeta o en efectivo.",
                   "La garantía cubre dos años desde la compra.", "Escríbanos a la dirección de soporte."]
ADAPTER_QUESTIONS = ["¿Cuál es el horario?", "No funciona, ¿qué hago?", "¿Cuánto tarda?"]


def adapters_benchmark(settings: Any, model: str | None = None, *, adapters: int = 3, clients: int = 6,
                       max_tokens: int = 32, backends: list[str] | None = None, train_steps: int = 3,
                       log: Any = print) -> dict[str, Any]:
    """Train `adapters` tiny LoRA versions of `model` (a few steps each, in a temporary FORJA_HOME) and serve
    them: the resident memory (RSS) of a server answering all of them as adapters on one base (serve.share_base)
    against a server answering one of them (merged, as a model of its own) and against all of them merged;
    and the aggregate tokens/s of `clients` streams sent together, spread over every assistant vs all to one."""
    import tempfile

    from forja.engine import llamacpp

    model = model or settings.model
    backends = backends or (["llamacpp", "pytorch"] if llamacpp.available() else ["pytorch"])
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": model, "adapters": adapters, "clients": clients, "max_tokens": max_tokens,
                               "train_steps": train_steps, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-", dir=settings.cache_dir) as tmp:
        home = Path(tmp)
        converted = settings.models_dir / "converted"  # the bundled model's HF copy: converted once, shared
        converted.mkdir(parents=True, exist_ok=True)
        (home / "models").mkdir()
        (home / "models" / "converted").symlink_to(converted)
        bench = settings.model_copy(update={"home": home})
        names = _train_assistants(bench, model, adapters, train_steps, log)
        results["versions"] = names
        for backend in backends:
            results["backends"][backend] = _adapter_figures(home, names, backend, clients, max_tokens, log)
    return results


def _train_assistants(settings: Any, model: str, count: int, steps: int, log: Any) -> list[str]:
    """`count` LoRA versions of `model`, each trained `steps` steps on its own answers."""
    from forja.config import TrainSettings
    from forja.train import new_run, train

    names = []
    for index in range(count):
        name = f"bench-assistant-{index + 1}"
        log(f"training {name} ({steps} LoRA steps on {model}) ...")
        data = settings.home / f"{name}.jsonl"
        answer = ADAPTER_ANSWERS[index % len(ADAPTER_ANSWERS)]
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": answer}]}) + "\n"
                                for q in ADAPTER_QUESTIONS), encoding="utf-8")
        # a few plain steps: what is measured is serving them, not how well they learned
        hyper = TrainSettings(method="lora", max_steps=steps, learning_rate=1e-3, eval_every=None,
                              checkpoint_every=None, stop_when_learned=False, faq_retrieval=False)
        train(settings, new_run(settings, [data], name, model, hyper), progress=False)
        names.append(name)
    return names


def _adapter_figures(home: Path, names: list[str], backend: str, clients: int, max_tokens: int,
                     log: Any) -> dict[str, Any]:
    """Three servers on one backend: one assistant merged; every assistant shared on one base; every assistant
    merged. RSS once each assistant has answered; throughput of streams mixed over the assistants vs to one."""
    prompts = story_prompts(clients)
    mixed = [names[i % len(names)] for i in range(clients)]
    figures: dict[str, Any] = {}
    for label, share, served in (("one_merged", False, names[:1]), ("all_shared", True, names),
                                 ("all_merged", False, names)):
        env = {"FORJA_HOME": str(home), "FORJA_SERVE__SHARE_BASE": "true" if share else "false"}
        with forja_server_process(names[0], backend, env, log) as (url, process):
            for name in served:  # loads each assistant (as an adapter, or a model of its own) and warms it
                asyncio.run(_stream(url, name, prompts[0], 4))
            entry: dict[str, Any] = {"assistants": len(served), "rss_mib": _rss_mib(process.pid)}
            if label != "one_merged":
                log(f"{backend} {label}: {clients} streams over {len(served)} assistants, then all to one, "
                    f"{ROUNDS} rounds each ...")
                entry["mixed"] = _rounds_with_cpu(process.pid, url, mixed, prompts, max_tokens)
                entry["one"] = _rounds_with_cpu(process.pid, url, [names[0]] * clients, prompts, max_tokens)
                entry["rss_after_mib"] = _rss_mib(process.pid)
            figures[label] = entry
    one = figures["one_merged"]["rss_mib"]
    figures["ratio_shared_to_one"] = round(figures["all_shared"]["rss_mib"] / one, 2)
    figures["ratio_merged_to_one"] = round(figures["all_merged"]["rss_mib"] / one, 2)
    shared = figures["all_shared"]
    figures["ratio_mixed_to_one_assistant"] = round(shared["mixed"]["aggregate_tokens_per_s"]
                                                    / max(shared["one"]["aggregate_tokens_per_s"], 1e-9), 2)
    figures["cpu_ratio_mixed_to_one_assistant"] = round(shared["mixed"]["cpu_ms_per_token"]
                                                        / max(shared["one"]["cpu_ms_per_token"], 1e-9), 2)
    return figures


def _rounds_with_cpu(pid: int, url: str, models: list[str], prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """ROUNDS mixed rounds: the concurrent figures, and the server's CPU time per generated token over all of
    them (on a machine other processes share, wall-clock rates are noise; CPU time mostly is not)."""
    before = _cpu_seconds(pid)
    rounds = [_mixed_round(url, models, prompts, max_tokens) for _ in range(ROUNDS)]
    spent = _cpu_seconds(pid) - before
    tokens = sum(a["tokens"] for answers, _ in rounds for a in answers if _answered(a))
    return {**_concurrent_figures(rounds), "cpu_ms_per_token": round(1000 * spent / max(tokens, 1), 2)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mixed_round(url: str, models: list[str], prompts: list[str], max_tokens: int) -> tuple[list[Any], float]:
    """Prompt i streamed to models[i], all at once over one client: the answers and the wall time."""
    import httpx

    async def together() -> tuple[list[Any], float]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as http:
            begin = time.perf_counter()
            answers = await asyncio.gather(*[_stream(url, m, p, max_tokens, http) for m, p in zip(models, prompts)],
                                           return_exceptions=True)
            return answers, time.perf_counter() - begin

    return asyncio.run(together())


def _rss_mib(pid: int) -> float:
    """A process's resident memory (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def render_adapters(results: dict[str, Any]) -> str:
    n, k = results["clients"], results["adapters"]
    rows: list[tuple[str, str, str]] = []
    for backend, f in results["backends"].items():
        one, shared, merged = f["one_merged"], f["all_shared"], f["all_merged"]
        rows += [
            (f"{backend}: RSS, 1 assistant (merged, alone)", f"{one['rss_mib']:.0f} MiB", ""),
            (f"{backend}: RSS, {k} assistants sharing the base", f"{shared['rss_mib']:.0f} MiB",
             f"{f['ratio_shared_to_one']:.2f}x one (target <= 1.3x); {shared['rss_after_mib']:.0f} MiB after the runs"),
            (f"{backend}: RSS, {k} assistants merged", f"{merged['rss_mib']:.0f} MiB",
             f"{f['ratio_merged_to_one']:.2f}x one (serve.share_base: false)"),
            (f"  shared: {n} streams mixed over {k} assistants", f"{shared['mixed']['aggregate_tokens_per_s']:.1f} tokens/s",
             f"{shared['mixed']['cpu_ms_per_token']:.1f} CPU ms/token; {shared['mixed']['errors']} errors; "
             f"median of {_runs(shared['mixed']['rounds_tokens_per_s'])}"),
            (f"  shared: {n} streams to one assistant", f"{shared['one']['aggregate_tokens_per_s']:.1f} tokens/s",
             f"{shared['one']['cpu_ms_per_token']:.1f} CPU ms/token; median of {_runs(shared['one']['rounds_tokens_per_s'])}"),
            ("  mixed / one assistant", f"{f['ratio_mixed_to_one_assistant']:.2f}x",
             f"CPU per token {f['cpu_ratio_mixed_to_one_assistant']:.2f}x; PyTorch: one batch for all, llama.cpp: "
             "one llama_decode per adapter per step"),
            (f"  merged: {n} streams mixed over {k} assistants", f"{merged['mixed']['aggregate_tokens_per_s']:.1f} tokens/s",
             f"{merged['mixed']['cpu_ms_per_token']:.1f} CPU ms/token; {merged['mixed']['errors']} errors; "
             "one engine per assistant"),
        ]
    width = max(len(r[0]) for r in rows)
    head = (f"forja bench serve --adapters {k}: {results['model']}, {k} LoRA versions trained {results['train_steps']} "
            f"steps each, {results['max_tokens']} new tokens per answer, greedy")
    return "\n".join([head] + [f"{a:<{width}}  {b:<16} {c}".rstrip() for a, b, c in rows])


def upstream_benchmark(upstream_url: str, *, model: str = "upstream", clients: int = 4, max_tokens: int = 64,
                       rounds: int = 5, log: Any = print) -> dict[str, Any]:
    """What forja adds in front of an OpenAI-compatible upstream: the same greedy streamed requests sent to the
    upstream directly and through a `forja serve --backend openai` subprocess (its rails on, the penalty off so
    both ask the same), alternated, `rounds` times: one request alone, then (when `clients` > 1, for an upstream
    that serves several at once: not llama-cpp-python's, which interrupts one stream for the next) `clients`
    at once. Medians."""
    base = upstream_url.rstrip("/").removesuffix("/v1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FORJA_SERVE__BACKEND": "openai", "FORJA_SERVE__UPSTREAM_URL": base + "/v1",
           "FORJA_GENERATE__FREQUENCY_PENALTY": "0"}
    log(f"starting forja serve --backend openai on {url} in front of {base} ...")
    server = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--model", model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    prompts = story_prompts(clients)
    single: dict[str, list[dict[str, Any]]] = {"direct": [], "forja": []}
    together: dict[str, list[float]] = {"direct": [], "forja": []}
    try:
        _wait_ready(url, server)
        for target in (base, url):  # warm-up
            asyncio.run(_stream(target, model, prompts[0], 8))
        for index in range(rounds):
            log(f"round {index + 1}/{rounds}: one request{f', then {clients} at once' if clients > 1 else ''}, "
                "direct and through forja ...")
            for name, target in (("direct", base), ("forja", url)):
                single[name].append(asyncio.run(_stream(target, model, prompts[0], max_tokens)))
            for name, target in (("direct", base), ("forja", url)) if clients > 1 else ():
                answers, wall = _concurrent_rounds_once(target, model, prompts, max_tokens)
                if not all(_answered(a) for a in answers):
                    raise RuntimeError(f"{name}: a request failed: {answers}")
                together[name].append(wall)
    finally:
        stop(server)
    same = sum(a["text"] == b["text"] for a, b in zip(single["direct"], single["forja"]))
    figures: dict[str, Any] = {"upstream": base, "clients": clients, "max_tokens": max_tokens, "rounds": rounds,
                               "same_answers": f"{same}/{rounds}"}
    for name in ("direct", "forja"):
        runs = single[name]
        figures[name] = {"ttft_s": round(statistics.median(r["ttft"] for r in runs), 4),
                         "total_s": round(statistics.median(r["total"] for r in runs), 4)}
        if together[name]:
            figures[name]["together_wall_s"] = round(statistics.median(together[name]), 4)
    for key in figures["direct"]:
        figures[f"ratio_{key}"] = round(figures["forja"][key] / max(figures["direct"][key], 1e-9), 3)
    return figures


def render_upstream(figures: dict[str, Any]) -> str:
    lines = [f"forja in front of {figures['upstream']}: greedy, {figures['max_tokens']} new tokens, medians of "
             f"{figures['rounds']} alternated rounds; same answer both ways {figures['same_answers']}",
             "", "| | direct | through forja | ratio |", "|---|---|---|---|"]
    for key, label in (("ttft_s", "one request: first token, s"), ("total_s", "one request: whole answer, s"),
                       ("together_wall_s", f"{figures['clients']} at once: wall time, s")):
        if key in figures["direct"]:
            lines.append(f"| {label} | {figures['direct'][key]} | {figures['forja'][key]} | {figures[f'ratio_{key}']} |")
    return "\n".join(lines)


def _concurrent_rounds_once(url: str, model: str, prompts: list[str], max_tokens: int) -> tuple[list[Any], float]:
    """Every prompt streamed at once over one client: the answers and the wall time."""
    import httpx

    async def together() -> tuple[list[Any], float]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as http:
            begin = time.perf_counter()
            answers = await asyncio.gather(*[_stream(url, model, p, max_tokens, http) for p in prompts],
                                           return_exceptions=True)
            return answers, time.perf_counter() - begin

    return asyncio.run(together())


def _batched_equals_alone(url: str, model: str, answered: list[tuple[str, dict[str, Any]]],
                          max_tokens: int) -> dict[str, Any]:
    """Each prompt asked again alone: how many batched answers are identical, and the least shared share."""
    from forja.models import common_prefix

    agree = []
    for prompt, answer in answered:
        alone = asyncio.run(_stream(url, model, prompt, max_tokens))
        agree.append(common_prefix(answer["text"], alone["text"]) / max(len(alone["text"]), 1))
    return {"identical": sum(a == 1.0 for a in agree), "of": len(agree), "min_agreeing_share": round(min(agree), 3)}


def _single_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One stream, several runs: the median run's figures, and every run's rate."""
    middle = sorted(runs, key=lambda run: run["rate"])[len(runs) // 2]
    return {"tokens": middle["tokens"], "ttft_s": round(middle["ttft"], 3), "total_s": round(middle["total"], 3),
            "tokens_per_s": round(middle["rate"], 2), "runs_tokens_per_s": [round(run["rate"], 2) for run in runs]}


def _concurrent_rounds(url: str, model: str, prompts: list[str], max_tokens: int) -> list[tuple[list[Any], float]]:
    """ROUNDS rounds of every prompt streamed at once over one client: each round's answers and wall time."""
    return [_concurrent_rounds_once(url, model, prompts, max_tokens) for _ in range(ROUNDS)]


UNGUARDED = "forja-bench-unguarded"
ROUNDS = 3  # each serving figure is the median of this many runs: one run on a shared 2-core machine is noise


def _concurrent_figures(rounds: list[tuple[list[Any], float]]) -> dict[str, Any]:
    """N streams sent together, several rounds: the median round's aggregate tokens/s; time to first token
    and total latency percentiles over every stream of every round."""
    ok = [[a for a in answers if _answered(a)] for answers, _ in rounds]
    rates = [sum(a["tokens"] for a in streams) / wall for streams, (_, wall) in zip(ok, rounds)]
    middle = sorted(range(len(rounds)), key=lambda i: rates[i])[len(rounds) // 2]
    every = [a for streams in ok for a in streams]
    ttfts, totals = sorted(a["ttft"] for a in every), sorted(a["total"] for a in every)
    later = sorted(a["ttft"] for streams in ok[1:] for a in streams)  # prompts a slot still holds from round 1
    return {
        "errors": sum(len(answers) for answers, _ in rounds) - len(every),
        "tokens": sum(a["tokens"] for a in ok[middle]), "wall_s": round(rounds[middle][1], 3),
        "aggregate_tokens_per_s": round(rates[middle], 2), "rounds_tokens_per_s": [round(r, 2) for r in rates],
        "ttft_p50_s": round(_pct(ttfts, 50), 3), "ttft_p95_s": round(_pct(ttfts, 95), 3),
        "ttft_p50_first_round_s": round(_pct(sorted(a["ttft"] for a in ok[0]), 50), 3) if ok[0] else None,
        "ttft_p50_later_rounds_s": round(_pct(later, 50), 3) if later else None,
        "latency_p50_s": round(_pct(totals, 50), 3), "latency_p95_s": round(_pct(totals, 95), 3),
    }


def _answered(answer: Any) -> bool:
    """A stream that ended with an answer (not an exception from gather, nor an error event)."""
    return isinstance(answer, dict) and not answer.get("error")


def _guardrail_latency(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    """What the rails add to one streamed request: the same prompt with the rails on (the model itself)
    and off (a persona with `guard.enabled: false`), alternated on one server; medians of each."""

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {"rounds": len(on), "ttft_on_s": round(median(on, "ttft"), 4), "ttft_off_s": round(median(off, "ttft"), 4),
            "total_on_s": round(median(on, "total"), 4), "total_off_s": round(median(off, "total"), 4),
            "added_ms": round((median(on, "total") - median(off, "total")) * 1000, 1),
            "same_answer": all(a["text"] == b["text"] for a, b in zip(on, off))}


def guard_cpu_cost(settings: Any, prompts: list[str], answers: list[str], repeats: int = 20) -> dict[str, Any]:
    """CPU time of the rails alone (no model): input rails on each prompt, output rails on each answer fed
    in 4-character pieces as a stream would; mean milliseconds per request."""
    from forja.guard import Guards

    guard = Guards(settings).for_persona()
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    begin = time.perf_counter()
    for _ in range(repeats):
        for conversation in conversations:
            guard.check_input(conversation)
    input_ms = (time.perf_counter() - begin) * 1000 / (repeats * len(prompts))
    begin = time.perf_counter()
    for _ in range(repeats):
        for conversation, answer in zip(conversations, answers):
            stream = guard.output_filter(conversation)
            for i in range(0, len(answer), 4):
                stream.feed(answer[i:i + 4])
            stream.finish()
    output_ms = (time.perf_counter() - begin) * 1000 / (repeats * len(answers))
    return {"input_ms": round(input_ms, 3), "output_ms": round(output_ms, 3),
            "answer_chars": round(statistics.mean(len(a) for a in answers), 1)}


def _pytorch_baselines(settings: Any, model: str, prompt: str, clients: int, max_tokens: int,
                       log: Any) -> dict[str, Any]:
    """The plain decode loops the server is held against, on the model as loaded (plain torch matmuls):
    transformers' own `model.generate` and forja's PyTorch engine with one request (in process, weights not
    packed, like the model `generate` runs), alternated, medians of ROUNDS runs each. Then the bare model's
    decode step for 1 and N rows, before and after the engine's weight packing."""
    from forja import models
    from forja.engine import SamplingParams, answer, run_coroutine
    from forja.engine.pytorch import PyTorchEngine, pack_linears
    from forja.engine.text import chat_messages, chat_prompt_ids

    log(f"loading {model} for the plain generate baselines ...")
    loaded = models.load(model, settings)
    ids = chat_prompt_ids(loaded.tokenizer, chat_messages(prompt))
    engine = PyTorchEngine(loaded, max_batch_size=1, pack=False, name="bench")

    def ours(new_tokens: int) -> dict[str, Any]:
        stamps = [time.perf_counter()]
        reply = run_coroutine(lambda: answer(engine, chat_messages(prompt), SamplingParams(max_new_tokens=new_tokens),
                                             lambda _: stamps.append(time.perf_counter())))
        return _loop_figures(reply.usage.completion_tokens, stamps)

    ours(8), _hf_generate(loaded, ids, 8)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {"hf_generate": [], "generate": []}
    for _ in range(ROUNDS):
        runs["hf_generate"].append(_hf_generate(loaded, ids, max_tokens))
        runs["generate"].append(ours(max_tokens))
    figures: dict[str, Any] = {"dtype": loaded.info["dtype"]}
    for name, done in runs.items():
        figures[name] = {**sorted(done, key=lambda run: run["tokens_per_s"])[len(done) // 2],
                         "runs_tokens_per_s": [run["tokens_per_s"] for run in done]}
    engine.close()
    figures["bare_step"] = _bare_decode_steps(loaded, ids, clients)
    if pack_linears(loaded.model, clients):
        figures["bare_step_packed"] = _bare_decode_steps(loaded, ids, clients)
    return figures


def _hf_generate(loaded: Any, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
    """transformers' `model.generate`, greedy, with a streamer that stamps each new token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())  # the first put is the prompt itself

        def end(self) -> None:
            pass

    stamps = Stamps()
    model = loaded.model
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids], device=model.device), max_new_tokens=new_tokens,
                             do_sample=False, streamer=stamps, pad_token_id=loaded.tokenizer.pad_token_id)
    return _loop_figures(out.shape[1] - len(prompt_ids), stamps.times)


def _loop_figures(tokens: int, stamps: list[float]) -> dict[str, Any]:
    """`stamps`: the start, then one time per streamed piece; decode rate after the first one, as for the server."""
    first = stamps[1] if len(stamps) > 1 else None
    return {"tokens": tokens, "seconds": round(stamps[-1] - stamps[0], 3),
            "tokens_per_s": round(_decode_rate(tokens, first, stamps[-1]), 2)}


def _llamacpp_baselines(settings: Any, model: str, prompt: str, clients: int, max_tokens: int,
                        log: Any) -> dict[str, Any]:
    """llama-cpp-python's high-level API on the file the backend serves (the reference), one bare
    llama_decode step for 1 and N sequences (the ceiling of batching with llama.cpp here) and the
    memory-bandwidth bound of one decode step (every weight byte read once per token)."""
    import gguf
    import llama_cpp

    from forja import models
    from forja.engine.llamacpp import LlamaCppEngine
    from forja.export import served_gguf

    path = served_gguf(settings, model, settings.serve.gguf_quant)
    log(f"bare llama_decode steps on {path.name} ...")
    engine = LlamaCppEngine(path, models.load_tokenizer(model, settings), name="bench", max_batch_size=clients,
                            kv_tokens=4096, threads=settings.threads)
    try:
        bare = _bare_llamacpp_steps(engine, clients)
    finally:
        engine.close()
    weight_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    log(f"llama-cpp-python directly on {path.name} ...")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=settings.threads or os.cpu_count(),
                          verbose=False)
    messages = [{"role": "user", "content": prompt}]
    list(llm.create_chat_completion(messages, max_tokens=8, temperature=0, stream=True))  # warm-up
    began = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            last = time.perf_counter()
            tokens += 1  # one chunk per token
    del llm
    bandwidth = _memory_bandwidth()
    return {
        "gguf": {"file": str(path), "weight_bytes": weight_bytes},
        "bare_llamacpp_step": bare,
        "llamacpp_direct": {"tokens": tokens, "ttft_s": round((first or began) - began, 3),
                            "tokens_per_s": round(_decode_rate(tokens, first, last or began), 2)},
        "bandwidth": {"gb_per_s": round(bandwidth / 1e9, 2),
                      "bound_tokens_per_s": round(bandwidth / max(weight_bytes, 1), 1)},
    }


def _bare_llamacpp_steps(engine: Any, rows: int, prompt_tokens: int = 40, steps: int = 20) -> dict[str, Any]:
    """Median llama_decode time of one token for 1 sequence and for `rows` sequences at once, each
    after a prompt of `prompt_tokens` (the engine thread is idle: nothing was submitted to it)."""
    from forja.engine.llamacpp import Row

    figures: dict[str, Any] = {}
    for batch in (1, rows):
        for seq in range(batch):
            engine._decode([Row(100 + i, i, [seq], logits=i == prompt_tokens - 1) for i in range(prompt_tokens)])
        times = []
        for k in range(steps):
            started = time.perf_counter()
            engine._decode([Row(200, prompt_tokens + k, [seq], logits=True) for seq in range(batch)])
            times.append(time.perf_counter() - started)
        engine.llama.llama_memory_clear(engine._memory, True)
        figures[f"step_ms_{batch}"] = round(statistics.median(times) * 1000, 1)
    figures["ratio"] = round(rows * figures["step_ms_1"] / figures[f"step_ms_{rows}"], 2)
    return figures


def _reference_server_figures(settings: Any, model: str, binary: Path, prompts: list[str], max_tokens: int,
                              compare_alone: bool, log: Any) -> dict[str, Any]:
    """llama.cpp's own server (`binary`: llama-server) on the GGUF file forja's llama.cpp backend serves, set up
    as that backend is (see `llama_server`), a slot per client. Measured as `_serve_figures` measures forja: one
    stream ROUNDS times, then the clients together ROUNDS times, then each prompt alone."""
    with llama_server(settings, model, binary, len(prompts), log) as (url, command):
        figures: dict[str, Any] = {"command": command}
        asyncio.run(_stream(url, model, prompts[0], 8))  # warm-up
        log(f"llama-server: one stream, {ROUNDS} times ...")
        single = [asyncio.run(_stream(url, model, prompts[0], max_tokens)) for _ in range(ROUNDS)]
        figures["single"] = _single_figures(single)
        log(f"llama-server: {len(prompts)} concurrent streams, {ROUNDS} rounds ...")
        rounds = _concurrent_rounds(url, model, prompts, max_tokens)
        figures["concurrent"] = _concurrent_figures(rounds)
        figures["ratio_aggregate_to_single"] = round(figures["concurrent"]["aggregate_tokens_per_s"]
                                                     / max(figures["single"]["tokens_per_s"], 1e-9), 2)
        answered = [(prompt, answer) for prompt, answer in zip(prompts, rounds[0][0]) if _answered(answer)]
        if compare_alone and answered:
            log("llama-server: each prompt alone, to compare the batched answers ...")
            figures["batched_equals_alone"] = _batched_equals_alone(url, model, answered, max_tokens)
    return figures


@contextmanager
def llama_server(settings: Any, model: str, binary: Path, slots: int, log: Any = print) -> Iterator[tuple[str, list[str]]]:
    """llama.cpp's own server (`binary`: llama-server) on the GGUF file forja's llama.cpp backend serves, set up
    as that backend is: `slots` requests decoded together (`-np`), one pool of serve.kv_tokens cells shared by
    all of them (`--kv-unified`), the same threads, flash attention on. Ready: its URL and command; stopped after."""
    import tempfile

    from forja.export import served_gguf

    path = served_gguf(settings, model, settings.serve.gguf_quant)
    threads = str(settings.threads or os.cpu_count() or 1)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
               "-c", str(settings.serve.kv_tokens), "--kv-unified", "-t", threads, "-tb", threads, "-fa", "on",
               "--no-webui"]
    log(f"starting {' '.join(command)} ...")
    # its log goes to a file: llama-server writes lines per request, which would fill an unread pipe
    with tempfile.TemporaryFile() as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_ready(url, server, name="llama-server")
            except RuntimeError as exc:
                server_log.seek(0)
                raise RuntimeError(f"{exc}: {server_log.read().decode(errors='replace')[-800:]}") from None
            yield url, command
        finally:
            stop(server)


def stop(process: Any, timeout: float = 30) -> None:
    """End a server a benchmark started: SIGTERM, then SIGKILL when it has not exited after `timeout` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second read from memory by summing an array far larger than the caches (best of N)."""
    import numpy as np

    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def _bare_decode_steps(loaded: Any, prompt_ids: list[int], rows: int, steps: int = 20) -> dict[str, Any]:
    """Median time of one KV-cache decode step of the bare model for 1 row and for `rows` rows: the
    ceiling any batching engine can reach on this hardware (no server, no scheduler)."""
    import torch
    from transformers import DynamicCache

    model = loaded.model
    figures: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in (1, rows):
            cache = DynamicCache()
            model(input_ids=torch.tensor([prompt_ids] * batch, device=model.device), past_key_values=cache, use_cache=True)
            token = torch.full((batch, 1), prompt_ids[-1], device=model.device)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                model(input_ids=token, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - started)
            figures[f"step_ms_{batch}"] = round(statistics.median(times) * 1000, 1)
    figures["ratio"] = round(rows * figures["step_ms_1"] / figures[f"step_ms_{rows}"], 2)
    return figures


def agreement_benchmark(settings: Any, model: str, quants: list[str], log: Any = print) -> list[dict[str, Any]]:
    """Per GGUF file (the model's own, when it is a GGUF, and each quantization): greedy agreement of
    llama.cpp with PyTorch on fixed prompts, and the file's size."""
    from forja import models
    from forja.export import agreement, cache_path, export_gguf

    ref = models.resolve(model, settings)
    files: list[tuple[str, Path]] = []
    if ref.kind in ("bundled", "gguf") and ref.path is not None:
        files.append(("original", ref.path))
    for quant in quants:
        path = cache_path(settings, model, quant)
        if not path.is_file():
            log(f"exporting {model} at {quant} ...")
            export_gguf(settings, model, quant, path)
        files.append((quant, path))
    rows = []
    for quant, path in files:
        log(f"greedy answers of {path.name} under llama.cpp vs PyTorch ...")
        rows.append({"quant": quant, "file": str(path), "mib": round(path.stat().st_size / 2**20, 1),
                     **agreement(settings, model, path)})
    return rows


def render_agreement(model: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"forja bench agreement: {model}, greedy, {rows[0]['tokens'] if rows else 0} tokens per answer, "
             "llama.cpp against PyTorch float32",
             f"{'file':<10} {'MiB':>7}  {'identical answers':<18} mean agreeing share"]
    for row in rows:
        lines.append(f"{row['quant']:<10} {row['mib']:>7.1f}  {row['identical']}/{row['prompts']:<16} "
                     f"{row['mean_agreeing_share']:.0%}")
    return "\n".join(lines)


# Questions a small model tends to loop on (the first one did on the chat page), 3 Spanish and 3 English.
REPETITION_PROMPTS = ["¿Cuál es la capital de Francia?", "¿Cuántos días tiene una semana?", "¿Qué idioma se habla en México?",
                      "What is the capital of France?", "What is the capital of Italy?", "Tell me about the city of Paris."]
REPETITION_SEEDS = (0, 1, 2)  # the sampled rows answer each prompt once per seed


PENALTY_KINDS = {"repetition": (1.0, 1.1, 1.2, 1.3), "frequency": (0.0, 0.2, 0.5, 1.0), "presence": (0.0, 0.2, 0.5, 1.0)}


def repetition_benchmark(settings: Any, model: str, penalties: list[float], *, kind: str = "repetition",
                         max_tokens: int = 256, sampled: bool = True, temperature: float = 0.3, top_p: float = 0.9,
                         log: Any = print) -> list[dict[str, Any]]:
    """Answers to REPETITION_PROMPTS with the engine `forja serve` would run, greedy and (with `sampled`)
    at `temperature` and `top_p`, one answer per seed, at each value of the `kind` penalty (the others
    off): how many loop (say a 6-word phrase 3 times, metrics.repeated_phrase), how many run to
    `max_tokens`, and their mean length."""
    from forja.engine import SamplingParams, answer_all, make_engine
    from forja.engine.text import chat_messages
    from forja.metrics import repeated_phrase

    engine = make_engine(model, settings, max_queue=len(REPETITION_PROMPTS) * len(REPETITION_SEEDS) + 1)
    prompts = [chat_messages(p, settings.generate.system) for p in REPETITION_PROMPTS]
    rows = []
    try:
        for sampling in (False, True) if sampled else (False,):
            for penalty in penalties:
                log(f"{'sampled' if sampling else 'greedy'} answers at {kind}_penalty {penalty} ...")
                answers = []
                for seed in REPETITION_SEEDS if sampling else (None,):
                    params = SamplingParams(max_new_tokens=max_tokens, seed=seed, **{f"{kind}_penalty": penalty},
                                            temperature=temperature if sampling else 0.0, top_p=top_p if sampling else 1.0)
                    answers += answer_all(engine, prompts, params)
                loops = [a.text for a in answers if repeated_phrase(a.text) is not None]
                rows.append({"sampling": f"temperature {temperature}, top_p {top_p}" if sampling else "greedy",
                             "penalty": f"{kind}_penalty", "value": penalty, "answers": len(answers), "looping": len(loops),
                             "cut": sum(a.finish_reason == "length" for a in answers),
                             "mean_tokens": round(statistics.mean(a.usage.completion_tokens for a in answers), 1),
                             "looping_answers": loops})
                log(f"  {len(loops)}/{len(answers)} looping")
    finally:
        engine.close()
    return rows


def render_repetition(model: str, backend: str, max_tokens: int, rows: list[dict[str, Any]]) -> str:
    lines = [f"forja bench repetition: {model} ({backend}), {len(REPETITION_PROMPTS)} prompts, at most {max_tokens} "
             "tokens; looping = a 6-word phrase said 3 times",
             f"{'sampling':<28} {'penalty':<26} {'looping':>8}  {'cut':>6}  mean tokens"]
    for row in rows:
        lines.append(f"{row['sampling']:<28} {row['penalty'] + ' ' + str(row['value']):<26} {row['looping']:>3}/{row['answers']:<4} "
                     f"{row['cut']:>3}/{row['answers']:<3} {row['mean_tokens']:>6}")
    return "\n".join(lines)


def render_serve(results: dict[str, Any]) -> str:
    n = results["clients"]
    rows: list[tuple[str, str, str]] = []
    for key, label in (("hf_generate", "transformers model.generate"), ("generate", "forja engine, one request in process")):
        if key in results:
            g = results[key]
            rows.append((f"{label} (no server)", f"{g['tokens_per_s']:.1f} tokens/s",
                         f"median of {_runs(g['runs_tokens_per_s'])}"))
    if "llamacpp_direct" in results:
        d = results["llamacpp_direct"]
        rows.append(("llama-cpp-python direct (reference)", f"{d['tokens_per_s']:.1f} tokens/s", f"TTFT {d['ttft_s']:.3f}s"))
    for backend, f in results["backends"].items():
        s, c = f["single"], f["concurrent"]
        rows += [
            (f"{backend}: 1 stream, decode", f"{s['tokens_per_s']:.1f} tokens/s",
             f"TTFT {s['ttft_s']:.3f}s, total {s['total_s']:.2f}s; median of {_runs(s.get('runs_tokens_per_s', []))}"),
            (f"{backend}: {n} streams, aggregate", f"{c['aggregate_tokens_per_s']:.1f} tokens/s",
             f"{c['tokens']} tokens in {c['wall_s']:.2f}s, {c['errors']} errors; median of {_runs(c.get('rounds_tokens_per_s', []))}"),
            ("  time to first token p50 / p95", f"{c['ttft_p50_s']:.3f}s / {c['ttft_p95_s']:.3f}s",
             f"p50 of round 1 {_seconds(c.get('ttft_p50_first_round_s'))}, of the later rounds "
             f"{_seconds(c.get('ttft_p50_later_rounds_s'))} (their prompts still in a slot)"),
            ("  total latency p50 / p95", f"{c['latency_p50_s']:.2f}s / {c['latency_p95_s']:.2f}s", ""),
            ("  aggregate / single stream", f"{f['ratio_aggregate_to_single']:.2f}x",
             "target >= 1.75x (llama.cpp server's scaling)" if backend == "llamacpp" else "target >= 4x"),
        ]
        if backend == "pytorch":
            for key, label in (("hf_generate", "model.generate"), ("generate", "forja engine alone")):
                if key in results:
                    rows.append((f"  1 stream / plain {label}", f"{s['tokens_per_s'] / max(results[key]['tokens_per_s'], 1e-9):.2f}x",
                                 "target >= 1.0x" if key == "hf_generate" else ""))
        if backend == "llamacpp" and "llamacpp_direct" in results:
            direct = results["llamacpp_direct"]["tokens_per_s"]
            rows.append(("  1 stream / llama-cpp-python direct", f"{s['tokens_per_s'] / max(direct, 1e-9):.2f}x", "target >= 1.0x"))
        if backend == "llamacpp" and "bare_llamacpp_step" in results:
            bare = results["bare_llamacpp_step"]
            rows.append((f"  bare llama_decode, 1 vs {n} sequences", f"{bare['ratio']:.2f}x",
                         f"{bare['step_ms_1']:.1f} ms vs {bare[f'step_ms_{n}']:.1f} ms: llama.cpp's own batching ceiling here"))
        if backend == "llamacpp" and "bandwidth" in results:
            bw = results["bandwidth"]
            rows.append(("  1 stream / memory-bandwidth bound", f"{s['tokens_per_s'] / max(bw['bound_tokens_per_s'], 1e-9):.0%}",
                         f"{results['gguf']['weight_bytes'] / 2**20:.0f} MiB of weights per token at {bw['gb_per_s']:.1f} GB/s"
                         f" = {bw['bound_tokens_per_s']:.0f} tokens/s"))
        if "concurrent_unguarded" in f:
            u = f["concurrent_unguarded"]
            rows.append((f"  {n} streams, guardrails off: TTFT p50", f"{u['ttft_p50_s']:.3f}s",
                         f"round 1 {_seconds(u.get('ttft_p50_first_round_s'))}, later rounds "
                         f"{_seconds(u.get('ttft_p50_later_rounds_s'))}; aggregate {u['aggregate_tokens_per_s']:.1f} tokens/s"))
        if "guardrails" in f:
            g = f["guardrails"]
            rows.append(("  guardrails on vs off, 1 stream", f"{g['added_ms']:+.1f} ms",
                         f"median of {g['rounds']}: total {g['total_on_s']:.3f}s vs {g['total_off_s']:.3f}s, "
                         f"TTFT {g['ttft_on_s']:.3f}s vs {g['ttft_off_s']:.3f}s"))
            if "cpu" in g:
                rows.append(("  guardrails CPU per request", f"{g['cpu']['input_ms'] + g['cpu']['output_ms']:.2f} ms",
                             f"input {g['cpu']['input_ms']:.2f} ms + output {g['cpu']['output_ms']:.2f} ms "
                             f"(answers of {g['cpu']['answer_chars']:.0f} characters, streamed)"))
        if "batched_equals_alone" in f:
            b = f["batched_equals_alone"]
            rows.append(("  batched answer == alone", f"{b['identical']}/{b['of']}",
                         f"least agreeing shares {b['min_agreeing_share']:.0%} of its text"))
        for key, label in (("bare_step", "plain matmuls"), ("bare_step_packed", "packed weights, as served")):
            if backend == "pytorch" and key in results:
                bare = results[key]
                rows.append((f"  bare model step, 1 vs {n} rows, {label}", f"{bare['ratio']:.2f}x",
                             f"{bare['step_ms_1']:.1f} ms vs {bare[f'step_ms_{n}']:.1f} ms: the ceiling of batching here"))
    rows += _streaming_cost_rows(results)
    width = max(len(r[0]) for r in rows)
    head = f"forja bench serve: {results['model']}, {results['max_tokens']} new tokens per answer, greedy"
    lines = [head] + [f"{a:<{width}}  {b:<18} {c}".rstrip() for a, b, c in rows]
    if "reference_server" in results:
        lines += ["", _render_reference(results, n)]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _render_reference(results: dict[str, Any], n: int) -> str:
    """forja's llama.cpp backend and llama-server side by side (medians of the same measurement)."""
    ref = results["reference_server"]
    ours = results["backends"].get("llamacpp")
    columns = [("forja llamacpp", ours), (f"llama-server -np {n}", ref)] if ours else [(f"llama-server -np {n}", ref)]
    figures = [
        ("1 stream: decode tokens/s", lambda f: f"{f['single']['tokens_per_s']:.1f}"),
        ("1 stream: time to first token", lambda f: f"{f['single']['ttft_s']:.3f} s"),
        (f"{n} streams: aggregate tokens/s", lambda f: f"{f['concurrent']['aggregate_tokens_per_s']:.1f}"),
        (f"{n} streams: TTFT p50 / p95", lambda f: f"{f['concurrent']['ttft_p50_s']:.3f} / {f['concurrent']['ttft_p95_s']:.3f} s"),
        (f"{n} streams: TTFT p50, round 1 / later", lambda f: (f"{_seconds(f['concurrent'].get('ttft_p50_first_round_s'))} / "
                                                                f"{_seconds(f['concurrent'].get('ttft_p50_later_rounds_s'))}")),
        (f"{n} streams, rails off: TTFT p50", lambda f: (f"{f['concurrent_unguarded']['ttft_p50_s']:.3f} s"
                                                         if "concurrent_unguarded" in f else "- (no rails)")),
        (f"{n} streams: latency p50 / p95", lambda f: f"{f['concurrent']['latency_p50_s']:.2f} / {f['concurrent']['latency_p95_s']:.2f} s"),
        (f"{n} streams: errors", lambda f: str(f["concurrent"]["errors"])),
        ("batched answer == alone", lambda f: (f"{f['batched_equals_alone']['identical']}/{f['batched_equals_alone']['of']}"
                                               if "batched_equals_alone" in f else "-")),
    ]
    width = max(len(label) for label, _ in figures)
    lines = [f"{'same GGUF, same threads':<{width}}  " + "  ".join(f"{name:<20}" for name, _ in columns).rstrip()]
    for label, cell in figures:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{cell(f):<20}" for _, f in columns).rstrip())
    return "\n".join(lines)


STREAMED_ANSWER = ("¿Cuál es el horario de la panadería? Abrimos de lunes a sábado, de 7 a 14 h. 🥖☕\n"
                   "Il pane è buono. 日本語のテキスト、中文。Ñandú, pingüino — naïve café 👩‍🍳\n\n")


def streaming_cost(settings: Any, model: str, tokens: int = 2000, rounds: int = 5) -> dict[str, Any]:
    """What turning sampled ids into streamed text costs per token, early and late in a long answer:
    microseconds per `TextStream.push` at tokens 10-100 and 1,900-2,000 of a 2,000-token answer on the
    model's tokenizer, with two stop strings (medians of `rounds`). A ratio near 1 means the cost does not
    grow with the answer."""
    from forja.engine.text import TextStream
    from forja.models import load_tokenizer

    tokenizer = load_tokenizer(model, settings)
    one = len(tokenizer(STREAMED_ANSWER, add_special_tokens=False)["input_ids"])
    ids = tokenizer(STREAMED_ANSWER * (tokens // one + 2), add_special_tokens=False)["input_ids"][:tokens]
    early, late = [], []
    for _ in range(rounds):
        stream = TextStream(tokenizer, stop=["<|im_end|>", "\nUser:"])
        stamps = []
        for token in ids:
            stamps.append(time.perf_counter())
            stream.push(token)
        stamps.append(time.perf_counter())
        early.append((stamps[100] - stamps[10]) * 1e6 / 90)
        late.append((stamps[tokens] - stamps[tokens - 100]) * 1e6 / 100)
    early_us, late_us = statistics.median(early), statistics.median(late)
    return {"tokens": tokens, "early_us_per_token": round(early_us, 2), "late_us_per_token": round(late_us, 2),
            "ratio_late_to_early": round(late_us / early_us, 2), "rounds": rounds}


def _streaming_cost_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "streaming_cost" not in results:
        return []
    c = results["streaming_cost"]
    return [("streamed text, cost per token late / early", f"{c['ratio_late_to_early']:.2f}x",
             f"{c['late_us_per_token']:.1f} us at tokens {c['tokens'] - 100}-{c['tokens']} vs "
             f"{c['early_us_per_token']:.1f} us at 10-100 (TextStream.push, median of {c['rounds']})")]


async def _stream(url: str, model: str, prompt: str, max_tokens: int, http: Any = None) -> dict[str, Any]:
    """One streamed chat completion, timed from sending it. Concurrent streams share one `http` client, as a
    load generator would: creating a client (its SSL context) blocks the event loop for tens of milliseconds,
    which would send the requests one by one."""
    import httpx

    if http is None:
        async with httpx.AsyncClient(timeout=600) as own:
            return await _stream(url, model, prompt, max_tokens, own)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first = last = None
    text, tokens = "", 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    last = time.perf_counter()
                    text += choice["delta"]["content"]
    end = time.perf_counter()
    first = first or end
    return {"text": text, "tokens": tokens, "ttft": first - began, "total": end - began,
            "rate": _decode_rate(tokens, first, last or end)}


def _runs(rates: list[float]) -> str:
    return f"{len(rates)} runs: " + ", ".join(f"{r:.1f}" for r in rates)


def _decode_rate(tokens: int, first: float | None, last: float) -> float:
    """Tokens per second after the first one (the first token's time is prefill, reported as TTFT)."""
    if not first or tokens < 2 or last <= first:
        return 0.0
    return (tokens - 1) / (last - first)


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 300, name: str = "forja serve") -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            said = server.stderr.read().decode()[-500:] if server.stderr else "(its output went to a log file)"
            raise RuntimeError(f"{name} exited: {said}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not become ready in time")
