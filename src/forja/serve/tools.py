"""The OpenAI request fields that constrain an answer: `response_format` and `tools` / `tool_choice` /
`parallel_tool_calls` become a Grammar of engine/constrain.py, and the tool-call text the model writes
becomes OpenAI `tool_calls`. The chat routes call these; a bad value raises GrammarError (a 400).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from forja.engine.constrain import (
    CALL_HEAD,
    CALL_TAIL,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    Grammar,
    GrammarError,
    Tool,
    ToolCallSpec,
)

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def render_tools_system(tools: list[dict[str, Any]]) -> str:
    """System-prompt text telling the model which functions it has and how to call them."""
    lines = ["You can call these functions:"]
    for tool in _functions(tools):
        lines.append(f"- {tool.name}: {tool.description or 'no description'}")
        lines.append(f"  arguments (JSON schema): {json.dumps(tool.parameters, ensure_ascii=False)}")
    example = f'{TOOL_CALL_OPEN}{CALL_HEAD}"function name", "arguments": {{...}}}}\n{TOOL_CALL_CLOSE}'
    lines += [
        "To call a function, answer with exactly this, the arguments as a JSON object:",
        example,
        "Write one such block for each call, nothing after them. If no function is needed, answer normally.",
    ]
    return "\n".join(lines)


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
    functions = _functions(tools)
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


def _functions(tools: list[dict[str, Any]]) -> list[Tool]:
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise GrammarError(f'tools[{i}]: only {{"type": "function", "function": {{...}}}} tools are supported')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise GrammarError(f"tools[{i}]: function name {name!r} must be 1-64 letters, digits, _ or -")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise GrammarError(f'tools[{i}] ({name}): parameters must be a JSON schema of "type": "object"')
        parameters = {"type": "object", **parameters}  # arguments are always an object
        functions.append(Tool(name, parameters, bool(function.get("strict")), function.get("description") or ""))
    if len({f.name for f in functions}) < len(functions):
        raise GrammarError("tools: two functions have the same name")
    return functions


def conversation_text(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages with tool turns as the text turns a chat template without a tool format takes: an
    assistant's `tool_calls` become the call blocks it would have written, a `tool` message becomes a user
    turn holding the result (named after the call it answers)."""
    names: dict[str, str] = {}
    turns = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = []
            for call in message["tool_calls"]:
                function = call["function"]
                names[call["id"]] = function["name"]
                try:
                    arguments = json.loads(function["arguments"] or "{}")
                except json.JSONDecodeError:
                    raise GrammarError(f"tool call {call['id']}: arguments are not JSON") from None
                blocks.append(call_text(function["name"], arguments))
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            name = names.get(message.get("tool_call_id") or "", "")
            role, content = "user", f'<tool_response name="{name}">\n{content}\n</tool_response>'
        turns.append({"role": role, "content": content})
    return turns


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call as the model writes it (the grammar's format)."""
    return (f"{TOOL_CALL_OPEN}{CALL_HEAD}{json.dumps(name, ensure_ascii=False)}, \"arguments\": "
            f"{json.dumps(arguments, ensure_ascii=False)}{CALL_TAIL}")


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
