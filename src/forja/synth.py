"""Training data made from documents: `forja data synth DOCS... --out qa.jsonl` asks a model (the bundled one,
or --model) for the questions a customer would ask of each knowledge chunk, answered from the chunk, in JSON
its grammar enforces; pairs whose answer the chunk does not support are dropped and counted. `--paraphrase N`
adds N rewordings of each question of the dialogue files given. The output is dialogue data for `forja data
prepare`, each row with its source.

It lives after the engine and knowledge (it generates with the served engine on their chunks), so forja.data,
an earlier stage, stays free of them."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forja import data
from forja.config import Settings
from forja.engine import Answer, Engine, SamplingParams, answer_all

DEFAULT_QUESTIONS = 3  # per chunk
# An answer is supported by its chunk when at least this share of its content words (not stopwords; numbers
# count as words, so an invented price or date weighs against it) appear in the chunk, accents and case
# aside. Extractive answers score 1.0; a small model's invented answer about the same topic scores well
# under 0.5.
SUPPORT_OVERLAP = 0.6
MAX_QUESTION_CHARS = 200
MAX_ANSWER_CHARS = 300
# An answer that says the same run of this many words twice is looping, however well its words match.
REPEATED_WORDS = 6
DROPPED_SHOWN = 5  # dropped pairs of each reason kept in OUT.synth.json, to see why
# Rough tokens per character of the JSON the grammar allows (strings and keys), for max_new_tokens.
TOKENS_PER_CHAR = 0.4

SYSTEM = ("You write training data for a shop's customer-service assistant. You read an excerpt of the shop's "
          "documents and write the questions its customers would ask that the excerpt answers, each with a short "
          "answer that says only what the excerpt says, in the excerpt's own language and words.")
PARAPHRASE_SYSTEM = ("You reword customer questions. Each rewording asks the same thing in other words, in the "
                     "same language, as a different customer would write it.")


def pairs_schema(n: int) -> dict[str, Any]:
    """The JSON the model writes for a chunk: up to n question/answer pairs."""
    pair = {"type": "object", "additionalProperties": False, "required": ["question", "answer"], "properties": {
        "question": {"type": "string", "minLength": 8, "maxLength": MAX_QUESTION_CHARS},
        "answer": {"type": "string", "minLength": 2, "maxLength": MAX_ANSWER_CHARS}}}
    return {"type": "object", "additionalProperties": False, "required": ["pairs"],
            "properties": {"pairs": {"type": "array", "items": pair, "minItems": 1, "maxItems": n}}}


def paraphrases_schema(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["questions"], "properties": {
        "questions": {"type": "array", "minItems": n, "maxItems": n,
                      "items": {"type": "string", "minLength": 8, "maxLength": MAX_QUESTION_CHARS}}}}


@dataclass
class SynthReport:
    """What `synth` wrote: rows kept and why the others were dropped."""

    out: Path
    meta: Path
    model: str
    chunks: int = 0
    generated: int = 0  # pairs the model wrote
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason → pairs
    paraphrased: int = 0  # questions reworded
    paraphrases: int = 0  # rewordings kept
    paraphrases_dropped: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    dropped_examples: list[dict[str, Any]] = field(default_factory=list)  # the first few of each reason

    def render(self) -> str:
        lines = [f"Wrote {self.kept + self.paraphrases} rows to {self.out} (sources and counts in {self.meta})"]
        if self.chunks:
            dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
            lines.append(f"  {self.chunks} chunks → {self.generated} pairs by {self.model}: {self.kept} kept, "
                         f"{sum(self.dropped.values())} dropped ({dropped})")
        if self.paraphrased:
            dropped = ", ".join(f"{n} {r}" for r, n in sorted(self.paraphrases_dropped.items())) or "none"
            lines.append(f"  {self.paraphrased} questions → {self.paraphrases} paraphrases kept, "
                         f"{sum(self.paraphrases_dropped.values())} dropped ({dropped})")
        for row in self.examples[:3]:
            lines.append(f"  e.g. {row['messages'][0]['content']!r} → {row['messages'][1]['content']!r} ({row['source']})")
        return "\n".join(lines)


def words(text: str) -> list[str]:
    """Lower-case words without accents: what support is measured on."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    return re.findall(r"[^\W_]+", "".join(c for c in folded if not unicodedata.combining(c)))


def support(answer: str, chunk: str) -> float:
    """The share of the answer's content words (numbers included, stopwords not) found in the chunk."""
    from forja.knowledge.words import stopwords

    stop = stopwords()
    content = [w for w in words(answer) if w not in stop]
    if not content:
        return 0.0
    found = set(words(chunk))
    return sum(w in found for w in content) / len(content)


def repeats(text: str, size: int = REPEATED_WORDS) -> bool:
    """Whether some run of `size` words comes twice in `text`."""
    found = words(text)
    runs = [tuple(found[i:i + size]) for i in range(len(found) - size + 1)]
    return len(set(runs)) < len(runs)


