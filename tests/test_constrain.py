"""Grammar-constrained decoding (engine/constrain.py) and the OpenAI tool helpers (serve/tools.py): random
logits on the tiny model's tokenizer, masked by a constraint, must always give valid output."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from forja.chat import Tool
from forja.engine.constrain import Grammar, GrammarError, TokenNotAllowed, ToolCallSpec
from forja.chat import render_tools_system
from forja.serve.tools import parse_tool_calls, response_format_grammar, tool_call_spec

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer", "maximum": 99999}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -99, "maximum": 99},
            "b": {"type": "integer", "minimum": -99, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SEEDS = range(24)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sample(grammar: Grammar, seed: int, prefix: str = "", max_tokens: int = 400) -> str:
    """Random logits (one row longer than the vocabulary, as a padded model gives), masked, sampled.
    After 40 tokens the logits lean more and more towards EOS and tokens that close strings, objects and
    arrays, as a model that wants to finish would: random JSON alone can nest and grow without end."""
    tokenizer = grammar.tokenizer
    generator = torch.Generator().manual_seed(seed)
    closing = torch.tensor([any(c in tokenizer.decode([t]) for c in '"}]') for t in range(len(tokenizer))]
                           + [False] * 13)
    closing[tokenizer.eos_token_id] = True
    constraint = grammar.start()
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    for token in ids:
        constraint.accept(token)
    while not constraint.done:
        assert len(ids) < max_tokens, f"seed {seed}: no end after {max_tokens} tokens: {tokenizer.decode(ids)!r}"
        logits = torch.randn(len(tokenizer) + 13, generator=generator) * 3 + closing * max(0, len(ids) - 40) * 0.5
        constraint.mask(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        constraint.accept(token)
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
    return tokenizer.decode(ids)


def allowed_tokens(grammar_or_constraint, tokenizer) -> list[int]:
    constraint = grammar_or_constraint.start() if isinstance(grammar_or_constraint, Grammar) else grammar_or_constraint
    logits = torch.zeros(len(tokenizer) + 13)
    constraint.mask(logits)
    return torch.nonzero(logits > float("-inf")).flatten().tolist()


def test_every_sample_under_a_json_schema_parses_and_validates(tokenizer):
    grammar = Grammar.json_schema(tokenizer, PERSON)
    answers = [json.loads(sample(grammar, seed)) for seed in SEEDS]
    for answer in answers:
        jsonschema.validate(answer, PERSON)
    assert len({json.dumps(a) for a in answers}) > len(answers) // 2  # the logits, not the grammar, chose them


def test_mask_blocks_what_the_grammar_forbids_and_padded_rows(tokenizer):
    grammar = Grammar.json_schema(tokenizer, PERSON)
    logits = torch.zeros(len(tokenizer) + 13)
    grammar.start().mask(logits)
    allowed = torch.nonzero(logits == 0).flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)
    assert torch.isinf(logits[len(tokenizer):]).all()
    # a numpy row (the llama.cpp backend) is masked in place the same way
    row = torch.zeros(len(tokenizer)).numpy()
    grammar.start().mask(row)
    assert (row == 0).nonzero()[0].tolist() == allowed


def test_the_sequence_is_done_when_the_json_closes_and_then_only_eos_is_allowed(tokenizer):
    grammar = Grammar.json_schema(tokenizer, {"type": "object", "properties": {"n": {"type": "integer"}},
                                              "required": ["n"], "additionalProperties": False})
    constraint = grammar.start()
    for token in tokenizer('{"n": 7}', add_special_tokens=False)["input_ids"]:
        assert not constraint.done
        constraint.accept(token)
    assert constraint.done
    assert allowed_tokens(constraint, tokenizer) == [tokenizer.eos_token_id]


def test_json_object_gives_an_object(tokenizer):
    grammar = response_format_grammar(tokenizer, {"type": "json_object"})
    for seed in SEEDS:
        assert isinstance(json.loads(sample(grammar, seed)), dict)


def test_a_token_the_grammar_forbids_raises_and_leaves_the_constraint_usable(tokenizer):
    constraint = Grammar.json_object(tokenizer).start()
    letter = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(TokenNotAllowed, match="not allowed here by the JSON object grammar"):
        constraint.accept(letter)
    constraint.accept(tokenizer("{", add_special_tokens=False)["input_ids"][0])  # still at the start


def test_required_tool_calls_parse_and_validate_against_their_tool(tokenizer):
    grammar = Grammar.tool_calls(tokenizer, tool_call_spec(TOOLS, "required"))
    names = []
    for seed in SEEDS:
        content, calls = parse_tool_calls(sample(grammar, seed))
        assert content is None and calls
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])
            names.append(call["function"]["name"])
    assert set(names) == set(PARAMETERS)


def test_required_tool_calls_allow_no_free_text_first(tokenizer):
    grammar = Grammar.tool_calls(tokenizer, tool_call_spec(TOOLS, "required"))
    assert all(tokenizer.decode([t]).startswith("<") for t in allowed_tokens(grammar, tokenizer))


def test_a_named_tool_choice_gives_only_that_tool(tokenizer):
    spec = tool_call_spec(TOOLS, {"type": "function", "function": {"name": "add"}})
    grammar = Grammar.tool_calls(tokenizer, spec)
    for seed in SEEDS:
        _, calls = parse_tool_calls(sample(grammar, seed))
        assert calls and {c["function"]["name"] for c in calls} == {"add"}


def test_parallel_calls_false_gives_exactly_one_call(tokenizer):
    one = Grammar.tool_calls(tokenizer, tool_call_spec(TOOLS, "required", parallel_tool_calls=False))
    assert [len(parse_tool_calls(sample(one, seed))[1]) for seed in SEEDS] == [1] * len(SEEDS)
    # with parallel calls, a second call may follow the first
    many = Grammar.tool_calls(tokenizer, tool_call_spec(TOOLS, "required"))
    first = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    _, calls = parse_tool_calls(sample(many, 0, prefix=first + "\n<tool_call>"))
    assert calls[0]["function"]["name"] == "add" and len(calls) >= 2


def test_auto_allows_free_text_or_text_then_calls(tokenizer):
    grammar = Grammar.tool_calls(tokenizer, tool_call_spec(TOOLS, "auto"))
    constraint = grammar.start()
    for token in tokenizer("The weather: ", add_special_tokens=False)["input_ids"]:
        constraint.accept(token)
    allowed = allowed_tokens(constraint, tokenizer)
    assert len(allowed) > len(tokenizer) // 2 and tokenizer.eos_token_id in allowed  # free text, or stop
    content, calls = parse_tool_calls(sample(grammar, 3, prefix="Let me check. <tool_call>"))
    assert content == "Let me check." and calls
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])


def test_under_auto_a_tool_call_tag_in_the_text_must_open_a_real_call(tokenizer):
    constraint = Grammar.tool_calls(tokenizer, tool_call_spec(TOOLS, "auto")).start()
    for token in tokenizer("Hi <tool_call>", add_special_tokens=False)["input_ids"]:
        constraint.accept(token)
    head = '\n{"name": "'
    pieces = [tokenizer.decode([t]) for t in allowed_tokens(constraint, tokenizer)]
    assert pieces and all(head.startswith(p) or p.startswith(head) for p in pieces)


def test_plain_text_has_no_tool_calls():
    assert parse_tool_calls("It is sunny in <b>Paris</b> today.") == ("It is sunny in <b>Paris</b> today.", [])


def test_parse_tool_calls_keeps_the_text_before_and_drops_a_cut_off_call():
    text = ('Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "argum')
    content, calls = parse_tool_calls(text)
    assert content == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2})
    ]


def test_tool_call_spec_follows_tool_choice():
    assert tool_call_spec(TOOLS, "none") is None and tool_call_spec(None, "auto") is None
    auto = tool_call_spec(TOOLS)
    assert not auto.required and auto.parallel and [t.name for t in auto.tools] == ["get_weather", "add"]
    named = tool_call_spec(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    assert named.required and not named.parallel and [t.name for t in named.tools] == ["get_weather"]
    with pytest.raises(GrammarError, match="'nope', which is not in tools"):
        tool_call_spec(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(GrammarError, match="function name"):
        tool_call_spec([{"type": "function", "function": {"name": "has space"}}])


def test_response_format_text_is_free_and_a_bad_schema_is_a_value_error(tokenizer):
    assert response_format_grammar(tokenizer, {"type": "text"}) is None
    assert response_format_grammar(tokenizer, None) is None
    bad = {"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "objekt"}, "strict": True}}
    with pytest.raises(ValueError, match="'person': .*objekt"):
        response_format_grammar(tokenizer, bad)
    with pytest.raises(GrammarError, match="json_schema needs"):
        response_format_grammar(tokenizer, {"type": "json_schema"})
    good = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    jsonschema.validate(json.loads(sample(response_format_grammar(tokenizer, good), 0)), PERSON)


def test_a_bad_tool_schema_names_the_tool(tokenizer):
    broken = Tool("broken", {"type": "object", "properties": {"x": {"type": 3}}})
    spec = ToolCallSpec([Tool("ok", {"type": "object"}), broken], required=True)
    with pytest.raises(GrammarError, match="tool broken: parameters"):
        Grammar.tool_calls(tokenizer, spec)


def test_a_grammar_is_compiled_once_per_tokenizer_and_spec(tokenizer):
    assert Grammar.json_schema(tokenizer, PERSON) is Grammar.json_schema(tokenizer, dict(PERSON))
    assert Grammar.json_schema(tokenizer, PERSON) is not Grammar.json_schema(tokenizer, PERSON, strict=False)


def test_the_tools_system_prompt_names_each_tool_and_the_format():
    text = render_tools_system(TOOLS)
    assert "- get_weather: Current weather in a city." in text and "- add: Add two numbers." in text
    assert '<tool_call>\n{"name": "function name", "arguments": {...}}\n</tool_call>' in text
