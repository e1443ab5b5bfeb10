"""`forja bench batch`: the same prompts answered as one batch (what `forja generate --input` runs: the request
path in process, many requests in flight) and one by one through the API (a `forja serve` subprocess, the
`openai` client, one request after another), same backend and model; on llama.cpp also llama.cpp's own server
with 8 clients at once. Throughput of each (answers/s, tokens/s) and the ratios."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from forja.bench import SERVE_TOPICS, forja_server, llama_server

OPENERS = ["Write a short story about", "Describe", "Explain to a child", "Give three facts about",
           "Write a poem about", "What do you know about", "Tell me a joke about", "Summarise"]
BATCH_TARGET = 4.0  # batch tokens/s over sequential API tokens/s, PyTorch backend
REFERENCE_CLIENTS = 8  # llama.cpp's server: requests sent at once (and its -np)


def bench_prompts(count: int) -> list[str]:
    """`count` different prompts (numbered, so no server can reuse one prompt's cache for another)."""
    return [f"Request {i + 1}: {OPENERS[i // len(SERVE_TOPICS) % len(OPENERS)]} {SERVE_TOPICS[i % len(SERVE_TOPICS)]}."
            for i in range(count)]


def batch_benchmark(settings: Any, model: str | None = None, *, prompts: int = 256, max_tokens: int = 32,
                    backends: list[str] | None = None, reference_server: Any = None,
                    log: Any = print) -> dict[str, Any]:
    """Per backend: the prompts as one batch, then one by one through the API; with `reference_server` (a
    llama-server binary) and the llama.cpp backend, also llama-server answering REFERENCE_CLIENTS at a time.
    Greedy, `max_tokens` each; the same request body everywhere."""
    from forja.engine import llamacpp
    from forja.models import cpu_line

    model = model or settings.model
    backends = backends or (["llamacpp", "pytorch"] if llamacpp.available() else ["pytorch"])
    texts = bench_prompts(prompts)
    results: dict[str, Any] = {"model": model, "prompts": prompts, "max_tokens": max_tokens, "cpu": cpu_line(),
                               "backends": {}}
    for backend in backends:
        on = settings.model_copy(update={"serve": settings.serve.model_copy(update={"backend": backend})})
        figures: dict[str, Any] = {}
        log(f"{backend}: {prompts} prompts as one batch (forja generate --input, in process) ...")
        figures["batch"] = batch_figures(on, model, texts, max_tokens)
        log(f"{backend}: the same prompts one by one through forja serve and the openai client ...")
        with forja_server(model, backend, log=log) as url:
            figures["sequential"] = _client_figures(url, model, texts, max_tokens, clients=1)
        figures["ratio_to_sequential"] = _ratio(figures["batch"], figures["sequential"])
        if backend == "llamacpp" and reference_server is not None:
            log(f"llama-server: the same prompts, {REFERENCE_CLIENTS} clients at once ...")
            with llama_server(on, model, reference_server, REFERENCE_CLIENTS, log) as (url, command):
                figures["llama_server"] = {"command": command, **_client_figures(url, model, texts, max_tokens,
                                                                                 clients=REFERENCE_CLIENTS)}
            figures["ratio_to_llama_server"] = _ratio(figures["batch"], figures["llama_server"])
        results["backends"][backend] = figures
    return results


def request_body(text: str, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


def batch_figures(settings: Any, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """The prompts answered by jobs.batch in process; timed from the model being ready to the last answer."""
    from forja.jobs.batch import CHAT_URL, answer_requests

    requests = [{"custom_id": f"p{i}", "method": "POST", "url": CHAT_URL, "body": request_body(text, max_tokens)}
                for i, text in enumerate(texts)]
    started, finished, tokens, errors = [0.0], [0.0], [0], []

    def answered(request: dict, status: int, body: dict[str, Any]) -> None:
        finished[0] = time.perf_counter()
        if status == 200:
            tokens[0] += body["usage"]["completion_tokens"]
        else:
            errors.append(f"{status}: {body.get('error', {}).get('message')}")

    answer_requests(settings, requests, answered, model=model, on_ready=lambda: started.__setitem__(0, time.perf_counter()))
    return _figures(len(texts) - len(errors), tokens[0], finished[0] - started[0], errors)


def _client_figures(url: str, model: str, texts: list[str], max_tokens: int, clients: int) -> dict[str, Any]:
    """The prompts sent through the official openai client, `clients` at a time (1: one after another), after one
    warm-up request: answers, completion tokens and wall time."""
    import openai

    async def run() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        await client.chat.completions.create(model=model, **request_body("Hello", 8))  # warm-up
        queue: asyncio.Queue[str] = asyncio.Queue()
        for text in texts:
            queue.put_nowait(text)
        tokens, errors = [0], []

        async def worker() -> None:
            while not queue.empty():
                text = queue.get_nowait()
                try:
                    reply = await client.chat.completions.create(model=model, **request_body(text, max_tokens))
                    tokens[0] += reply.usage.completion_tokens
                except openai.APIError as exc:
                    errors.append(str(exc))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - began
        await client.close()
        return _figures(len(texts) - len(errors), tokens[0], wall, errors, clients=clients)

    return asyncio.run(run())


def _figures(answers: int, tokens: int, seconds: float, errors: list[str], **extra: Any) -> dict[str, Any]:
    return {"answers": answers, "tokens": tokens, "seconds": round(seconds, 2),
            "answers_per_s": round(answers / max(seconds, 1e-9), 2), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "errors": len(errors), "first_error": errors[0] if errors else None, **extra}


def _ratio(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    return {key: round(ours[key] / max(other[key], 1e-9), 2) for key in ("answers_per_s", "tokens_per_s")}


def render_batch(results: dict[str, Any]) -> str:
    lines = [f"forja bench batch: {results['model']}, {results['prompts']} prompts, greedy, at most "
             f"{results['max_tokens']} new tokens each", f"CPU: {results['cpu']}", "",
             "| backend | way | answers/s | tokens/s | answers (errors) | seconds |", "|---|---|---|---|---|---|"]
    ways = (("batch", "batch (forja generate --input)"), ("sequential", "one by one through the API"),
            ("llama_server", f"llama-server, {REFERENCE_CLIENTS} clients at once"))
    verdicts = []
    for backend, figures in results["backends"].items():
        for key, label in ways:
            if key in figures:
                f = figures[key]
                lines.append(f"| {backend} | {label} | {f['answers_per_s']:.2f} | {f['tokens_per_s']:.1f} | "
                             f"{f['answers']} ({f['errors']}) | {f['seconds']:.1f} |")
        ratio = figures["ratio_to_sequential"]
        verdict = f"{backend}: batch / sequential = {ratio['tokens_per_s']:.2f}x tokens/s ({ratio['answers_per_s']:.2f}x answers/s)"
        if backend == "pytorch":
            verdict += f"; target >= {BATCH_TARGET:g}x: {'met' if ratio['tokens_per_s'] >= BATCH_TARGET else 'NOT met'}"
        verdicts.append(verdict)
        if "ratio_to_llama_server" in figures:
            ratio = figures["ratio_to_llama_server"]
            verdicts.append(f"{backend}: batch / llama-server with {REFERENCE_CLIENTS} clients = "
                            f"{ratio['tokens_per_s']:.2f}x tokens/s; target >= 1x: "
                            f"{'met' if ratio['tokens_per_s'] >= 1 else 'NOT met'}")
        elif backend == "llamacpp":
            verdicts.append(f"{backend}: llama-server not measured (give --reference-server PATH, or put llama-server "
                            "on the PATH)")
        for key, _ in ways:
            if figures.get(key, {}).get("first_error"):
                verdicts.append(f"{backend} {key}: first error: {figures[key]['first_error']}")
    return "\n".join(lines + [""] + verdicts)
