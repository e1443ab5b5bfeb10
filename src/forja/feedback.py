"""Feedback → training pairs → a new model version → promoted only when the gate says so.

`forja feedback export` turns the store's feedback into training JSONL: a thumbs-down with a correction
becomes (conversation, corrected answer) with only that answer learned (earlier answers are context,
`"weight": 0`), a thumbs-up from a trusted rater (`feedback.trust`) keeps (prompt, answer), and on
request the pair (chosen = correction, rejected = answer) for preference training. `forja train
--from-feedback` trains the next version from the active one on the unused pairs plus a replay of that
version's own training data (never a row whose question was corrected), until every correction is
reproduced, then gates it: the corrected prompts must be answered as sent, their rewordings better than
before, and a regression set (the operator's test set, else the old version's rows) must not get worse.
Ratings teach too, in the same run (forja.train_prefs): a thumbs-down without a correction, or a thumbs-up
that may not train word for word, is a KTO row (the answer rated bad or good), and an answer with its
correction is also a DPO pair; the gate's ratings check shows what they changed.
An agent's tool call corrected (the step, the arguments it should have had) trains as that call: the
conversation up to the step, then the corrected call learned, prompted with the tools the persona offered.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forja import models
from forja.chat import corrected_turn
from forja.config import ForjaError, Settings, TrainSettings
from forja.data import is_preference, meta_path, read_rows, validation_path, write_jsonl
from forja.guard import Guards, refused_characters
from forja.store import Store

FEEDBACK_RECORD = "feedback.json"  # in a run made from feedback: which rows it learns from
GATE_INPUTS = "gate_inputs.json"  # in a run made from feedback: the pairs and rows its gate checks
GATE_FILE = "gate.json"  # in a version made from feedback: the promotion check


class FeedbackError(ForjaError):
    """Nothing to learn from, or a retrain that cannot start; one line for the user."""


@dataclass
class Pair:
    """What one answered prompt teaches, from all the feedback it got."""

    exchange_id: str
    prompt: list[dict[str, str]] | str  # chat messages before the answer, or a raw completion prompt
    answer: str  # the answer to learn: the correction, or the approved answer
    kind: str  # "correction", "approved", "call" (learned word for word), "liked" or "disliked" (rated answers)
    feedback_ids: list[int]
    rejected: str | None = None  # the answer the correction replaces
    tools: list[dict[str, Any]] | None = None  # an agent persona's tools, offered when it answered
    call: dict[str, Any] | None = None  # kind "call": the assistant turn with the corrected tool call, to learn

    @property
    def supervised(self) -> bool:
        """An answer (or a tool call) to learn word for word, not a rating of one."""
        return self.kind in ("correction", "approved", "call")

    @property
    def answers_question(self) -> bool:
        """An answer to the user's question (replacing a FAQ row asking it), not a tool call on the way."""
        return self.supervised and self.kind != "call"

    def training_row(self) -> dict[str, Any]:
        """The pair as a training row: only its own answer is learned (must_learn: a retrain runs until it is
        reproduced); the conversation's earlier answers were never checked by anyone, so they are context.
        A rated answer is a KTO row {prompt, completion, label}."""
        source = f"feedback:{','.join(map(str, self.feedback_ids))}"
        if not self.supervised:
            return {"prompt": self.prompt, "completion": self.answer, "label": self.kind == "liked", "source": source,
                    "exchange_id": self.exchange_id, "feedback_ids": self.feedback_ids, "kind": self.kind}
        if isinstance(self.prompt, str):
            row: dict[str, Any] = {"text": self.prompt + self.answer}
        elif self.call is not None:  # the calls before it are context, as every earlier turn
            context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in self.prompt]
            row = {"messages": [*context, self.call], "tools": self.tools}
        else:
            # an approved agent answer approves the tool calls that led to it (after the last question): they
            # are learned with it; a corrected answer's calls, and every earlier turn, are context
            asked = max((i for i, m in enumerate(self.prompt) if m["role"] == "user"), default=-1)
            context = [{**m, "weight": 0} if m["role"] == "assistant" and (i < asked or self.kind != "approved")
                       else m for i, m in enumerate(self.prompt)]
            row = {"messages": [*context, {"role": "assistant", "content": self.answer}], "must_learn": True}
            if self.tools:
                row["tools"] = self.tools
        return {**row, "source": source, "exchange_id": self.exchange_id, "feedback_ids": self.feedback_ids,
                "kind": self.kind}

    @property
    def question(self) -> str:
        """The user's last message (what a replayed row that this answer replaces also asks)."""
        return self.prompt if isinstance(self.prompt, str) else last_question(self.prompt)

    def preference_row(self) -> dict[str, Any]:
        """A correction as a preference pair: the correction chosen over the answer it replaces."""
        return {"prompt": self.prompt, "chosen": self.answer, "rejected": self.rejected,
                "exchange_id": self.exchange_id, "feedback_ids": self.feedback_ids}


