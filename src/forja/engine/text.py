"""Between conversations and token ids: the chat template renders a conversation into the ids the engine
decodes, and `TextStream` turns the ids it samples back into streamed text (stop strings, UTF-8 safe),
decoding only the new token each time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forja.models import with_system


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after `system` when given (else the chat template's default system turn, if any)."""
    return with_system([{"role": "user", "content": prompt}], system)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The token ids of the conversation rendered with the model's chat template, ready for the answer;
    `tools` (OpenAI's shape) go to a template that has a tool format (`forja.chat.has_tool_format`)."""
    if tokenizer.chat_template:
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Base models without a template: plain concatenation of the turns.
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


class TextStream:
    """Turns sampled token ids into text deltas as they come, holding back an incomplete UTF-8 character
    and any tail that could still become a stop string. Each push costs the same at token 10 and token
    2,000: only the new token is decoded and only the text not yet released is searched."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.stopped = False
        self._step = incremental_decoder(tokenizer)
        self._released: list[str] = []  # the deltas handed out so far
        self._held = ""  # decoded text not handed out yet: at most a stop string's prefix, plus the new piece

    @property
    def text(self) -> str:
        """The answer so far, cut before a stop string (joined on demand: the hot path never reads it)."""
        return "".join(self._released) + self._held

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.stopped:
            return ""
        piece = self._step(token_id)
        if not piece:  # a special token, or a multi-byte character not complete yet
            return ""
        self._held += piece
        # A stop string never starts in released text: any tail that could begin one was held back.
        # So the held text alone is searched, and a stop string split over several tokens is still found.
        cut = first_stop(self._held, self.stop)
        if cut is not None:
            self._held = self._held[:cut]
            self.stopped = True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # hold back the longest tail that begins a stop string
        keep = 0 if final else max((next((n for n in range(min(len(s) - 1, len(self._held)), 0, -1)
                                          if self._held.endswith(s[:n])), 0) for s in self.stop), default=0)
        delta, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        if delta:
            self._released.append(delta)
        return delta


def first_stop(text: str, stop: list[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i != -1]
    return min(found) if found else None


def incremental_decoder(tokenizer: Any) -> Callable[[int], str | None]:
    """step(token_id) → the text this token adds (special tokens skipped), or None while a UTF-8 character
    is incomplete. Fast tokenizers use the tokenizers library's own DecodeStream; others re-decode a
    window of the last few tokens (vLLM's detokenizer)."""
    if getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        from tokenizers.decoders import DecodeStream

        stream, backend = DecodeStream(skip_special_tokens=True), tokenizer.backend_tokenizer
        return lambda token_id: stream.step(backend, token_id)
    return WindowDecoder(tokenizer).step


class WindowDecoder:
    """Incremental decoding with `tokenizer.decode` alone: decode the new tokens together with the tokens
    of the last released piece (the context that decides a leading space or a merged character) and hand
    out what the new ones add. The window holds a few tokens, never the whole answer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.window: list[int] = []
        self.read = 0  # window[:read] is text already handed out, kept as context

    def step(self, token_id: int) -> str | None:
        if token_id in self.special:
            return None
        self.window.append(token_id)
        before = self.tokenizer.decode(self.window[:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.window, skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return None
        self.window = self.window[self.read:]
        self.read = len(self.window)
        return text[len(before):]


def token_piece(tokenizer: Any, token: int | str) -> tuple[str, list[int]]:
    """A token's own text and its UTF-8 bytes, as OpenAI's logprobs give them. A byte-level BPE token that
    holds part of a character has bytes that are no text alone: its text then shows U+FFFD, its bytes are
    exact. An upstream's token is its text already (engine/upstream.py)."""
    if isinstance(token, str):
        return token, list(token.encode("utf-8"))
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
