"""Feedback → training pairs → a new model version → promoted only when it does not regress.

`forja feedback export` turns the store's feedback into training JSONL: a thumbs-down with a correction
becomes (prompt, corrected answer), a thumbs-up keeps (prompt, answer), and on request the pair
(chosen = correction, rejected = answer) for preference training. `forja train --from-feedback` trains
the next version from the active one on the unused pairs plus a replay sample of that version's own
training data, then evaluates both versions on held-out rows (the version's validation split and the
pairs held back) with `forja.evaluate` and promotes the new one only if no gate metric regresses.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forja import models
from forja.config import ForjaError, Settings, TrainSettings
from forja.data import meta_path, validation_path, write_jsonl
from forja.guard import Guards
from forja.store import Store

FEEDBACK_RECORD = "feedback.json"  # in a run made from feedback: which rows it learns from
GATE_FILE = "gate.json"  # in a version made from feedback: the promotion check


class FeedbackError(ForjaError):
    """Nothing to learn from, or a retrain that cannot start; one line for the user."""


@dataclass
class Pair:
    """What one answered prompt teaches, from all the feedback it got."""

    exchange_id: str
    prompt: list[dict[str, str]] | str  # chat messages before the answer, or a raw completion prompt
    answer: str  # the answer to learn: the correction, or the approved answer
    kind: str  # "correction" or "approved"
    feedback_ids: list[int]
    rejected: str | None = None  # the answer the correction replaces

    def training_row(self) -> dict[str, Any]:
        source = f"feedback:{','.join(map(str, self.feedback_ids))}"
        if isinstance(self.prompt, str):
            row: dict[str, Any] = {"text": self.prompt + self.answer}
        else:
            row = {"messages": [*self.prompt, {"role": "assistant", "content": self.answer}]}
        return {**row, "source": source, "exchange_id": self.exchange_id, "feedback_ids": self.feedback_ids,
                "kind": self.kind}

    def preference_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.answer, "rejected": self.rejected,
                "exchange_id": self.exchange_id, "feedback_ids": self.feedback_ids}


def collect_pairs(store: Store, *, include_used: bool = False,
                  redact: Callable[[Any], Any] = lambda value: value) -> tuple[list[Pair], dict[str, int]]:
    """Training pairs from the feedback (unused rows only unless include_used), oldest exchange first,
    and counts of what was left out and why. Per answer the newest correction wins; without one, an
    answer with more thumbs-up than thumbs-down is kept as it is. `redact` is applied to every text
    (the server already stores it redacted; this also cleans rows stored before the guardrails)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in reversed(store.feedback_rows(unused_only=not include_used)):  # oldest first
        groups.setdefault((row["exchange_id"], row["choice"]), []).append(row)
    pairs, skipped = [], {"down_without_correction": 0, "comment_only": 0, "tied_ratings": 0, "unusable_prompt": 0}
    for (exchange_id, _), rows in groups.items():
        ids = [r["id"] for r in rows]
        prompt = redact(rows[0]["messages"])
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0] if len(prompt) == 1 else None  # a completion with several prompts
        if not prompt:
            skipped["unusable_prompt"] += 1
            continue
        corrections = [r for r in rows if r["correction"]]
        if corrections:
            pairs.append(Pair(exchange_id, prompt, redact(corrections[-1]["correction"]), "correction", ids,
                              redact(rows[0]["answer"])))
            continue
        ups = sum(r["rating"] == "up" for r in rows)
        downs = sum(r["rating"] == "down" for r in rows)
        if ups > downs:
            pairs.append(Pair(exchange_id, prompt, redact(rows[0]["answer"]), "approved", ids))
        elif downs > ups:
            skipped["down_without_correction"] += 1
        elif ups:
            skipped["tied_ratings"] += 1
        else:
            skipped["comment_only"] += 1
    return pairs, skipped


