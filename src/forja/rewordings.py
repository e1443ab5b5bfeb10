"""Rewordings of a question, made by rules: how a customer types the same thing differently.

Training validates a small FAQ on its own rows and these rewordings (nothing is held out of it), and the
feedback gate asks them to check that a correction generalises beyond the words it was sent with. They
change the wrapping of a question (case, accents, punctuation, a greeting, a polite frame, the bare
keywords), never its vocabulary: a rewording with other words ("¿a qué hora abren?" for "¿cuál es el
horario?") needs the user's own test set (`feedback.gate_testset`).
"""

from __future__ import annotations

import re
import unicodedata

SPANISH_HINTS = re.compile(r"[¿¡ñáéíóú]|\b(qué|que|cuál|cual|cómo|como|dónde|donde|cuándo|cuando|cuánto|cuanto|"
                           r"hay|tienen|puedo|es|el|la|los|las|de|del|en|para|por|con)\b", re.IGNORECASE)
# Words that open a question and say nothing of its subject: dropped in the bare-keywords form.
FRAME_WORDS = {
    "es": {"cual", "cuales", "que", "es", "son", "el", "la", "los", "las", "me", "puedes", "podrias", "decir",
           "quiero", "saber", "hay", "un", "una", "de", "por", "favor", "se", "puede"},
    "en": {"what", "which", "is", "are", "the", "a", "an", "do", "does", "you", "can", "could", "tell", "me",
           "i", "please", "of"},
}
FRAMES = {
    "es": ["Hola, {q}", "Una pregunta: {q}", "Perdona, {q}", "{q} Gracias."],
    "en": ["Hi, {q}", "Quick question: {q}", "Sorry, {q}", "{q} Thanks."],
}


def language(text: str) -> str:
    """'es' or 'en', by the marks and small words of Spanish."""
    return "es" if len(SPANISH_HINTS.findall(text)) >= 2 or "¿" in text else "en"


def plain(text: str) -> str:
    """Lower case, no accents: how many people type on a phone."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn").lower()


def rewordings(question: str, count: int = 3) -> list[str]:
    """Up to `count` rewordings of the question, each different from it and from each other; the same
    question always gives the same ones."""
    question = " ".join(question.split())
    lang = language(question)
    bare = question.strip("¿?¡! .").rstrip()
    inner = bare[:1].lower() + bare[1:] if bare[:2] != bare[:2].upper() else bare  # keep "IVA", "DNI"
    asked = f"¿{inner}?" if lang == "es" else f"{inner}?"
    frames = FRAMES[lang]
    pick = sum(map(ord, question)) % len(frames)  # a different frame for different questions
    keywords = [w for w in re.findall(r"\w+", plain(bare)) if w not in FRAME_WORDS[lang]]
    candidates = [
        frames[pick].format(q=asked),
        plain(bare) + "?",
        " ".join(keywords) + "?" if len(keywords) >= 1 else "",
        frames[(pick + 1) % len(frames)].format(q=plain(asked)),
    ]
    seen = {question.casefold()}
    out = []
    for candidate in candidates:
        if candidate and candidate.casefold() not in seen:
            seen.add(candidate.casefold())
            out.append(candidate)
    return out[:count]
