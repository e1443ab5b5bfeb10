"""Between conversations and token ids: the chat template renders a conversation into the ids the engine
decodes, and `TextStream` turns the ids it samples back into streamed text (stop strings, UTF-8 safe)."""

from __future__ import annotations

from typing import Any

from forja.models import with_system


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after `system` when given (else the chat template's default system turn, if any)."""
    return with_system([{"role": "user", "content": prompt}], system)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of the conversation rendered with the model's chat template, ready for the answer."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Base models without a template: plain concatenation of the turns.
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8
    character and any tail that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (after stop-string truncation)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.text = text
        for stop in self.stop:
            cut = text.find(stop)
            if cut != -1:
                self.text = text[:cut]
                self.stopped = True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])), default=0)
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta


def token_piece(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    """A token's own text and its UTF-8 bytes, as OpenAI's logprobs give them. A byte-level BPE token that
    holds part of a character has bytes that are no text alone: its text then shows U+FFFD, its bytes are
    exact."""
    piece = tokenizer.convert_ids_to_tokens(token)
    table = _byte_level_table()
    if isinstance(piece, str) and piece and all(c in table for c in piece) and _byte_level(tokenizer):
        raw = bytes(table[c] for c in piece)
        return raw.decode("utf-8", errors="replace"), list(raw)
    text = tokenizer.decode([token], skip_special_tokens=False)
    return text, list(text.encode("utf-8"))


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


_TABLE: dict[str, int] = {}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others
    for the characters from U+0100 on, in byte order."""
    if not _TABLE:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        _TABLE.update({chr(b): b for b in printable})
        _TABLE.update({chr(256 + i): b for i, b in enumerate(others)})
    return _TABLE