def write_training_file(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write rows and a `forja data prepare`-style meta file (hash), so `forja train --data` takes the file as is."""
    write_jsonl(path, rows)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path(path).write_text(json.dumps({"hash": digest, "rows": len(rows), "source": "forja feedback"}, indent=2) + "\n")
    return digest


@dataclass
class ExportSummary:
    path: Path
    pairs: int
    corrections: int
    approved: int
    skipped: dict[str, int]
    preferences_path: Path | None = None


def export(settings: Settings, out: Path, *, include_used: bool = False, preferences: bool = False) -> ExportSummary:
    """Write the feedback as training JSONL (and preference pairs next to it). Read-only on the store:
    rows are marked used only when a retrain actually learns from them."""
    store = Store.open(settings)
    try:
        pairs, skipped = collect_pairs(store, include_used=include_used, redact=Guards(settings).redact)
    finally:
        store.close()
    write_training_file(out, [p.training_row() for p in pairs])
    summary = ExportSummary(out, len(pairs), sum(p.kind == "correction" for p in pairs),
                            sum(p.kind == "approved" for p in pairs), skipped)
    if preferences:
        summary.preferences_path = out.with_suffix(".preferences.jsonl")
        rows = [p.preference_row() for p in pairs if p.rejected is not None and p.rejected != p.answer]
        write_jsonl(summary.preferences_path, rows)
    return summary


# ------------------------------------------------------------------------------------------------
# Retrain and promote


@dataclass
class RetrainResult:
    version: Path
    started_from: str
    trained_pairs: int
    held_out_pairs: int
    replayed_rows: int
    gate: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False


def version_rows(settings: Settings, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training and validation rows a version was trained on (empty for a model that is not a version)."""
    from forja.train import DATA_FILE, read_rows

    ref = models.resolve(name, settings)
    if ref.kind != "version" or ref.path is None:
        return [], []
    return read_rows(ref.path / DATA_FILE), read_rows(validation_path(ref.path / DATA_FILE))


def split_holdout(pairs: list[Pair], settings: Settings, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold back a share of the pairs (only when there are enough) to check the new version on."""
    config = settings.feedback
    if len(pairs) < config.min_pairs_for_holdout or config.holdout_fraction == 0:
        return pairs, []
    count = max(1, round(len(pairs) * config.holdout_fraction))
    ranked = sorted(pairs, key=lambda p: hashlib.sha256(f"{seed}\n{p.exchange_id}".encode()).digest())
    held = {id(p) for p in ranked[:count]}
    return [p for p in pairs if id(p) not in held], [p for p in pairs if id(p) in held]


def retrain(settings: Settings, hyper: TrainSettings, *, base: str | None = None, name: str | None = None,
            promote: bool = True, progress: bool = True) -> RetrainResult:
    """Train a new version from `base` (default: the active version) on the unused feedback, then gate it."""
    from forja import train as training

    store = Store.open(settings)
    try:
        pairs, skipped = collect_pairs(store, redact=Guards(settings).redact)
        if not pairs:
            stats = store.stats()
            raise FeedbackError(
                f"no new feedback to learn from ({stats['feedback']} feedback rows, {stats['unused']} unused; "
                f"left out: {', '.join(f'{k}={v}' for k, v in skipped.items() if v) or 'none'}); "
                "a thumbs-down needs a correction to become a training pair"
            )
        start = base or models.active_model(settings)
        models.resolve(start, settings)
        train_pairs, held_pairs = split_holdout(pairs, settings, hyper.seed)
        old_train, old_val = version_rows(settings, start)
        replay_count = min(len(old_train), math.ceil(settings.feedback.replay_ratio * len(train_pairs)))
        replay = random.Random(hyper.seed).sample(old_train, replay_count)
        rows = [p.training_row() for p in train_pairs] + replay
        random.Random(hyper.seed + 1).shuffle(rows)

        name = name or f"{Path(start).name.removesuffix('.gguf')}-fb{time.strftime('%Y%m%d-%H%M%S')}"
        staging = settings.home / "feedback" / name
        data_path = staging / training.DATA_FILE
        write_training_file(data_path, rows)
        validation = old_val + [p.training_row() for p in held_pairs]
        write_jsonl(validation_path(data_path), validation)
        run = training.new_run(settings, [data_path], name, start, hyper)
        record = {"started_from": start, "train_feedback_ids": sorted(i for p in train_pairs for i in p.feedback_ids),
                  "holdout_feedback_ids": sorted(i for p in held_pairs for i in p.feedback_ids),
                  "replayed_rows": replay_count, "skipped": skipped}
        (run.directory / FEEDBACK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        version = training.train(settings, run, progress=progress)
        record_version(settings, store, run.directory, version)
    finally:
        store.close()
    result = RetrainResult(version, start, len(train_pairs), len(held_pairs), replay_count)
    result.gate = gate(settings, start, version.name, validation, progress=progress)
    if promote and result.gate["passed"]:
        models.promote(settings, version.name, f"passed the feedback gate against {start}")
        result.promoted = True
    return result


def record_version(settings: Settings, store: Store, run_dir: Path, version: Path) -> None:
    """Once a feedback run is a version: mark its feedback used and note it in version.json (also after --resume)."""
    path = run_dir / FEEDBACK_RECORD
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    store.mark_used(record["train_feedback_ids"], version.name, "train")
    store.mark_used(record["holdout_feedback_ids"], version.name, "holdout")
    meta = models.read_version(version)
    meta["from_feedback"] = record
    (version / models.VERSION_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def gate_cases(rows: list[dict[str, Any]], limit: int) -> list[Any]:
    """Held-out dialogue rows as evaluation cases: the conversation up to the last answer, and that answer."""
    from forja.evaluate import TestCase

    cases = []
    for row in rows:
        messages = row.get("messages") or []
        if len(messages) >= 2 and messages[-1]["role"] == "assistant":
            prompt = messages[:-1]
            question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
            cases.append(TestCase(question=question, answer=messages[-1]["content"], messages=prompt))
    return cases[:limit]


def gate(settings: Settings, current: str, candidate: str, held_out: list[dict[str, Any]], *,
         progress: bool = True) -> dict[str, Any]:
    """Answer the held-out rows with both versions; pass when no gate metric of the candidate is lower
    than the current version's by more than the tolerance. The result is written into the version."""
    from forja.evaluate import evaluate

    config = settings.feedback
    cases = gate_cases(held_out, config.gate_max_cases)
    report: dict[str, Any] = {"current": current, "candidate": candidate, "cases": len(cases),
                              "tolerance": config.gate_tolerance, "metrics": {}}
    if not cases:
        report.update(passed=False, reason="no held-out rows to check the new version on (the starting version has "
                      "no validation split and too few feedback pairs were held back); promote it by hand after a look")
    else:
        result = evaluate([current, candidate], cases, settings, max_new_tokens=config.gate_max_tokens, progress=progress)
        failed = []
        for metric in config.gate_metrics:
            old = result.means.get(current, {}).get(metric)
            new = result.means.get(candidate, {}).get(metric)
            report["metrics"][metric] = {"current": old, "candidate": new}
            if old is not None and (new is None or new < old - config.gate_tolerance):
                failed.append(f"{metric} {new if new is None else round(new, 4)} < {round(old, 4)}")
        report.update(passed=not failed, reason="; ".join(failed) or "no gate metric regressed")
    version_dir = models.resolve(candidate, settings).path
    if version_dir is not None:
        (version_dir / GATE_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
