"""Grammar-constrained decoding: a Grammar (a JSON schema, any JSON object, or tool calls) compiled once
per tokenizer, and one Constraint per sequence that masks each step's logits and follows the sampled
tokens. Built on llguidance; the scheduler calls `mask` before sampling and `accept` after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from forja.chat import CALL_HEAD, CALL_SEPARATOR, CALL_TAIL, TOOL_CALL_OPEN, Tool, ToolFormatError
from forja.config import ForjaError

# The JSON we let the model write: one line, separators as json.dumps writes them. Free whitespace lets a
# small model pad forever with spaces and newlines instead of closing the object.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ToolFormatError):
    """A schema or tool request that cannot become a grammar (an HTTP 400); the message says what to fix."""


class TokenNotAllowed(ForjaError):
    """A token the grammar does not allow at this point was given to Constraint.accept."""


@dataclass
class ToolCallSpec:
    """What the model may write when it has tools: `required` = only calls (at least one); otherwise free
    text or calls (tool_choice "auto"). `parallel` False = exactly one call."""

    tools: list[Tool]
    required: bool
    parallel: bool = True


class Constraint:
    """One sequence's place in a Grammar: `mask` the logits, sample, `accept` the token; stop when `done`."""

    def __init__(self, grammar: Grammar, matcher: Any):
        self.grammar = grammar
        self._matcher = matcher

    def mask(self, logits: torch.Tensor | np.ndarray) -> None:
        """Set the logits of every token the grammar does not allow now to -inf, in place. A row longer
        than the tokenizer's vocabulary (a padded embedding) has its extra tokens masked too."""
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        allowed = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        n = min(len(logits), len(allowed))
        blocked = torch.from_numpy(allowed[:n] == 0).to(logits.device)
        logits[:n].masked_fill_(blocked, float("-inf"))
        logits[n:] = float("-inf")

    def accept(self, token: int) -> None:
        """Advance past a sampled token; raise TokenNotAllowed (the state unchanged) if the grammar forbids it."""
        if self._matcher.validate_tokens([token]) != 1 or not self._matcher.consume_token(token):
            piece = self.grammar.tokenizer.decode([token]) if 0 <= token < len(self.grammar.tokenizer) else "?"
            raise TokenNotAllowed(
                f"token {token} ({piece!r}) is not allowed here by the {self.grammar.name} grammar "
                "(mask the logits with this constraint before sampling)"
            )

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more but EOS: the sequence must stop."""
        return self._matcher.is_stopped()


class Grammar:
    """An output grammar compiled for one tokenizer. Build it with `json_schema`, `json_object` or
    `tool_calls` (compiled once per tokenizer and spec, then cached); `start()` for each sequence."""

    def __init__(self, tokenizer: Any, lark: str, name: str, eos_token_ids: tuple[int, ...]):
        from llguidance import LLMatcher

        self.tokenizer = tokenizer
        self.lark = lark
        self.name = name
        self._prototype = LLMatcher(_ll_tokenizer(tokenizer, eos_token_ids), LLMatcher.grammar_from_lark(lark),
                                    log_level=0)
        if self._prototype.is_error():
            raise GrammarError(self._prototype.get_error())

    @classmethod
    def json_schema(cls, tokenizer: Any, schema: dict[str, Any], *, strict: bool = True,
                    eos_token_ids: set[int] | None = None) -> Grammar:
        """JSON that validates against `schema`. Not strict: keywords llguidance cannot enforce are ignored."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, not {type(schema).__name__}")
        return _cached(tokenizer, _eos(tokenizer, eos_token_ids), f"start: {_json_rule(schema, strict)}\n",
                       "JSON schema")

    @classmethod
    def json_object(cls, tokenizer: Any, *, eos_token_ids: set[int] | None = None) -> Grammar:
        """Any JSON object."""
        return _cached(tokenizer, _eos(tokenizer, eos_token_ids), f"start: {_json_rule({'type': 'object'}, True)}\n",
                       "JSON object")

    @classmethod
    def tool_calls(cls, tokenizer: Any, spec: ToolCallSpec, *, eos_token_ids: set[int] | None = None) -> Grammar:
        """Calls written `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one a line, as
        `spec` allows; with `spec.required` False, free text instead, or free text then the calls."""
        if not spec.tools:
            raise GrammarError("tool calls need at least one tool")
        more = f" ({_literal(CALL_SEPARATOR)} call)*" if spec.parallel else ""
        if spec.required:
            lines = [f"start: call{more}"]
        else:
            # The opening is a lazy lexeme: it ends at the first "<tool_call>", so free text can hold no
            # "<tool_call>" that is not a real call, and plain text is a single lexeme (no extra cost).
            lines = [f"start: TEXT? | opening body{more}",
                     rf"opening[lazy]: /(.|\n)*{TOOL_CALL_OPEN}/",
                     r"TEXT: /(.|\n)+/"]
        choice = " | ".join(f"tool_{i}" for i in range(len(spec.tools)))
        lines += [f"call: {_literal(TOOL_CALL_OPEN)} body",
                  f"body: {_literal(CALL_HEAD)} ({choice}) {_literal(CALL_TAIL)}"]
        # Each tool's arguments are a JSON document of their own, so a "$ref" in them resolves as the
        # client meant; the wrapper around them is literal text.
        for i, tool in enumerate(spec.tools):
            head = _literal(json.dumps(tool.name) + ', "arguments": ')
            lines.append(f"tool_{i}: {head} {_json_rule(tool.parameters, tool.strict)}")
        eos = _eos(tokenizer, eos_token_ids)
        try:
            return _cached(tokenizer, eos, "\n".join(lines) + "\n", "tool-call")
        except GrammarError:
            for tool in spec.tools:  # say which tool's schema is wrong
                try:
                    _cached(tokenizer, eos, f"start: {_json_rule(tool.parameters, tool.strict)}\n", "JSON schema")
                except GrammarError as exc:
                    raise GrammarError(f"tool {tool.name}: parameters: {exc}") from None
            raise

    def start(self) -> Constraint:
        """A fresh constraint for one sequence (a copy of the compiled state: microseconds)."""
        return Constraint(self, self._prototype.deep_copy())


def _literal(text: str) -> str:
    """A Lark string literal (its escapes are JSON's)."""
    return json.dumps(text)


def _json_rule(schema: dict[str, Any], strict: bool) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_STYLE, "lenient": not strict}})


def _eos(tokenizer: Any, eos_token_ids: set[int] | None) -> tuple[int, ...]:
    ids = eos_token_ids or {tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


@lru_cache(maxsize=256)
def _cached(tokenizer: Any, eos_token_ids: tuple[int, ...], lark: str, name: str) -> Grammar:
    return Grammar(tokenizer, lark, name, eos_token_ids)


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: Any, eos_token_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a HF tokenizer (about 0.2 s for a 49k vocabulary, so once per tokenizer)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(eos_token_ids))
