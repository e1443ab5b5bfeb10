"""The OpenAI chat surface through the one request path, on both backends, with the real `openai` client and
LangChain: function calling (tool_choice, parallel calls, streamed tool-call deltas, a tool result round
trip), structured output (json_object, json_schema), logprobs, logit_bias and penalties."""

import json

import httpx
import jsonschema
import openai
import pytest

from forja.config import load_settings
from forja.engine import llamacpp
from forja.serve.app import create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["Europe/Madrid", "UTC"]}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30},
                                                  "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
                 "required": ["answer", "confidence"], "additionalProperties": False}
USER = [{"role": "user", "content": "What's the weather in Madrid?"}]

BACKENDS = ["pytorch", pytest.param("llamacpp", marks=pytest.mark.skipif(not llamacpp.available(),
                                                                         reason="llama-cpp-python is not installed"))]


@pytest.fixture(scope="module")
def long_model_dir(varied_model_dir, tmp_path_factory):
    """The varied tiny model with a 2,048-token context: its 512-token vocabulary spells the tools' system
    prompt in some 700 tokens."""
    import shutil

    directory = tmp_path_factory.mktemp("long-model")
    shutil.copytree(varied_model_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return directory


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, long_model_dir, tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp(f"surface-{request.param}"), model=str(long_model_dir),
                             dtype="float32", serve={"backend": request.param, "gguf_quant": "f16", "kv_tokens": 8192})
    server = start_server(create_app(settings, str(long_model_dir)))
    server.model = str(long_model_dir)
    server.backend = request.param
    return server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_the_server_runs_the_backend_asked_for(server):
    assert httpx.get(server.url + "/health").json()["backend"] == server.backend


def test_required_tool_calls_are_valid_json_of_their_schema(client, server):
    for seed in range(4):
        reply = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER, TIME],
                                               tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                               seed=seed, max_tokens=250)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        check_call(choice.message.tool_calls[0])
    # parallel calls: a random model may go on calling until max_tokens; every complete call still validates
    reply = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=1.0, seed=9, max_tokens=200)
    assert reply.choices[0].message.tool_calls
    for call in reply.choices[0].message.tool_calls:
        check_call(call)


def test_a_named_tool_and_parallel_false_give_exactly_that_one_call(client, server):
    reply = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           parallel_tool_calls=False, temperature=1.0, seed=5, max_tokens=250)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    check_call(calls[0])


def test_streamed_tool_calls_accumulate_in_the_sdk_like_openai(client, server):
    stream = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, stream=True, temperature=1.0, seed=2,
                                            max_tokens=250)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_weather"])


def test_a_tool_result_goes_back_into_the_conversation(client, server):
    first = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=250)
    call = first.choices[0].message.tool_calls[0]
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    reply = client.chat.completions.create(model=server.model, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=12)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")
    # the call and its result reached the model: the prompt holds them
    without = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER], tool_choice="none",
                                             max_tokens=12)
    assert reply.usage.prompt_tokens > without.usage.prompt_tokens + 40


def test_tool_turns_become_the_text_the_model_reads():
    from forja.chat import conversation_text
    from forja.serve.tools import parse_tool_calls

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Madrid"}'}}
    turns = conversation_text([*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}])
    assert turns[1]["role"] == "assistant"
    assert parse_tool_calls(turns[1]["content"])[1][0]["function"]["arguments"] == '{"city": "Madrid"}'
    assert turns[2] == {"role": "user", "content": '<tool_response name="get_weather">\n21 C\n</tool_response>'}


def test_auto_answers_with_text_or_valid_calls(client, server):
    for seed in range(3):
        reply = client.chat.completions.create(model=server.model, messages=USER, tools=[WEATHER], temperature=1.0,
                                               seed=seed, max_tokens=60)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                check_call(call)
        else:
            assert "<tool_call>" not in (choice.message.content or "")


def test_json_schema_and_json_object_answers_parse_and_validate(client, server):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(model=server.model, messages=USER, response_format=fmt,
                                               temperature=1.0, seed=seed, max_tokens=250)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), ANSWER_SCHEMA)
    streamed = client.chat.completions.create(model=server.model, messages=USER, response_format=fmt, stream=True,
                                              max_tokens=250)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)),
                        ANSWER_SCHEMA)
    # any JSON object: no bound on a random model's strings, so an answer may be cut by max_tokens; a
    # finished one is an object
    for seed in range(3):
        reply = client.chat.completions.create(model=server.model, messages=USER, temperature=1.0, seed=seed,
                                               response_format={"type": "json_object"}, max_tokens=250)
        content = reply.choices[0].message.content
        assert content.startswith("{")
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


