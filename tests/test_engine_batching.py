"""The continuous-batching engine: batched answers equal the same requests decoded alone,
requests join and leave between steps, cancel, queue limit, UTF-8-safe deltas."""

import asyncio

import pytest
import torch
from conftest import answer_alone

from forja.config import load_settings
from forja.engine import ContextLengthExceeded, QueueFull, SamplingParams
from forja.engine.pytorch import PyTorchEngine
from forja.engine.text import chat_messages, chat_prompt_ids
from forja.models import load

PROMPTS = [f"Question {i}: " + "hola " * (3 * i) + "¿Cuál es la capital de Francia?" for i in range(8)]


@pytest.fixture(scope="module")
def varied(varied_model_dir):
    return load(str(varied_model_dir), load_settings(), dtype="float32")


@pytest.fixture
def engine(varied):
    engine = PyTorchEngine(varied, max_batch_size=8, max_queue=16)
    yield engine
    engine.close()


async def answer(engine, prompt, params, delay=0.0):
    await asyncio.sleep(delay)
    text, last = "", None
    async for delta in engine.submit(chat_messages(prompt), params):
        text += delta.text
        last = delta
    return text, last


def idle(engine, timeout=2.0):
    """The engine drops a finished row right after its last step; give it that moment."""
    import time

    deadline = time.monotonic() + timeout
    while engine.load != {"active": 0, "waiting": 0} and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.load == {"active": 0, "waiting": 0}


def alone(loaded, prompt, params):
    reply = answer_alone(loaded, chat_messages(prompt), params)
    return reply.text, reply


@pytest.mark.parametrize("stagger", [0.0, 0.005], ids=["prefilled-together", "joining-a-running-batch"])
def test_eight_concurrent_greedy_answers_equal_each_alone(varied, engine, stagger):
    params = SamplingParams(max_new_tokens=40)

    async def main():
        return await asyncio.gather(*[answer(engine, p, params, delay=stagger * i) for i, p in enumerate(PROMPTS)])

    results = asyncio.run(main())
    expected = [alone(varied, p, params) for p in PROMPTS]
    for (text, last), (reference, generation) in zip(results, expected):
        assert text == reference
        assert last.usage.completion_tokens == generation.usage.completion_tokens == 40
        assert last.usage.prompt_tokens == generation.usage.prompt_tokens
        assert last.finish_reason == "length"
    assert len({text for text, _ in results}) == len(PROMPTS)  # independent answers
    assert engine.max_rows_seen >= 4  # they really were decoded together
    assert engine.steps < 8 * 40 / 2


def test_seeded_sampling_in_a_batch_equals_alone(varied, engine):
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=i) for i in range(6)]

    async def main():
        return await asyncio.gather(*[answer(engine, PROMPTS[1], p) for p in params])

    results = asyncio.run(main())
    assert [text for text, _ in results] == [alone(varied, PROMPTS[1], p)[0] for p in params]
    assert len({text for text, _ in results}) > 1


def test_mixed_lengths_leave_the_batch_and_stop_strings_end_early(varied, engine):
    reference, _ = alone(varied, PROMPTS[2], SamplingParams(max_new_tokens=30))
    stop = reference[10:13]
    cases = [SamplingParams(max_new_tokens=n) for n in (1, 5, 30)] + [SamplingParams(max_new_tokens=30, stop=[stop])]

    async def main():
        return await asyncio.gather(*[answer(engine, PROMPTS[2], p) for p in cases])

    results = asyncio.run(main())
    for (text, last), params in zip(results[:3], cases):
        assert reference.startswith(text)
        assert last.usage.completion_tokens == params.max_new_tokens and last.finish_reason == "length"
    text, last = results[3]
    assert text == reference[: reference.find(stop)] and last.finish_reason == "stop"
    assert idle(engine)


def test_cancel_stops_decoding(engine):
    async def main():
        stream = engine.submit(chat_messages(PROMPTS[0]), SamplingParams(max_new_tokens=150))
        seen = []
        async for delta in stream:
            seen.append(delta)
            if len(seen) == 2:
                stream.cancel()
        return seen

    seen = asyncio.run(main())
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].usage.completion_tokens < 50
    assert idle(engine)


