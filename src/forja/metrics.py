"""Text metrics shared by training (were the answers learned?), evaluation and the promotion gate.

Normalisation: NFKD with the combining marks dropped (á → a, ñ → n), case folded, punctuation and
symbols turned into spaces ("1,10 €" and "1.10 €" give the same tokens), and the articles of English
and Spanish dropped, as SQuAD's evaluation drops English ones.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

ARTICLES = {"a", "an", "the", "el", "la", "los", "las", "un", "una", "unos", "unas"}


def normalize(text: str) -> list[str]:
    """The tokens the text metrics compare."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = []
    for char in decomposed:
        category = unicodedata.category(char)
        if category == "Mn":
            continue
        kept.append(" " if category[0] in "PSZC" else char)
    return [token for token in "".join(kept).casefold().split() if token not in ARTICLES]


def exact_match(answer: str, truth: str) -> float:
    return float(normalize(answer) == normalize(truth))


def contains_fact(answer: str, fact: str) -> float:
    """1 when the fact's normalised tokens appear in the answer one after another ("3,80 €" in "cuesta
    3.80 €"), else 0."""
    have, want = normalize(answer), normalize(fact)
    if not want:
        return 1.0
    return float(any(have[i:i + len(want)] == want for i in range(len(have) - len(want) + 1)))


def token_f1(answer: str, truth: str) -> float:
    """Harmonic mean of token precision and recall (bag of normalised tokens, as SQuAD)."""
    pred, gold = normalize(answer), normalize(truth)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, truth: str) -> float:
    """ROUGE-L F1 over the normalised tokens (rouge-score's own tokenizer drops letters like á and ñ)."""
    pred, gold = normalize(answer), normalize(truth)
    if not pred or not gold:
        return float(pred == gold)
    lcs = lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def repeated_phrase(text: str, words: int = 6, times: int = 3) -> str | None:
    """The first phrase of `words` normalised words that the text says `times` times or more without
    overlap (an answer looping on itself), else None."""
    tokens = normalize(text)
    counts: Counter[tuple[str, ...]] = Counter()
    last_start: dict[tuple[str, ...], int] = {}
    for start in range(len(tokens) - words + 1):
        phrase = tuple(tokens[start:start + words])
        if phrase in last_start and start < last_start[phrase] + words:
            continue  # overlaps the previous time it was said
        last_start[phrase] = start
        counts[phrase] += 1
        if counts[phrase] >= times:
            return " ".join(phrase)
    return None