def test_chat_logprobs_cover_every_token_with_the_top_alternatives(client, server):
    reply = client.chat.completions.create(model=server.model, messages=USER, logprobs=True, top_logprobs=3,
                                           max_tokens=10)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 10
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace").startswith(choice.message.content)
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)  # greedy picks the top one
    stream = client.chat.completions.create(model=server.model, messages=USER, logprobs=True, max_tokens=10, stream=True)
    streamed = [e for c in stream for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_completion_logprobs_in_the_legacy_shape(client, server):
    reply = client.completions.create(model=server.model, prompt="Hola", logprobs=2, max_tokens=6)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset[0] == 0 and all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_logit_bias_and_penalties_reach_the_sampler(client, server):
    tokenizer_token = 100  # any ordinary token of the tiny vocabulary
    reply = client.chat.completions.create(model=server.model, messages=USER, logit_bias={str(tokenizer_token): 100},
                                           max_tokens=5, logprobs=True)
    assert [e.bytes for e in reply.choices[0].logprobs.content] == [reply.choices[0].logprobs.content[0].bytes] * 5
    plain = client.chat.completions.create(model=server.model, messages=USER, max_tokens=30).choices[0].message.content
    penalised = client.chat.completions.create(model=server.model, messages=USER, max_tokens=30,
                                               frequency_penalty=2.0).choices[0].message.content
    assert plain != penalised


def test_bad_tools_and_formats_are_400s_naming_the_field(client, server):
    bad = [({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
           ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format"),
           ({"logit_bias": {"999999": 5}}, "logit_bias"),
           ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0")]
    for extra, param in bad:
        body = {"model": server.model, "messages": USER, "max_tokens": 4, **extra}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert reply.status_code in (400, 422), (extra, reply.text)
        assert reply.json()["error"]["param"].startswith(param), (extra, reply.json())


def test_langchain_binds_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        answer: str = Field(max_length=30)
        confidence: int = Field(ge=0, le=10)

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=server.model, max_tokens=250, temperature=0)
    message = llm.bind_tools([WEATHER], tool_choice="required").invoke("What's the weather in Madrid?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(message.tool_calls[0]["args"], SCHEMAS["get_weather"])
    parsed = llm.with_structured_output(Answer, method="json_schema").invoke("What is the capital of France?")
    assert isinstance(parsed, Answer) and 0 <= parsed.confidence <= 10


def test_a_streamed_answer_splits_into_content_and_whole_calls():
    from forja.chat import call_text
    from forja.serve.tools import ToolCallStream

    stream = ToolCallStream()
    text = "Let me check. " + call_text("get_weather", {"city": "Madrid", "unit": "celsius"})
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    content, calls = "", []
    for piece in pieces:
        more, new = stream.feed(piece)
        content += more
        calls += new
        assert "<" not in content  # a tail that may open a call is held back
    assert content.strip() == "Let me check." and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Madrid", "unit": "celsius"}
    plain = ToolCallStream()
    assert plain.feed("a < b <tool") == ("a < b ", []) and plain.finish() == "<tool"


def test_responses_api_answers_text_tools_and_formats_through_the_sdk(client, server):
    reply = client.responses.create(model=server.model, input="Hola", instructions="Be brief.", max_output_tokens=8)
    assert reply.status == "incomplete" and reply.output[0].type == "message"
    assert reply.output_text and reply.usage.output_tokens == 8
    # the same words as chat gives for the same conversation
    chat = client.chat.completions.create(model=server.model, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hola"}])
    assert reply.output_text == chat.choices[0].message.content
    tool = {"type": "function", **WEATHER["function"]}
    called = client.responses.create(model=server.model, input=USER, tools=[tool], tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=250)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    back = client.responses.create(model=server.model, tools=[tool], max_output_tokens=6, input=[
        *USER, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"}], tool_choice="none")
    bare = client.responses.create(model=server.model, tools=[tool], max_output_tokens=6, input=USER, tool_choice="none")
    assert back.output[0].type == "message" and back.usage.input_tokens > bare.usage.input_tokens + 40  # the call and its output
    formatted = client.responses.create(model=server.model, input="Hola", max_output_tokens=250, text={
        "format": {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(formatted.output_text), ANSWER_SCHEMA)


def test_responses_api_streams_its_event_types(client, server):
    events = list(client.responses.create(model=server.model, input="Hola", max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == next(e.text for e in events if e.type == "response.output_text.done")
    assert events[-1].response.output[0].content[0].text == text
    tool = {"type": "function", **WEATHER["function"]}
    events = list(client.responses.create(model=server.model, input=USER, tools=[tool], tool_choice="required",
                                          parallel_tool_calls=False, max_output_tokens=250, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and events[-1].type == "response.completed"
    jsonschema.validate(json.loads(done[0].arguments), SCHEMAS["get_weather"])


def test_responses_api_refuses_what_a_stateless_server_cannot_do(server):
    for extra, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                         ({"tools": [{"type": "web_search"}]}, "tools.0.type")):
        reply = httpx.post(server.url + "/v1/responses", json={"model": server.model, "input": "hi", **extra})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}\\n{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\\n' + (call['function'] | tojson) + '\\n</tool_call>' }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_chat_template_with_a_tool_format_renders_the_tools_itself(long_model_dir, tmp_path, start_server):
    """A model whose template takes `tools` (Qwen, Hermes style) is prompted the way it was trained; the
    grammar still holds the calls to their schemas."""
    import shutil

    from transformers import AutoTokenizer

    from forja.engine.text import chat_prompt_ids

    directory = tmp_path / "tool-model"
    shutil.copytree(long_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(directory)
    settings = load_settings(home=tmp_path / "home", model=str(directory), dtype="float32", serve={"backend": "pytorch"})
    server = start_server(create_app(settings, str(directory)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=str(directory), messages=USER, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=250)
    check_call(reply.choices[0].message.tool_calls[0])
    expected = chat_prompt_ids(tokenizer, USER, [WEATHER])
    assert "# Tools" in tokenizer.decode(expected) and reply.usage.prompt_tokens == len(expected)
    call = reply.choices[0].message.tool_calls[0]
    back = client.chat.completions.create(model=str(directory), tools=[WEATHER], max_tokens=4, messages=[
        *USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 C"}])
    assert back.choices[0].finish_reason in ("stop", "length", "tool_calls")
