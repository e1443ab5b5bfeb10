"""How a conversation with tools is written for a model, for the server and the trainer alike: the call format
the model writes (and the grammar holds it to), the system text that lists the tools, tool turns as text for
a chat template without a tool format, and the turns for one with it. A model trained on tool-calling
conversations reads them as it is served.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from forja.config import ForjaError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
CALL_HEAD = '\n{"name": '  # between TOOL_CALL_OPEN and the name; then ', "arguments": ' and the arguments
CALL_TAIL = "}\n" + TOOL_CALL_CLOSE
CALL_SEPARATOR = "\n"  # between parallel calls
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ToolFormatError(ForjaError, ValueError):
    """Tools or tool turns that cannot be written for the model; the message says what to fix (an HTTP 400)."""


@dataclass
class Tool:
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False  # True: a schema keyword llguidance cannot enforce is an error, not ignored
    description: str = ""  # for the system prompt; not part of the grammar


def functions(tools: list[dict[str, Any]]) -> list[Tool]:
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolFormatError(f'tools[{i}]: only {{"type": "function", "function": {{...}}}} tools are supported')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ToolFormatError(f"tools[{i}]: function name {name!r} must be 1-64 letters, digits, _ or -")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolFormatError(f'tools[{i}] ({name}): parameters must be a JSON schema of "type": "object"')
        parameters = {"type": "object", **parameters}  # arguments are always an object
        functions.append(Tool(name, parameters, bool(function.get("strict")), function.get("description") or ""))
    if len({f.name for f in functions}) < len(functions):
        raise ToolFormatError("tools: two functions have the same name")
    return functions


def render_tools_system(tools: list[dict[str, Any]]) -> str:
    """System-prompt text telling the model which functions it has and how to call them."""
    lines = ["You can call these functions:"]
    for tool in functions(tools):
        lines.append(f"- {tool.name}: {tool.description or 'no description'}")
        lines.append(f"  arguments (JSON schema): {json.dumps(tool.parameters, ensure_ascii=False)}")
    example = f'{TOOL_CALL_OPEN}{CALL_HEAD}"function name", "arguments": {{...}}}}\n{TOOL_CALL_CLOSE}'
    lines += [
        "To call a function, answer with exactly this, the arguments as a JSON object:",
        example,
        "Write one such block for each call, nothing after them. If no function is needed, answer normally.",
    ]
    return "\n".join(lines)


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
                blocks.append(call_text(function["name"], call_arguments(call)))
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            name = names.get(message.get("tool_call_id") or "", "")
            role, content = "user", f'<tool_response name="{name}">\n{content}\n</tool_response>'
        turns.append({"role": role, "content": content})
    return turns


def call_arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as the model wrote them (OpenAI puts them in a JSON string)."""
    raw = call["function"].get("arguments") or "{}"
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ToolFormatError(f"tool call {call.get('id', '')}: arguments are not JSON") from None


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call as the model writes it (the grammar's format)."""
    return (f"{TOOL_CALL_OPEN}{CALL_HEAD}{json.dumps(name, ensure_ascii=False)}, \"arguments\": "
            f"{json.dumps(arguments, ensure_ascii=False)}{CALL_TAIL}")


def native_turn(message: dict[str, Any]) -> dict[str, Any]:
    """A message for a template with a tool format: call arguments as objects, as those templates expect."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        calls.append({**call, "function": {**call["function"], "arguments": call_arguments(call)}})
    return {**message, "tool_calls": calls}


def has_tool_format(tokenizer: Any) -> bool:
    """Whether the chat template renders `tools` itself (Qwen, Llama 3.1, Hermes-style templates do)."""
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def with_tools_system(turns: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns with the tools described in the system prompt (one is put first if there is none)."""
    text = render_tools_system(tools)
    if turns and turns[0]["role"] == "system":
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


def model_turns(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A conversation (its system turn first, if any) as the model reads it, and the `tools` to hand its chat
    template: its own tool format when it has one, else tool turns as text and the tools in the system turn."""
    if has_tool_format(tokenizer):
        return [native_turn(m) for m in messages], tools or None
    turns = conversation_text(messages)
    return (with_tools_system(turns, tools) if tools else turns), None


# After tool results the model is asked for its answer in a turn of its own (the agent loop does so before
# each step that follows results): a small model that reads a result as the last turn goes on writing results
ANSWER_NOW = "Now answer my question above in plain words, using the tool results (or call another tool)."


def with_answer_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A tool-calling conversation with the ANSWER_NOW turn after each run of tool results, as the agent loop
    prompts the model (for training rows, so they read as served)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        out.append(message)
        following = messages[i + 1] if i + 1 < len(messages) else None
        if message["role"] == "tool" and (following is None or following["role"] != "tool") \
                and not (following is not None and following["role"] == "user" and following.get("content") == ANSWER_NOW):
            out.append({"role": "user", "content": ANSWER_NOW})
    return out


# ---------------------------------------------------------------------------------------------
# A tool call corrected through feedback: checked when it is sent (the server), trained as the call it
# should have been (forja.feedback).


class CallCorrectionError(ForjaError, ValueError):
    """A tool-call correction that does not fit the answer it corrects; the message says why (an HTTP 422)."""


def corrected_call(messages: Any, trace: Any, tools: Any, correction: dict[str, Any]) -> dict[str, Any]:
    """A tool-call correction checked against the exchange it corrects: the step exists in its trace, the
    tool is one the persona offered, the arguments fit that tool's schema. The correction as stored
    ({"step", "name", "arguments"}); a CallCorrectionError naming the problem otherwise."""
    import jsonschema

    steps = trace if isinstance(trace, list) else []
    step = correction["step"]
    if not steps:
        raise CallCorrectionError("this answer made no tool calls; correct its text with `correction`")
    if _call_position(messages, len(steps), step) is None:
        raise CallCorrectionError(f"this answer has steps 1 to {len(steps)}, not {step}")
    name = correction.get("name") or steps[step - 1]["tool"]
    offered = {t["function"]["name"]: t["function"] for t in tools or [] if t.get("type") == "function"}
    if name not in offered:
        raise CallCorrectionError(f"there is no tool {name!r} for this answer; it was offered "
                                  f"{', '.join(offered) or 'none'}")
    try:
        jsonschema.validate(correction["arguments"], offered[name].get("parameters") or {"type": "object"})
    except jsonschema.ValidationError as exc:
        raise CallCorrectionError(f"the arguments do not fit {name}'s schema: {exc.message}") from None
    except jsonschema.SchemaError:
        pass  # a server's own schema that is not valid JSON Schema: the call is taken as the tool takes it
    return {"step": step, "name": name, "arguments": correction["arguments"]}


def corrected_turn(messages: Any, steps: int, correction: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The conversation up to the corrected step's turn, and that turn with its call corrected (the turn's
    other calls as they were made); None when the conversation does not hold the step."""
    position = _call_position(messages, steps, correction["step"])
    if position is None:
        return None
    turn, index = position
    message = messages[turn]
    calls = [dict(c) for c in message["tool_calls"]]
    calls[index] = {**calls[index], "function": {"name": correction["name"],
                                                 "arguments": json.dumps(correction["arguments"], ensure_ascii=False)}}
    return messages[:turn], {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}


def _call_position(messages: Any, steps: int, step: int) -> tuple[int, int] | None:
    """Where step `step` of an answer with `steps` steps is among the conversation's tool calls: (message,
    call) indexes. An answer's calls are the conversation's last `steps` (earlier turns may hold others')."""
    if not isinstance(messages, list) or not 1 <= step <= steps:
        return None
    calls = [(i, j) for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"
             for j in range(len(m.get("tool_calls") or []))]
    return calls[len(calls) - steps + step - 1] if len(calls) >= steps else None
