"""The quality report of `forja data inspect`: near-duplicate questions, answers far shorter or longer than the
rest, the language of each row, personal data (the guard's detectors), conversations over the context and each
source's share; `forja data inspect --html report.html` writes it as a page with the token-length histogram."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forja.data import _fold, row_texts

# Two questions are near duplicates when the character trigrams of their normalised text (lower case, no
# accents or punctuation) have a Jaccard similarity of at least this: next to "¿Abrís los lunes?",
# "abris los lunes" is 1.0 and "¿Abren los lunes?" 0.61, but "¿Abrís los martes?" (another question) 0.50;
# "¿Cuánto cuesta el envío a Madrid?" is 0.70 from "¿Cuánto cuesta el envío?". Trigrams, not words, so
# that a changed ending ("abrís"/"abren") counts as a small change in a short question.
NEAR_DUPLICATE_JACCARD = 0.6
# An answer is far shorter or longer than the rest below a quarter or above four times the median's tokens,
# looked at only with at least this many answers (fewer say nothing about "the rest").
LENGTH_RATIO = 4.0
MIN_ROWS_FOR_LENGTHS = 5
SHOWN = 5  # examples per finding
# Function words that tell Spanish from English in a line or two (accents folded, as `_words` leaves them).
SPANISH_WORDS = frozenset(
    "el la los las un una unos unas de del al y o que en por para con sin se su sus es son esta este esto "
    "estan hay como cuando donde cual quien pero mas muy ya si no tu mi me te le les lo nos usted ustedes "
    "hola gracias puedo quiero tiene tienen hace hacen abren abris horario precio cuanto cuesta envio".split())
ENGLISH_WORDS = frozenset(
    "the a an of and or to in on for with without is are was were be been it its this that these those "
    "there what when where which who how but more very yes no you your my me we our they them can could "
    "do does did have has hello thanks please open price cost shipping".split())
LANGUAGES = ("es", "en", "other")


@dataclass
class Pair:
    """Two rows whose questions are near duplicates."""

    first: str  # the rows' sources, "faq.csv:3"
    second: str
    similarity: float
    questions: tuple[str, str]


@dataclass
class Quality:
    """What the quality report found in the training rows `inspect` read."""

    rows: int = 0
    conversations: int = 0
    near_duplicates: list[Pair] = field(default_factory=list)
    median_answer: int = 0  # tokens
    short_answers: list[tuple[str, int]] = field(default_factory=list)  # (source, tokens)
    long_answers: list[tuple[str, int]] = field(default_factory=list)
    languages: dict[str, list[str]] = field(default_factory=dict)  # "es" → sources of the rows in Spanish
    pii: dict[str, list[str]] = field(default_factory=dict)  # entity → sources of the rows holding one
    context: int = 0
    over_context: list[tuple[str, int]] = field(default_factory=list)  # (source, tokens)
    shares: list[tuple[str, int, int]] = field(default_factory=list)  # (file, training rows, tokens)

    def render(self) -> list[str]:
        lines = ["Quality:"]
        pairs = self.near_duplicates
        lines.append(f"  near-duplicate questions (trigram Jaccard ≥ {NEAR_DUPLICATE_JACCARD}): {len(pairs)} pairs")
        lines += [f"    {p.first} ~ {p.second} ({p.similarity:.2f}): {_quote(p.questions[0])} / {_quote(p.questions[1])}"
                  for p in pairs[:SHOWN]]
        if len(pairs) > SHOWN:
            lines.append(f"    … and {len(pairs) - SHOWN} more")
        if self.conversations >= MIN_ROWS_FOR_LENGTHS:
            lines.append(f"  answers far from the median of {self.median_answer} tokens (under 1/{LENGTH_RATIO:g} or "
                         f"over {LENGTH_RATIO:g}x): {len(self.short_answers)} shorter, {len(self.long_answers)} longer")
            for word, found in (("shorter", self.short_answers), ("longer", self.long_answers)):
                if found:
                    lines.append(f"    {word}: " + ", ".join(f"{s} ({n})" for s, n in found[:SHOWN])
                                 + (f", … and {len(found) - SHOWN} more" if len(found) > SHOWN else ""))
        else:
            lines.append(f"  answer lengths: fewer than {MIN_ROWS_FOR_LENGTHS} conversations, not compared")
        total = self.rows or 1
        mix = ", ".join(f"{lang} {100 * len(self.languages.get(lang, [])) / total:.0f}% ({len(self.languages.get(lang, []))})"
                        for lang in LANGUAGES)
        lines.append(f"  language per row: {mix}")
        if self.languages.get("other"):
            lines.append("    other: " + _sources(self.languages["other"]))
        if self.pii:
            lines.append(f"  personal data: {sum(len(v) for v in self.pii.values())} found in "
                         f"{len({s for v in self.pii.values() for s in v})} rows (forja data prepare --redact replaces it)")
            lines += [f"    {entity}: {_sources(found)}" for entity, found in sorted(self.pii.items())]
        else:
            lines.append("  personal data: none found")
        lines.append(f"  conversations over the context of {self.context} tokens: {len(self.over_context)}"
                     + (" (training leaves them out: shorten them or raise train.max_seq_length)" if self.over_context else ""))
        if self.over_context:
            lines.append("    " + ", ".join(f"{s} ({n})" for s, n in self.over_context[:SHOWN])
                         + (f", … and {len(self.over_context) - SHOWN} more" if len(self.over_context) > SHOWN else ""))
        all_tokens = sum(t for _, _, t in self.shares) or 1
        lines.append("  share per source (of tokens):")
        lines += [f"    {100 * tokens / all_tokens:5.1f}%  {path} ({rows} rows, {tokens:,} tokens)"
                  for path, rows, tokens in self.shares]
        return lines


def _quote(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return '"' + (text if len(text) <= width else text[: width - 1] + "…") + '"'


def _sources(found: list[str]) -> str:
    return ", ".join(found[:SHOWN]) + (f", … and {len(found) - SHOWN} more" if len(found) > SHOWN else "")


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+|\d+", _fold(text))


def trigrams(text: str) -> set[str]:
    """Character trigrams of the text's words joined by single spaces, padded at both ends."""
    normal = " " + " ".join(_words(text)) + " "
    return {normal[i:i + 3] for i in range(len(normal) - 2)}


