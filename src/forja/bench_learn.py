"""`forja bench learn`: the whole story a shop owner lives, on defaults only, every answer asked of a real
`forja serve` with its default backend (what a customer gets).

A FAQ of invented facts (data/bench/faq_es.jsonl: 30 Spanish rows, each with a reworded question and the
fact its answer must hold) is trained with `forja train` and its defaults; the server answers it as
asked and reworded, and two control questions. Four corrections go through `POST /feedback`, one
`forja train --from-feedback` learns them, and the same server (it follows the promoted version) is
asked again: corrections as sent and reworded, the FAQ, the controls. Last, a deliberately bad retrain
(learning rate 0.05, 30 steps) must be refused by the gate on the operator's test set (the FAQ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from forja.bench import _free_port, _wait_ready, stop
from forja.data import read_rows
from forja.models import cpu_line
from forja.metrics import normalize

BENCH_DATA = Path(__file__).resolve().parents[2] / "data" / "bench"
TARGETS = {"faq_as_asked": 0.9, "faq_reworded": 0.5, "corrections_as_sent": 1.0, "corrections_reworded": 0.75,
           "faq_after": 0.9, "train_minutes": 10.0}


def holds(answer: str, fact: str) -> bool:
    """The answer states the fact (its normalised tokens appear in order, side by side)."""
    got, want = normalize(answer), normalize(fact)
    return any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1))


def learn_benchmark(data_dir: Path = BENCH_DATA, out: Path | None = None, log: Any = print,
                    extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    faq = read_rows(data_dir / "faq_es.jsonl")
    corrections = read_rows(data_dir / "corrections_es.jsonl")
    controls = read_rows(data_dir / "controls_es.jsonl")
    report: dict[str, Any] = {"cpu": cpu_line(), "rows": len(faq), "corrections": len(corrections)}
    with tempfile.TemporaryDirectory(prefix="forja-bench-learn-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "FORJA_HOME": str(home), **(extra_env or {})}
        env.pop("FORJA_CONFIG", None)
        faq_file = Path(tmp) / "faq.jsonl"
        faq_file.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False)
                                    + "\n" for r in faq), encoding="utf-8")

        log("training the FAQ with the defaults: forja train --data faq.jsonl --name faq-v1")
        report["train"] = _forja(env, "train", "--data", str(faq_file), "--name", "faq-v1", "--quiet")
        _forja(env, "models", "promote", "faq-v1")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server_log = (Path(tmp) / "serve.log").open("w")
        server = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--port", str(port)], env=env,
                                  stdout=server_log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, server, timeout=600)
            report["backend"] = _health(url).get("backend")
            import httpx

            report["before"] = _ask_all(url, faq, corrections, controls, corrected=False)
            log(_line("before feedback", report["before"]))

            for row in corrections:  # what the owner sees wrong, corrected through the API
                reply = _chat(url, row["question"])
                sent = httpx.post(url + "/feedback", json={"id": reply["id"], "rating": "down",
                                                           "correction": row["correction"]}, timeout=30)
                sent.raise_for_status()
            log("one retrain from feedback: forja train --from-feedback --name faq-v2")
            report["retrain"] = _forja(env, "train", "--from-feedback", "--name", "faq-v2", "--quiet", check=False)
            report["gate"] = _gate(home, "faq-v2")
            report["promoted"] = _health_active(url) == "faq-v2"
            report["after"] = _ask_all(url, faq, corrections, controls, corrected=True)
            log(_line("after feedback", report["after"]))

            # a version that regresses on the operator's own test set is not promoted
            testset = Path(tmp) / "testset.jsonl"
            testset.write_text(faq_file.read_text(encoding="utf-8"), encoding="utf-8")
            reply = _chat(url, "¿Venden tornillos?")
            httpx.post(url + "/feedback", json={"id": reply["id"], "rating": "down",
                                                "correction": "Sí, vendemos tornillos de todas las medidas."}, timeout=30)
            bad_env = {**env, "FORJA_FEEDBACK__GATE_TESTSET": str(testset)}
            # 30 steps wreck the model at that rate; stopping once learned never comes, and the run's whole plan
            # (150 steps) would take about an hour on a 2-core AVX2 CPU in float32 (70 steps in 30 minutes)
            log("a deliberately bad retrain (learning rate 0.05, 30 steps) against the FAQ as test set")
            report["bad_retrain"] = _forja(bad_env, "train", "--from-feedback", "--name", "faq-bad",
                                           "--learning-rate", "0.05", "--max-steps", "30", "--quiet", check=False)
            report["bad_gate"] = _gate(home, "faq-bad")
            report["bad_promoted"] = _health_active(url) == "faq-bad"
        finally:
            stop(server)
            server_log.close()
            said = (Path(tmp) / "serve.log").read_text(errors="replace")
            report["server_log"] = said[:2000] + ("\n...\n" + said[-2000:] if len(said) > 4000 else said[2000:])
    report["figures"] = figures(report)
    if out is not None:
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _ask_all(url: str, faq: list[dict], corrections: list[dict], controls: list[dict], *,
             corrected: bool) -> dict[str, Any]:
    def asked(question: str, fact: str) -> dict[str, Any]:
        answer = _chat(url, question)["choices"][0]["message"]["content"]
        return {"question": question, "fact": fact, "answer": answer, "ok": holds(answer, fact)}

    # once corrected, a FAQ question must give the corrected fact
    new_facts = {tuple(normalize(c["question"])): c["fact"] for c in corrections} if corrected else {}
    faq_facts = [(r, new_facts.get(tuple(normalize(r["question"])), r["fact"])) for r in faq]
    return {
        "faq_as_asked": [asked(r["question"], fact) for r, fact in faq_facts],
        "faq_reworded": [asked(r["reworded"], fact) for r, fact in faq_facts],
        "corrections_as_sent": [asked(c["question"], c["fact"]) for c in corrections],
        "corrections_reworded": [asked(c["reworded"], c["fact"]) for c in corrections],
        "controls": [asked(c["question"], c["fact"]) for c in controls],
    }


def figures(report: dict[str, Any]) -> dict[str, Any]:
    share = lambda rows: sum(r["ok"] for r in rows) / len(rows)  # noqa: E731
    before, after = report["before"], report["after"]
    train_seconds = report["train"]["seconds"]
    retrain_seconds = report["retrain"]["seconds"]
    found = {
        "train_minutes": round(train_seconds / 60, 2),
        "retrain_minutes": round(retrain_seconds / 60, 2),
        "faq_as_asked": share(before["faq_as_asked"]),
        "faq_reworded": share(before["faq_reworded"]),
        "controls_before": share(before["controls"]),
        "corrections_as_sent": share(after["corrections_as_sent"]),
        "corrections_reworded": share(after["corrections_reworded"]),
        "faq_after": share(after["faq_as_asked"]),
        "faq_reworded_after": share(after["faq_reworded"]),
        "controls_after": share(after["controls"]),
        "gate_passed": bool(report["gate"].get("passed")),
        "promoted": report["promoted"],
        "bad_version_refused": not report["bad_promoted"] and report["bad_retrain"]["exit_code"] != 0,
        "bad_gate_decided_by": report["bad_gate"].get("decided_by"),
    }
    found["controls_kept"] = found["controls_after"] >= found["controls_before"]
    return found


def render_learn(report: dict[str, Any]) -> str:
    f = report["figures"]
    n, c = report["rows"], report["corrections"]
    pct = lambda v: f"{v:.0%}"  # noqa: E731
    mark = lambda ok: "yes" if ok else "NO"  # noqa: E731
    lines = [
        f"forja bench learn: {n}-row Spanish FAQ of invented facts, {c} corrections, defaults only; answers asked of "
        f"forja serve ({report.get('backend') or 'default backend'}); CPU: {report['cpu']}",
        "| what | figure | target | met |",
        "|---|---|---|---|",
        f"| training time (forja train, defaults) | {f['train_minutes']:.1f} min | ≤ 10 min | {mark(f['train_minutes'] <= 10)} |",
        f"| FAQ answered with the fact, as asked | {pct(f['faq_as_asked'])} ({round(f['faq_as_asked'] * n)}/{n}) | ≥ 90% | {mark(f['faq_as_asked'] >= 0.9)} |",
        f"| FAQ answered with the fact, reworded | {pct(f['faq_reworded'])} ({round(f['faq_reworded'] * n)}/{n}) | ≥ 50% | {mark(f['faq_reworded'] >= 0.5)} |",
        f"| retrain from feedback (forja train --from-feedback) | {f['retrain_minutes']:.1f} min | | |",
        f"| corrections learned, as sent | {round(f['corrections_as_sent'] * c)}/{c} | {c}/{c} | {mark(f['corrections_as_sent'] == 1)} |",
        f"| corrections learned, reworded | {round(f['corrections_reworded'] * c)}/{c} | ≥ 3/4 | {mark(f['corrections_reworded'] >= 0.75)} |",
        f"| FAQ still answered after the retrain | {pct(f['faq_after'])} ({round(f['faq_after'] * n)}/{n}) | ≥ 90% | {mark(f['faq_after'] >= 0.9)} |",
        f"| FAQ reworded after the retrain | {pct(f['faq_reworded_after'])} | | |",
        f"| controls kept | {f['controls_after']:.0%} (before {f['controls_before']:.0%}) | kept | {mark(f['controls_kept'])} |",
        f"| gate verdict, promoted without a hand step | {'passed' if f['gate_passed'] else 'failed'}, "
        f"{'promoted' if f['promoted'] else 'not promoted'} | passed, promoted | {mark(f['gate_passed'] and f['promoted'])} |",
        f"| deliberately bad version (lr 0.05) refused | {mark(f['bad_version_refused'])} (decided by {f['bad_gate_decided_by']}) | refused | {mark(f['bad_version_refused'])} |",
    ]
    for label, rows in (("missed as asked", report["before"]["faq_as_asked"]),
                        ("missed reworded", report["before"]["faq_reworded"]),
                        ("corrections missed reworded", report["after"]["corrections_reworded"])):
        missed = [r for r in rows if not r["ok"]]
        if missed:
            lines.append(f"{label}: " + "; ".join(f"{r['question']!r} -> {r['answer'][:60]!r}" for r in missed[:8]))
    return "\n".join(lines)


def _line(label: str, asked: dict[str, Any]) -> str:
    return f"{label}: " + ", ".join(f"{k} {sum(r['ok'] for r in v)}/{len(v)}" for k, v in asked.items())


def _forja(env: dict[str, str], *args: str, check: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "forja.cli", *args], env=env, capture_output=True, text=True)
    result = {"command": "forja " + " ".join(args), "exit_code": done.returncode,
              "seconds": round(time.perf_counter() - started, 1), "output": done.stdout[-4000:]}
    if check and done.returncode != 0:
        raise RuntimeError(f"{result['command']} failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")
    return result


def _chat(url: str, question: str) -> dict[str, Any]:
    import httpx

    reply = httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0})
    reply.raise_for_status()
    return reply.json()


def _health(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/health", timeout=30).json()


def _health_active(url: str) -> str | None:
    _chat(url, "Hola")  # the server notices a promotion at its next request
    return _health(url).get("active_model")


def _gate(home: Path, version: str) -> dict[str, Any]:
    path = home / "models" / "versions" / version / "gate.json"
    return json.loads(path.read_text()) if path.is_file() else {}
