"""The words a keyword search looks for: folded (lower case, no accents) and without the English and Spanish
stopwords of stopwords.txt. Both keyword indexes (SQLite's FTS5, PostgreSQL's full-text search) and
`forja data synth`'s support measure see words this way."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

WORD = re.compile(r"\w+")


def folded(text: str) -> str:
    """Lower case without accents, as the keyword index's tokenizer sees a word: "Educación" → "educacion"."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    text = (Path(__file__).parent / "stopwords.txt").read_text(encoding="utf-8")
    return frozenset(w for line in text.splitlines() if not line.startswith("#") for w in line.split())


def query_words(query: str) -> list[str]:
    """The query's words as written, but the stopwords: what a keyword ranking matches any of."""
    return [w for w in WORD.findall(query) if folded(w) not in stopwords()]