def check_pair(question: str, answer: str, chunk: str, seen: set[str]) -> str | None:
    """Why a generated pair is dropped ("empty", "duplicate", "repetitive", "unsupported"), or None to keep it."""
    key = " ".join(words(question))
    if not key or not words(answer) or key == " ".join(words(answer)):
        return "empty"
    if key in seen:
        return "duplicate"
    if repeats(answer):
        return "repetitive"
    if support(answer, chunk) < SUPPORT_OVERLAP:
        return "unsupported"
    seen.add(key)
    return None


def _parsed(answer: Answer, key: str) -> list[Any] | None:
    if answer.finish_reason != "stop":
        return None
    try:
        value = json.loads(answer.text)
    except json.JSONDecodeError:
        return None
    items = value.get(key) if isinstance(value, dict) else None
    return items if isinstance(items, list) else None


def chunk_prompt(chunk: Any, n: int) -> list[dict[str, str]]:
    where = " > ".join(chunk.headings)
    excerpt = (f"Section: {where}\n" if where else "") + chunk.text
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Excerpt:\n{excerpt}\n\nWrite up to {n} questions a customer would ask "
                                        "that this excerpt answers, each a different question, with its answer from the excerpt in one "
                                        "or two sentences. "
                                        'Reply in JSON: {"pairs": [{"question": ..., "answer": ...}]}'}]


def paraphrase_prompt(question: str, n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": PARAPHRASE_SYSTEM},
            {"role": "user", "content": f"Question: {question}\n\nWrite {n} rewordings of it. "
                                        'Reply in JSON: {"questions": [...]}'}]


def synth(settings: Settings, paths: list[str], out: str | Path, *, model: str | None = None,
          questions: int = DEFAULT_QUESTIONS, paraphrase: int = 0, temperature: float | None = None, seed: int = 0,
          max_new_tokens: int | None = None, backend: str | None = None, engine: Engine | None = None,
          progress: Callable[[int, int], None] | None = None) -> SynthReport:
    """Write OUT (a JSONL of {"messages", "source"} rows) and OUT.synth.json (model, sources, counts).

    Knowledge files among `paths` are cut into chunks as `forja knowledge add` cuts them; each chunk is asked
    for up to `questions` pairs. With `paraphrase` N, each first user question of the dialogue files among
    them gets N rewordings, answered as the original. Sampling is `generate:`'s (its penalties; `temperature`
    overrides its temperature), as `forja generate` and the server sample. `max_new_tokens` bounds each answer (default: what the
    schema's longest JSON takes, and what the context leaves). `engine` replaces the one made for `model`."""
    from forja.engine.constrain import Grammar
    from forja.knowledge.chunks import read_document

    out = Path(out)
    if questions < 1:
        raise data.DataError(f"--questions must be at least 1, not {questions}")
    if paraphrase < 0:
        raise data.DataError(f"--paraphrase must be 0 or more, not {paraphrase}")
    conversations, documents = data.sort_by_kind(paths)
    if not documents and not (paraphrase and conversations):
        what = ("the files hold conversations only; add --paraphrase N to reword their questions"
                if conversations else "no documents found")
        raise data.DataError(f"{', '.join(map(str, paths))}: {what} (synth reads {' '.join(data.CONTAINERS)})")
    from forja.embeddings import count_tokens

    chunks = [(path, number, chunk) for path in documents
              for number, chunk in enumerate(read_document(path, settings.knowledge, count_tokens).chunks, 1)]
    name = model or settings.model
    own_engine = engine is None
    if engine is None:
        from forja.engine import make_engine
        from forja.models import quiet_transformers

        quiet_transformers()
        engine = make_engine(name, settings, backend=backend, max_batch_size=8)
    report = SynthReport(out, out.with_suffix(".synth.json"), name, chunks=len(chunks))
    rows: list[dict[str, Any]] = []
    try:
        if chunks:
            grammar = Grammar.json_schema(engine.tokenizer, pairs_schema(questions), eos_token_ids=engine.eos_token_ids)
            budget = max_new_tokens or _budget(questions * (MAX_QUESTION_CHARS + MAX_ANSWER_CHARS))
            params = _sampling(settings, budget, temperature, seed, grammar)
            prompts = [chunk_prompt(c, questions) for _, _, c in chunks]
            answers = _answers(engine, prompts, _fitted(engine, prompts, params, [f"{p}#{n}" for p, n, _ in chunks]),
                               progress)
            seen: set[str] = set()
            for (path, number, chunk), answer in zip(chunks, answers):
                items = _parsed(answer, "pairs")
                if items is None:
                    report.dropped["unparsed"] += 1  # counted per chunk: its pairs are unknown
                    continue
                source = f"{path}#{number}"
                for item in items:
                    report.generated += 1
                    question, reply = " ".join(str(item.get("question", "")).split()), str(item.get("answer", "")).strip()
                    reason = check_pair(question, reply, chunk.text, seen)
                    if reason:
                        report.dropped[reason] += 1
                        if report.dropped[reason] <= DROPPED_SHOWN:
                            report.dropped_examples.append({"reason": reason, "question": question, "answer": reply,
                                                            "support": round(support(reply, chunk.text), 2),
                                                            "source": source})
                        continue
                    rows.append({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": reply}],
                                 "source": source, "chunk": chunk.text,
                                 "support": round(support(reply, chunk.text), 2)})
            report.kept = len(rows)
        if paraphrase and conversations:
            rows += _paraphrases(engine, conversations, paraphrase, settings, temperature, seed, max_new_tokens, report,
                                 progress)
    finally:
        if own_engine:
            engine.close()
    report.examples = rows[:3]
    data.write_jsonl(out, rows)
    meta = {"model": name, "questions_per_chunk": questions, "paraphrases_per_question": paraphrase,
            "temperature": settings.generate.temperature if temperature is None else temperature, "seed": seed, "support_overlap": SUPPORT_OVERLAP,
            "documents": [str(p) for p in documents], "chunks": len(chunks), "generated": report.generated,
            "kept": report.kept, "dropped": dict(report.dropped), "paraphrased": report.paraphrased,
            "paraphrases": report.paraphrases, "paraphrases_dropped": dict(report.paraphrases_dropped),
            "dropped_examples": report.dropped_examples,
            "sources": dict(Counter(r["source"] for r in rows))}
    report.meta.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def _sampling(settings: Settings, max_new_tokens: int, temperature: float | None, seed: int,
              grammar: Any) -> SamplingParams:
    from forja.config import SAMPLERS

    samplers = {name: getattr(settings.generate, name) for name in SAMPLERS}
    if temperature is not None:
        samplers["temperature"] = temperature
    return SamplingParams(max_new_tokens=max_new_tokens, seed=seed, grammar=grammar, **samplers)


