"""The OpenAI request fields that constrain an answer: `response_format` and `tools` / `tool_choice` /
`parallel_tool_calls` become a Grammar of engine/constrain.py, and the tool-call text the model writes
becomes OpenAI `tool_calls`. The chat routes call these; a bad value raises GrammarError (a 400).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from forja.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolFormatError, functions as chat_functions
from forja.engine.constrain import Grammar, GrammarError, ToolCallSpec

CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a model's answer into the text before its first tool call (None when empty) and the calls
    in OpenAI's shape. A block that is not a complete call (cut off by max_tokens) is left out; text
    with no call comes back whole."""
    calls = []
    for block in CALL_BLOCK.finditer(text):
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        if not isinstance(call.get("arguments"), dict):
            continue
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
        })
    if not calls:
        return text, []
    content = text[: text.index(TOOL_CALL_OPEN)].strip()
    return content or None, calls


def tool_call_spec(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None = None,
                   parallel_tool_calls: bool | None = None) -> ToolCallSpec | None:
    """What the model may write given the request's tools; None when it answers freely (no tools, or
    tool_choice "none"). tool_choice defaults to "auto", parallel_tool_calls to true, as OpenAI's do."""
    if not tools or tool_choice == "none":
        return None
    try:
        functions = chat_functions(tools)
    except ToolFormatError as exc:  # a 400 like every other grammar problem
        raise GrammarError(str(exc)) from None
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None or tool_choice == "auto":
        return ToolCallSpec(functions, required=False, parallel=parallel)
    if tool_choice == "required":
        return ToolCallSpec(functions, required=True, parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [f for f in functions if f.name == name]
        if not chosen:
            known = ", ".join(f.name for f in functions)
            raise GrammarError(f"tool_choice names the function {name!r}, which is not in tools ({known})")
        return ToolCallSpec(chosen, required=True, parallel=parallel)
    raise GrammarError(
        f'tool_choice {tool_choice!r} is not supported: use "none", "auto", "required" or '
        '{"type": "function", "function": {"name": ...}}'
    )


def response_format_grammar(tokenizer: Any, response_format: dict[str, Any] | None,
                            eos_token_ids: set[int] | None = None) -> Grammar | None:
    """The Grammar for a request's response_format; None for {"type": "text"} or no response_format."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object(tokenizer, eos_token_ids=eos_token_ids)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise GrammarError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        try:
            return Grammar.json_schema(tokenizer, spec["schema"], strict=bool(spec.get("strict")),
                                       eos_token_ids=eos_token_ids)
        except GrammarError as exc:
            raise GrammarError(f"response_format json_schema {spec.get('name', '')!r}: {exc}") from None
    raise GrammarError(f'response_format type {kind!r} is not supported: use "text", "json_object" or "json_schema"')


class ToolCallStream:
    """Splits a streamed answer into content and tool calls as it arrives: content is passed on until a
    call block may be starting (a tail that could be the start of `<tool_call>` is held back), each call is
    handed out whole once its block closes. `feed` returns (content, calls), `finish` the content left."""

    def __init__(self) -> None:
        self.buffer = ""
        self.in_calls = False
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        if not self.in_calls:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start == -1:
                keep = max((n for n in range(len(TOOL_CALL_OPEN) - 1, 0, -1) if self.buffer.endswith(TOOL_CALL_OPEN[:n])),
                           default=0)
                content, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return content, []
            content, self.buffer, self.in_calls = self.buffer[:start].rstrip(), self.buffer[start:], True
        else:
            content = ""
        calls = []
        while TOOL_CALL_CLOSE in self.buffer:
            end = self.buffer.index(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE)
            _, parsed = parse_tool_calls(self.buffer[:end])
            calls += parsed
            self.buffer = self.buffer[end:].lstrip("\n")
        self.calls += calls
        return content, calls

    def finish(self) -> str:
        """What is left: held-back text that was no call after all (an unfinished call block is dropped)."""
        rest, self.buffer = ("" if self.in_calls else self.buffer), ""
        return rest