def test_queue_is_bounded(varied):
    engine = PyTorchEngine(varied, max_batch_size=1, max_queue=1)

    async def main():
        first = engine.submit(chat_messages("a"), SamplingParams(max_new_tokens=200))
        iterator = aiter(first)
        await anext(iterator)  # the first request holds the only batch slot
        second = engine.submit(chat_messages("b"), SamplingParams(max_new_tokens=5))
        with pytest.raises(QueueFull, match="1 requests are already waiting"):
            engine.submit(chat_messages("c"), SamplingParams(max_new_tokens=5))
        first.cancel()
        return [delta async for delta in second][-1]

    try:
        assert asyncio.run(main()).finish_reason in ("length", "stop")
    finally:
        engine.close()


def test_context_length_is_checked_before_queueing(engine):
    async def main():
        engine.submit("hola " * 300, SamplingParams(max_new_tokens=10))

    with pytest.raises(ContextLengthExceeded, match=r"prompt has \d+ tokens and max_new_tokens is 10.*context of 256"):
        asyncio.run(main())


class Scripted(torch.nn.Module):
    """The real model (so the cache and masks are exercised) whose logits are forced to a script."""

    def __init__(self, model, script, prompt_length):
        super().__init__()
        self.inner, self.script, self.prompt_length = model, script, prompt_length
        self.config, self.generation_config, self.device = model.config, model.generation_config, model.device
        self.dtype = model.dtype

    def forward(self, input_ids, position_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)
        done = (position_ids[:, -1] + 1 if position_ids is not None else torch.tensor([input_ids.shape[1]])) - self.prompt_length
        forced = torch.full_like(out.logits[:, -1, :], -1e9)
        for row, step in enumerate(done.tolist()):
            forced[row, self.script[min(step, len(self.script) - 1)]] = 0.0
        out.logits = forced[:, None, :]
        return out


def test_streamed_text_never_splits_a_utf8_character(varied):
    from dataclasses import replace

    tokenizer = varied.tokenizer
    text = "🚀 ñ テスト"
    # one token per byte: every multi-byte character arrives in pieces
    byte_tokens = [tokenizer.convert_tokens_to_ids(byte_level_char(b)) for b in text.encode()]
    assert tokenizer.decode(byte_tokens) == text
    prompt_ids = chat_prompt_ids(varied.tokenizer, chat_messages("x"))
    script = byte_tokens + [tokenizer.eos_token_id]
    engine = PyTorchEngine(replace(varied, model=Scripted(varied.model, script, len(prompt_ids))))

    async def main():
        return [delta async for delta in engine.submit(chat_messages("x"), SamplingParams(max_new_tokens=40))]

    try:
        deltas = asyncio.run(main())
    finally:
        engine.close()
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert len([d for d in deltas if d.text]) > 3  # it did stream piece by piece
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage.completion_tokens == len(byte_tokens)