def near_duplicates(questions: list[tuple[str, str]], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[Pair]:
    """Every pair of (source, question) whose trigram Jaccard is at least `threshold`, most similar first.

    All-pairs with prefix filtering (Bayardo et al. 2007): each set's trigrams sorted rarest first, two sets
    can reach the threshold only if they share a trigram among the first |x| - ceil(t|x|) + 1 of either, so
    only rows sharing such a rare trigram are compared; the result is the same as comparing every pair."""
    sets = [trigrams(q) for _, q in questions]
    frequency = Counter(g for s in sets for g in s)
    ordered = [sorted(s, key=lambda g: (frequency[g], g)) for s in sets]
    index: dict[str, list[int]] = defaultdict(list)
    pairs = []
    for i, grams in enumerate(ordered):
        if not grams:
            continue
        prefix = len(grams) - math.ceil(threshold * len(grams)) + 1
        candidates = {j for g in grams[:prefix] for j in index[g]}
        for j in sorted(candidates):
            similarity = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if similarity >= threshold:
                pairs.append(Pair(questions[j][0], questions[i][0], similarity, (questions[j][1], questions[i][1])))
        for g in grams[:prefix]:
            index[g].append(i)
    return sorted(pairs, key=lambda p: -p.similarity)


def language(text: str) -> str:
    """"es", "en" or "other": which language's function words the text holds more of (none: other)."""
    words = _words(text)
    spanish = sum(w in SPANISH_WORDS for w in words) + 2 * len(re.findall(r"[ñ¿¡]", text.casefold()))
    english = sum(w in ENGLISH_WORDS for w in words)
    if not spanish and not english:
        return "other"
    return "es" if spanish >= english else "en"




def assess(rows: list[dict[str, Any]], count: Callable[[str], int], context: int,
           files: Iterable[Any] = (), allow: Iterable[str] = ()) -> Quality:
    """The quality report of training rows (each with its "source"); `files` are the FileReports whose
    training rows and tokens give each source's share; `allow` are values the guard does not take for PII."""
    from forja.guard import find_pii

    quality = Quality(rows=len(rows), context=context)
    questions, answers = [], []
    for row in rows:
        source = row.get("source", "?")
        texts = row_texts(row)
        if "messages" in row:
            quality.conversations += 1
            user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
            questions.append((source, user))
            answer = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
            answers.append((source, count(answer)))
            tokens = sum(count(t) for t in texts)
            if tokens > context:
                quality.over_context.append((source, tokens))
        quality.languages.setdefault(language(" ".join(texts)), []).append(source)
        for entity in dict.fromkeys(entity for text in texts for entity, _, _ in find_pii(text, allow)):
            quality.pii.setdefault(entity, []).append(source)
    quality.near_duplicates = near_duplicates(questions)
    if answers:
        quality.median_answer = round(statistics.median(n for _, n in answers))
    if len(answers) >= MIN_ROWS_FOR_LENGTHS and quality.median_answer:
        median = quality.median_answer
        quality.short_answers = [(s, n) for s, n in answers if n * LENGTH_RATIO < median]
        quality.long_answers = [(s, n) for s, n in answers if n > median * LENGTH_RATIO]
    quality.shares = [(f.path, len(f.lengths), f.tokens) for f in files if not f.error]
    return quality


def write_html(path: Path, report: Any) -> None:
    """The report as one self-contained page (no scripts, no outside files): totals, the token-length
    histogram as inline SVG, and each quality finding."""
    import jinja2

    from forja.data import LENGTH_BINS

    lengths = report.lengths
    counts = [0] * (len(LENGTH_BINS) + 1)
    for n in lengths:
        counts[sum(n > bound for bound in LENGTH_BINS)] += 1
    labels = [f"≤{b}" for b in LENGTH_BINS] + [f">{LENGTH_BINS[-1]}"]
    shown = max((i for i, c in enumerate(counts) if c), default=0) + 1
    bars = list(zip(labels[:shown], counts[:shown]))
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    page = environment.get_template("quality.html").render(
        report=report, quality=report.quality, bars=bars, top=max(counts) or 1, languages=LANGUAGES,
        threshold=NEAR_DUPLICATE_JACCARD, ratio=LENGTH_RATIO, min_rows=MIN_ROWS_FOR_LENGTHS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