def call_pair(exchange_id: str, messages: list[dict[str, Any]], steps: int, correction: dict[str, Any],
              feedback_ids: list[int], tools: Any) -> Pair | None:
    """A corrected tool call as a pair (forja.chat.corrected_turn); None when the stored conversation no
    longer holds the step."""
    found = corrected_turn(messages, steps, correction)
    if found is None:
        return None
    return Pair(exchange_id, found[0], "", "call", feedback_ids, tools=tools, call=found[1])


def last_question(messages: list[dict[str, Any]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def trusted(row: dict[str, Any], trust: str) -> bool:
    """Whether a thumbs-up may train its answer word for word: reviewed and approved, or (api_keys) sent with an
    API key, or (anyone) from anybody. A page visitor without a key is anyone: one click must not teach."""
    if row.get("review") == "approved" or trust == "anyone":
        return True
    return trust == "api_keys" and bool(row.get("sender"))


def collect_pairs(store: Store, *, include_used: bool = False, trust: str = "api_keys",
                  redact: Callable[[Any], Any] = lambda value: value, ratings: bool = False
                  ) -> tuple[list[Pair], dict[str, int]]:
    """Training pairs from the feedback (unused rows only unless include_used), oldest exchange first,
    and counts of what was left out and why. Rows rejected in review are left out. Per answer the newest
    correction wins; without one, an answer with more trusted thumbs-up (`trusted`) than thumbs-down is
    kept as it is. `redact` is applied to every text (the server already stores it redacted; this also
    cleans rows stored before the guardrails), and a pair with text the characters rail refuses is left out.
    With `ratings`, a chat answer rated down more than up without a correction is a "disliked" pair and one
    rated up only by raters who may not approve it word for word a "liked" one (KTO rows, not answers to copy)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    skipped = {"down_without_correction": 0, "comment_only": 0, "tied_ratings": 0, "unusable_prompt": 0,
               "untrusted_approval": 0, "rejected_in_review": 0, "refused_characters": 0}
    for row in reversed(store.feedback_rows(unused_only=not include_used)):  # oldest first
        if row.get("review") == "rejected":
            skipped["rejected_in_review"] += 1
            continue
        groups.setdefault((row["exchange_id"], row["choice"]), []).append(row)
    pairs = []
    for (exchange_id, _), rows in groups.items():
        prompt = redact(rows[0]["messages"])
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0] if len(prompt) == 1 else None  # a completion with several prompts
        if not prompt:
            skipped["unusable_prompt"] += 1
            continue
        # a corrected tool call trains that call (the newest correction of each step)
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r.get("tool_call"):
                by_step.setdefault(r["tool_call"]["step"], []).append(r)
        for step in sorted(by_step):
            newest = by_step[step][-1]  # the older ones are used up with it
            # (its arguments were stored redacted: POST /feedback redacts every string in them)
            found = call_pair(exchange_id, prompt, len(newest.get("trace") or []), newest["tool_call"],
                              [r["id"] for r in by_step[step]], newest.get("tools")) if isinstance(prompt, list) else None
            if found is None:
                skipped["unusable_prompt"] += 1
            else:
                pairs.append(found)
        # its thumbs-down is the call's, not a rating of the answer (unless the row corrects the answer too)
        rows = [r for r in rows if not r.get("tool_call") or r["correction"]]
        if not rows:
            continue
        ids = [r["id"] for r in rows]
        corrections = [r for r in rows if r["correction"]]
        if corrections:
            pairs.append(Pair(exchange_id, prompt, redact(corrections[-1]["correction"]), "correction", ids,
                              redact(rows[0]["answer"]), rows[0].get("tools")))
            continue
        ups = sum(r["rating"] == "up" and trusted(r, trust) for r in rows)
        downs = sum(r["rating"] == "down" for r in rows)
        if ups > downs:
            pairs.append(Pair(exchange_id, prompt, redact(rows[0]["answer"]), "approved",
                              [r["id"] for r in rows if r["rating"] != "up" or trusted(r, trust)],
                              tools=rows[0].get("tools")))
        elif any(r["rating"] == "up" for r in rows) and not ups and not downs:
            if ratings and isinstance(prompt, list):
                pairs.append(Pair(exchange_id, prompt, redact(rows[0]["answer"]), "liked", ids))
            else:
                skipped["untrusted_approval"] += 1
        elif downs > ups:
            if ratings and isinstance(prompt, list):
                pairs.append(Pair(exchange_id, prompt, redact(rows[0]["answer"]), "disliked",
                                  [r["id"] for r in rows if r["rating"] == "down"]))
            else:
                skipped["down_without_correction"] += 1
        elif ups:
            skipped["tied_ratings"] += 1
        else:
            skipped["comment_only"] += 1
    kept = [pair for pair in pairs if not has_refused_characters(pair)]
    skipped["refused_characters"] = len(pairs) - len(kept)
    return kept, skipped


def has_refused_characters(pair: Pair) -> bool:
    """Control characters or chat-template tokens (`<|im_start|>system`) must never become training data,
    whatever let them into the store: rows from before the rail, a rail turned off, an older server."""
    prompt = [pair.prompt] if isinstance(pair.prompt, str) else [m.get("content") for m in pair.prompt]
    texts = [*prompt, pair.answer, pair.rejected]
    return any(refused_characters(text) for text in texts if isinstance(text, str))


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
    tool_calls: int = 0  # corrected tool calls


def export(settings: Settings, out: Path, *, include_used: bool = False, preferences: bool = False) -> ExportSummary:
    """Write the feedback as training JSONL (and preference pairs next to it). Read-only on the store:
    rows are marked used only when a retrain actually learns from them."""
    store = Store.open(settings)
    try:
        pairs, skipped = collect_pairs(store, include_used=include_used, trust=settings.feedback.trust,
                                       redact=Guards(settings).redact)
    finally:
        store.close()
    write_training_file(out, [p.training_row() for p in pairs])
    summary = ExportSummary(out, len(pairs), sum(p.kind == "correction" for p in pairs),
                            sum(p.kind == "approved" for p in pairs), skipped, tool_calls=sum(p.kind == "call" for p in pairs))
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
    replaced_rows: int = 0  # old rows not replayed: their question was corrected
    contributed: dict[str, int] = field(default_factory=dict)  # training rows by kind (see `contributions`)
    answers: dict[str, Any] = field(default_factory=dict)  # the corrections reproduced at the end of training
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


def not_replaced(rows: list[dict[str, Any]], pairs: list[Pair]) -> list[dict[str, Any]]:
    """The rows whose last question no feedback pair answers anew (compared normalised: case, accents,
    punctuation): replaying the others would teach the answer a correction replaced (a FAQ row with the old
    opening hours next to the correction)."""
    from forja.metrics import normalize

    asked = {tuple(normalize(p.question)) for p in pairs}
    return [row for row in rows if not row.get("messages") or tuple(normalize(last_question(row["messages"]))) not in asked]


def faq_after(settings: Settings, start: str, pairs: list[Pair]) -> list[dict[str, str]]:
    """The FAQ a retrain answers from: `start`'s own rows (train.faq_retrieval) less those a pair answers
    anew (compared as not_replaced compares), then each chat pair's last question with its answer. None
    when `start` is a version without a FAQ; only the corrections when it is a base model."""
    from forja.metrics import normalize

    directory = models.version_dir(settings, start)
    path = directory / models.KNOWLEDGE_FILE if directory is not None else None
    if path is not None and not path.is_file():
        return []  # a version trained on other data (a corpus, conversations) or with faq_retrieval off: as it was
    old = read_rows(path) if path else []
    asked = {tuple(normalize(p.question)) for p in pairs}
    kept = [row for row in old if tuple(normalize(row["question"])) not in asked]
    return kept + [{"question": p.question, "answer": p.answer} for p in pairs if isinstance(p.prompt, list)]


def replay_sample(old_rows: list[dict[str, Any]], pairs: list[Pair], hyper: TrainSettings, ratio: float) -> list[dict[str, Any]]:
    """The old rows trained again with the feedback: all of a small data set, else `ratio` per pair."""
    if len(old_rows) <= hyper.small_data_rows:
        return list(old_rows)
    return random.Random(hyper.seed).sample(old_rows, min(len(old_rows), math.ceil(ratio * len(pairs))))


def contributions(rows: list[dict[str, Any]]) -> dict[str, int]:
    """What a retrain's rows are, by kind: answers learned word for word (corrections, approved), DPO pairs
    (an answer and its correction), KTO rows (thumbs up, thumbs down) and replayed rows of the old version."""
    count = lambda test: sum(1 for row in rows if test(row))  # noqa: E731
    return {"corrections": count(lambda r: r.get("kind") == "correction" and "messages" in r),
            "tool_calls": count(lambda r: r.get("kind") == "call"),
            "approved": count(lambda r: r.get("kind") == "approved"),
            "dpo_pairs": count(lambda r: "chosen" in r),
            "kto_up": count(lambda r: r.get("label") is True), "kto_down": count(lambda r: r.get("label") is False),
            "replayed": count(lambda r: "kind" not in r)}


def retrain(settings: Settings, hyper: TrainSettings, *, base: str | None = None, name: str | None = None,
            promote: bool = True, progress: bool = True) -> RetrainResult:
    """Train a new version from `base` (default: the active version) on the unused feedback, then gate it."""
    from forja import train as training

    store = Store.open(settings)
    try:
        pairs, skipped = collect_pairs(store, trust=settings.feedback.trust, redact=Guards(settings).redact,
                                       ratings=True)
        if not pairs:
            stats = store.stats()
            raise FeedbackError(
                f"no new feedback to learn from ({stats['feedback']} feedback rows, {stats['unused']} unused; "
                f"left out: {', '.join(f'{k}={v}' for k, v in skipped.items() if v) or 'none'})"
            )
        start = base or models.active_model(settings)
        models.resolve(start, settings)
        answers = [p for p in pairs if p.supervised]  # a rating replaces no row and puts nothing in the FAQ
        train_pairs, held_pairs = split_holdout(answers, settings, hyper.seed)
        rated = [p for p in pairs if not p.supervised]
        old_train, old_val = version_rows(settings, start)
        facts = [p for p in answers if p.answers_question]  # a corrected call replaces no row of the old data
        kept = not_replaced(old_train, facts)
        # the old rows are replayed as they were trained, not as rows to check (nor a preference row again:
        # its reference would be another model's)
        replay = [{k: v for k, v in row.items() if k != "must_learn"}
                  for row in replay_sample([r for r in kept if not is_preference(r)], train_pairs, hyper,
                                           settings.feedback.replay_ratio)]
        # a correction teaches its answer word for word and, as a DPO pair, that it beats the answer it replaces;
        # a rating alone is a KTO row: one run, the sum of the three losses (train_prefs)
        dpo = [p.preference_row() for p in train_pairs if p.kind == "correction" and isinstance(p.prompt, list)
               and p.rejected and p.rejected != p.answer]
        rows = [p.training_row() for p in train_pairs] + [{**r, "kind": "correction"} for r in dpo] + \
            [p.training_row() for p in rated] + replay
        random.Random(hyper.seed + 1).shuffle(rows)
        if hyper.system is None:  # the new version is prompted as the one it starts from
            hyper = hyper.model_copy(update={"system": models.trained_system(settings, start)})

        name = name or f"{Path(start).name.removesuffix('.gguf')}-fb{time.strftime('%Y%m%d-%H%M%S')}"
        staging = settings.home / "feedback" / name
        data_path = staging / training.DATA_FILE
        write_training_file(data_path, rows)
        validation = not_replaced(old_val, facts) + [p.training_row() for p in held_pairs]
        write_jsonl(validation_path(data_path), validation)
        # the FAQ it answers from: the starting version's, with the corrections in
        run = training.new_run(settings, [data_path], name, start, hyper,
                               faq=faq_after(settings, start, facts) if hyper.faq_retrieval else None)
        contributed = contributions(rows)
        trained = {i for p in train_pairs + rated for i in p.feedback_ids}
        record = {"started_from": start, "contributed": contributed,
                  "train_feedback_ids": sorted(trained),
                  # a row that corrects a call and the answer may be in both: it counts as trained
                  "holdout_feedback_ids": sorted({i for p in held_pairs for i in p.feedback_ids} - trained),
                  "replayed_rows": len(replay), "replaced_rows": len(old_train) - len(kept), "skipped": skipped}
        (run.directory / FEEDBACK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        # what the gate needs once the run is a version, kept with the run: a run resumed after a crash
        # (forja train --resume, a job taken over by another worker) is gated as an uninterrupted one
        (run.directory / GATE_INPUTS).write_text(json.dumps({
            "started_from": start, "pairs": [asdict(p) for p in pairs], "regression": kept + validation,
            "counts": [len(train_pairs), len(held_pairs), len(replay), len(old_train) - len(kept)],
            "contributed": contributed},
            ensure_ascii=False) + "\n")
        version = training.train(settings, run, progress=progress)
        record_version(settings, store, run.directory, version)
    finally:
        store.close()
    return conclude(settings, run.directory, version, promote=promote, progress=progress)


def conclude(settings: Settings, run_dir: Path, version: Path, *, promote: bool, progress: bool = True
             ) -> RetrainResult | None:
    """A feedback run that is now a version: gate it against the version it started from and promote it when
    it passes (and `promote`). None for a run that was not made from feedback."""
    path = run_dir / GATE_INPUTS
    if not path.is_file():
        return None
    inputs = json.loads(path.read_text())
    start = inputs["started_from"]
    result = RetrainResult(version, start, *inputs["counts"], contributed=inputs.get("contributed", {}),
                           answers=models.read_version(version).get("metrics", {}).get("answers", {}))
    pairs = [Pair(**p) for p in inputs["pairs"]]
    result.gate = gate(settings, start, version.name, pairs, inputs["regression"], progress=progress)
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


# ------------------------------------------------------------------------------------------------
# The gate


def row_case(row: dict[str, Any], check: str) -> Any:
    """A dialogue row as an evaluation case: the conversation up to its last answer, and that answer."""
    from forja.evaluate import TestCase

    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return TestCase(question=last_question(messages[:-1]), answer=messages[-1]["content"], messages=messages[:-1],
                    tags=[check])


def gate_cases(pairs: list[Pair], regression: list[dict[str, Any]], settings: Settings) -> list[Any]:
    """The three checks' cases, tagged by check: the feedback prompts as sent ("feedback"), reworded
    ("rewordings", by forja.rewordings) and the regression set ("regression": feedback.gate_testset, else
    the given rows: the starting version's training rows and validation split, replaced questions left out)."""
    from forja.evaluate import load_testset
    from forja.train import reworded_rows

    from forja.evaluate import TestCase

    config = settings.feedback
    # (a corrected tool call is not checked here: evaluation answers in text, without tools)
    rows = [p.training_row() for p in pairs if p.answers_question and not isinstance(p.prompt, str)]
    cases = [row_case(row, "feedback") for row in rows] + [row_case(row, "rewordings") for row in reworded_rows(rows, 2)]
    # the rated answers: is a disliked one given again, a liked one kept (the ratings check)
    cases += [TestCase(question=p.question, answer=p.answer, messages=[{"role": m["role"], "content": m["content"]}
                                                                       for m in p.prompt], tags=["ratings", p.kind])
              for p in pairs if not p.supervised]
    if config.gate_testset is not None:
        tests = load_testset(config.gate_testset)
        for case in tests:
            case.tags = ["regression"]
        regression_cases = tests
    else:
        usable = [r for r in regression if len(r.get("messages") or []) >= 2 and r["messages"][-1]["role"] == "assistant"]
        regression_cases = [row_case(r, "regression") for r in usable]
    return cases + regression_cases[: config.gate_max_cases]


def gate(settings: Settings, current: str, candidate: str, pairs: list[Pair], regression: list[dict[str, Any]], *,
         progress: bool = True) -> dict[str, Any]:
    """Answer the checks' cases with both versions and decide; always a verdict, since the feedback pairs
    themselves are a check. Passes when (feedback) the candidate answers at least `gate_corrections` of the
    prompts as sent, (rewordings) its answers to their rewordings are closer to the corrections than the
    current version's, and (regression) no gate metric's mean is lower than the current version's by more
    than the tolerance. The report (every question's before and after) is written into the version."""
    from forja.evaluate import evaluate, runs_on

    config = settings.feedback
    cases = gate_cases(pairs, regression, settings)
    report: dict[str, Any] = {
        "current": current, "candidate": candidate, "cases": len(cases), "tolerance": config.gate_tolerance,
        "backend": runs_on(settings),  # what forja serve runs: the gate scores the answers production gives
        "regression_set": str(config.gate_testset) if config.gate_testset else "the starting version's rows"}
    if not cases:  # corrected tool calls alone, from a model with no rows to check: nothing says it is better
        report |= {"checks": {}, "passed": False, "decided_by": "nothing to check",
                   "reason": "no answer to check: corrected tool calls are not evaluated (evaluation answers "
                             "without tools) and there is no regression set (feedback.gate_testset); promote it "
                             "by hand if it is right (forja models promote)"}
        _write_gate(settings, candidate, report)
        return report
    result = evaluate([current, candidate], cases, settings, max_new_tokens=config.gate_max_tokens, progress=progress)
    checks: dict[str, dict[str, Any]] = {}
    ratings = ratings_check(result.rows, current, candidate)
    if ratings:
        checks["ratings"] = ratings
    for check in ("feedback", "rewordings", "regression"):
        rows = {model: [r for r in result.rows if check in r["tags"] and r["model"] == model] for model in (current, candidate)}
        if not rows[candidate]:
            continue
        mean = lambda model, metric: sum(r.get(metric) or 0.0 for r in rows[model]) / len(rows[model])  # noqa: E731
        entry: dict[str, Any] = {"cases": len(rows[candidate]), "metrics": {}}
        for metric in ("exact_match", *config.gate_metrics):
            entry["metrics"][metric] = {"current": round(mean(current, metric), 4), "candidate": round(mean(candidate, metric), 4)}
        learned, f1 = entry["metrics"]["exact_match"], entry["metrics"].get("token_f1") or entry["metrics"]["exact_match"]
        if check == "feedback":
            entry["passed"] = learned["candidate"] >= config.gate_corrections
            entry["reason"] = (f"{round(learned['candidate'] * entry['cases'])} of {entry['cases']} feedback answers as sent "
                               f"(needs {config.gate_corrections:.0%})")
        elif check == "rewordings":
            entry["passed"] = f1["candidate"] > f1["current"] or f1["candidate"] == 1.0
            entry["reason"] = f"token F1 to the corrections on rewordings {f1['current']:.3f} -> {f1['candidate']:.3f}"
        else:
            worse = [f"{m} {v['candidate']:.3f} < {v['current']:.3f}" for m, v in entry["metrics"].items()
                     if m in config.gate_metrics and v["candidate"] < v["current"] - config.gate_tolerance]
            entry["passed"] = not worse
            entry["reason"] = "; ".join(worse) or f"no gate metric lower by more than {config.gate_tolerance}"
        entry["questions"] = [{"question": new["question"], "expected": new["ground_truth"], "before": old["answer"],
                               "after": new["answer"], "before_ok": bool(old.get("exact_match")),
                               "after_ok": bool(new.get("exact_match"))}
                              for old, new in zip(rows[current], rows[candidate])]
        checks[check] = entry
    checks = {name: checks[name] for name in ("feedback", "rewordings", "ratings", "regression") if name in checks}
    failed = [name for name, entry in checks.items() if not entry["passed"]]
    report |= {"checks": checks, "passed": not failed, "decided_by": failed[0] if failed else "all checks",
               "reason": checks[failed[0]]["reason"] if failed else "every check passed"}
    _write_gate(settings, candidate, report)
    return report


def _write_gate(settings: Settings, candidate: str, report: dict[str, Any]) -> None:
    """The report, into the version it decided on."""
    version_dir = models.resolve(candidate, settings).path
    if version_dir is not None:
        (version_dir / GATE_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def ratings_check(rows: list[dict[str, Any]], current: str, candidate: str) -> dict[str, Any] | None:
    """What the rated answers (KTO rows) changed: how often each version gives a disliked answer again and
    keeps a liked one, and how many answers are in the language of their question (forja.data.quality's
    detector: thumbs-down on English answers to Spanish questions should move it). Passes when the candidate
    repeats no more disliked answers, keeps as many liked ones, and answers in the question's language as often
    as the current version; None without rated answers."""
    from forja.data.quality import language

    mine = {model: [r for r in rows if "ratings" in r["tags"] and r["model"] == model] for model in (current, candidate)}
    if not mine[candidate]:
        return None
    def share(model: str, kind: str) -> float | None:
        picked = [r for r in mine[model] if kind in r["tags"]]
        return sum(bool(r.get("exact_match")) for r in picked) / len(picked) if picked else None

    def same_language(model: str) -> float:
        return sum(language(r["answer"] or "") == language(r["question"]) for r in mine[model]) / len(mine[model])

    metrics = {"disliked_repeated": {"current": share(current, "disliked"), "candidate": share(candidate, "disliked")},
               "liked_kept": {"current": share(current, "liked"), "candidate": share(candidate, "liked")},
               "same_language": {"current": same_language(current), "candidate": same_language(candidate)}}
    metrics = {k: {side: round(v, 4) for side, v in m.items()} for k, m in metrics.items() if m["current"] is not None}
    worse = []
    for name, better in (("disliked_repeated", lambda a, b: b <= a), ("liked_kept", lambda a, b: b >= a),
                         ("same_language", lambda a, b: b >= a)):
        if name in metrics and not better(metrics[name]["current"], metrics[name]["candidate"]):
            worse.append(name)
    told = "; ".join(f"{name.replace('_', ' ')} {m['current']:.2f} -> {m['candidate']:.2f}" for name, m in metrics.items())
    questions = []
    for old, new in zip(mine[current], mine[candidate]):
        disliked = "disliked" in new["tags"]
        questions.append({"question": new["question"], "expected": new["ground_truth"], "rating": "down" if disliked else "up",
                          "before": old["answer"], "after": new["answer"],
                          # ok: a disliked answer not given, a liked one given
                          "before_ok": bool(old.get("exact_match")) != disliked,
                          "after_ok": bool(new.get("exact_match")) != disliked})
    return {"cases": len(mine[candidate]), "metrics": metrics, "passed": not worse, "questions": questions,
            "reason": (f"worse: {', '.join(worse)} ({told})" if worse else told)}