def _budget(chars: int) -> int:
    return int(chars * TOKENS_PER_CHAR) + 64


MIN_NEW_TOKENS = 48  # room for at least one short pair


def _fitted(engine: Engine, prompts: list[Any], params: SamplingParams, names: list[str]) -> SamplingParams:
    """`params` with max_new_tokens lowered to what the longest prompt leaves of the model's context."""
    lengths = [len(engine.tokenize(p)) for p in prompts]
    longest = max(range(len(prompts)), key=lambda i: lengths[i])
    room = engine.context_length - lengths[longest]
    if room < MIN_NEW_TOKENS:
        raise data.DataError(
            f"{names[longest]}: the prompt takes {lengths[longest]} of the model's {engine.context_length} tokens of "
            f"context, leaving no room for an answer; lower knowledge.chunk_tokens in forja.yaml or use a model "
            "with a longer context (--model)")
    return SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, room)})


def _answers(engine: Engine, prompts: list[Any], params: SamplingParams,
             progress: Callable[[int, int], None] | None) -> list[Answer]:
    done = 0

    def tick(_: int, __: Answer) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(prompts))

    return answer_all(engine, prompts, params, done=tick)


def _paraphrases(engine: Engine, conversations: list[dict[str, Any]], n: int, settings: Settings,
                 temperature: float | None, seed: int,
                 max_new_tokens: int | None, report: SynthReport,
                 progress: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    from forja.engine.constrain import Grammar

    grammar = Grammar.json_schema(engine.tokenizer, paraphrases_schema(n), eos_token_ids=engine.eos_token_ids)
    params = _sampling(settings, max_new_tokens or _budget(n * MAX_QUESTION_CHARS), temperature, seed, grammar)
    firsts = [next(i for i, m in enumerate(row["messages"]) if m["role"] == "user") for row in conversations]
    questions = [row["messages"][i]["content"] for row, i in zip(conversations, firsts)]
    prompts = [paraphrase_prompt(q, n) for q in questions]
    answers = _answers(engine, prompts, _fitted(engine, prompts, params, [r["source"] for r in conversations]),
                       progress)
    seen = {" ".join(words(q)) for q in questions}
    rows = []
    for row, first, question, answer in zip(conversations, firsts, questions, answers):
        report.paraphrased += 1
        items = _parsed(answer, "questions")
        if items is None:
            report.paraphrases_dropped["unparsed"] += n
            continue
        for item in items:
            text = " ".join(str(item).split())
            key = " ".join(words(text))
            if not key:
                report.paraphrases_dropped["empty"] += 1
                continue
            if key in seen:
                report.paraphrases_dropped["duplicate"] += 1
                continue
            seen.add(key)
            messages = [dict(m) for m in row["messages"]]
            messages[first]["content"] = text
            rows.append({"messages": messages, "source": row["source"], "paraphrase_of": question})
            report.paraphrases += 1
    return rows