def byte_level_char(byte: int) -> str:
    """The character GPT-2's byte-level BPE uses for a byte (printable bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def test_a_shared_system_prompt_is_prefilled_once_and_answers_do_not_change(varied, engine):
    """Requests of one persona share its system turn: the first one's prefix is cached (it shares it with
    a recent prompt), later ones prefill only their own question, alone or together; greedy answers
    equal each prompt decoded from scratch."""
    system = "Eres el asistente de la Panadería San Blas. Responde en español, breve y amable, sin inventar precios."
    questions = ["¿Abrís el domingo?", "¿Tenéis pan sin gluten?", "¿Hacéis tartas por encargo?", "¿Dónde estáis?"]
    params = SamplingParams(max_new_tokens=24)

    async def ask(question):
        text = ""
        async for delta in engine.submit(chat_messages(question, system=system), params):
            text += delta.text
        return text

    async def main():
        first = [await ask(q) for q in questions[:2]]  # one after the other: the second finds the first
        return first + list(await asyncio.gather(*[ask(q) for q in questions[2:]]))

    answers = asyncio.run(main())
    for question, text in zip(questions, answers):
        assert text == answer_alone(varied, chat_messages(question, system=system), params).text
    assert engine.prefixes.hits >= 2  # the second request made the entry; the last two found it
    shared = max(engine.prefixes.entries, key=lambda e: len(e.ids)).ids
    assert len(shared) >= 20 and all(
        chat_prompt_ids(varied.tokenizer, chat_messages(q, system=system))[:len(shared)] == list(shared) for q in questions)


def test_prefix_cache_finds_the_longest_shared_part_and_keeps_its_token_budget():
    from forja.engine.pytorch import PrefixCache

    layers = [(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))]
    cache = PrefixCache(max_tokens=50)
    short, long = cache.add(list(range(20)), layers), cache.add(list(range(30)), layers)
    assert cache.lookup(list(range(40))) == (long, 30)
    assert cache.lookup(list(range(25))) == (long, 24)  # a cut of a longer prefix; one token left to prefill
    assert cache.lookup([9] * 40) == (None, 0)
    assert cache.lookup(list(range(10)) + [99] * 30) == (None, 0)  # 10 shared tokens are not worth it
    assert cache.lookup(list(range(18)) + [99] * 5) == (short, 18)
    cache.add(list(range(100, 125)), layers)  # 75 tokens > 50: the least recently used goes
    assert sum(len(e.ids) for e in cache.entries) <= 50 and long not in cache.entries
    assert cache.shared_length([1, 2, 3, 4], [[1, 2, 3, 9], [1, 2]]) == 3
    assert cache.shared_length([1, 2, 3], [[1, 2, 3, 4]]) == 2  # never the whole prompt


def test_packed_weights_give_the_same_logits_and_greedy_answers(varied_model_dir):
    """The engine lays the linear weights out for oneDNN: float32 rounding apart, the model is the same."""
    from forja.engine.pytorch import PackedLinear, pack_linears

    loaded = load(str(varied_model_dir), load_settings(), dtype="float32")
    ids = [chat_prompt_ids(loaded.tokenizer, chat_messages(p)) for p in PROMPTS[:4]]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    with torch.inference_mode():
        before = loaded.model(input_ids=torch.tensor([ids[0]])).logits
    plain = [answer_alone(loaded, i, params).text for i in ids]
    linears = sum(type(m) is torch.nn.Linear for m in loaded.model.modules())
    assert pack_linears(loaded.model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in loaded.model.modules())
    assert sum(isinstance(m, PackedLinear) for m in loaded.model.modules()) == linears
    with torch.inference_mode():
        after = loaded.model(input_ids=torch.tensor([ids[0]])).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert [answer_alone(loaded, i, params).text for i in ids] == plain
    engine = PyTorchEngine(loaded, max_batch_size=4)  # already packed: nothing left to swap
    try:
        assert engine.packed_linears == 0
    finally:
        engine.close()


def test_the_engine_packs_its_model_unless_told_not_to(varied_model_dir):
    packed = PyTorchEngine(load(str(varied_model_dir), load_settings(), dtype="float32"), max_batch_size=2)
    plain = PyTorchEngine(load(str(varied_model_dir), load_settings(), dtype="float32"), max_batch_size=2, pack=False)
    try:
        assert packed.packed_linears > 0 and plain.packed_linears == 0
        assert any(type(m) is torch.nn.Linear for m in plain.loaded.model.modules())
    finally:
        packed.close()
        plain.close()


class Exploding:
    """A grammar whose constraint fails at the first step: what any sampling error looks like to the engine."""

    def start(self):
        return self

    def mask(self, logits):
        raise RuntimeError("boom")


def test_a_sampling_failure_ends_that_request_alone(varied, engine):
    """One request's bad sampling (here a failing constraint; once, top_p 1e-300 emptying the nucleus) never
    fails the batch it shares: the others answer exactly as alone."""
    greedy = SamplingParams(max_new_tokens=16)
    hostile = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-300, seed=1)
    broken = SamplingParams(max_new_tokens=16, grammar=Exploding())

    async def main():
        return await asyncio.gather(answer(engine, PROMPTS[0], greedy), answer(engine, PROMPTS[1], hostile),
                                    answer(engine, PROMPTS[2], broken), answer(engine, PROMPTS[3], greedy))

    (t0, l0), (t1, l1), (t2, l2), (t3, l3) = asyncio.run(main())
    assert l2.finish_reason == "error" and "boom" in l2.error
    assert (t0, t3) == (alone(varied, PROMPTS[0], greedy)[0], alone(varied, PROMPTS[3], greedy)[0])
    assert l0.finish_reason == l3.finish_reason == "length"
    # top_p that keeps nothing keeps the most likely token: the greedy answer
    assert l1.finish_reason == "length" and t1 == alone(varied, PROMPTS[1], greedy)[0]


SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Madrid"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["city", "n", "ok"], "additionalProperties": False}


def test_answers_under_a_json_schema_parse_and_validate(varied, engine):
    import json

    import jsonschema

    from forja.engine.constrain import Grammar

    grammar = Grammar.json_schema(varied.tokenizer, SCHEMA, eos_token_ids=varied.eos_token_ids)
    params = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=i, grammar=grammar) for i in range(6)]

    async def main():
        return await asyncio.gather(*[answer(engine, PROMPTS[i % 8], p) for i, p in enumerate(params)])

    for text, last in asyncio.run(main()):
        assert last.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
