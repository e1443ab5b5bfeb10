"""The llama.cpp engine's prefill: prompts admitted together are prefilled in shared llama_batches (tokens
they share computed once, long prompts split across batches) and every greedy answer equals the same
prompt answered alone, with the cached prefix or without, and when one of them is cancelled mid-prefill."""

import asyncio
import threading
import time

import pytest

from forja import models
from forja.config import load_settings
from forja.engine import SamplingParams, llamacpp
from forja.engine.text import chat_messages
from forja.export import export_gguf
from forja.models import common_prefix

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed (make install)")

PROMPTS = [f"Question {i}: " + "hola " * (2 * i) + "¿Cuál es la capital de Francia?" for i in range(8)]
SYSTEM = "Eres el asistente de la Panadería San Blas. Responde en español, breve y amable."


@pytest.fixture(scope="module")
def gguf_file(varied_model_dir, tmp_path_factory):
    # float32: a row's logits do not depend on what else is in its batch, so answers can be compared token for token
    return export_gguf(load_settings(), str(varied_model_dir), "f32", tmp_path_factory.mktemp("gguf") / "varied-f32.gguf")


@pytest.fixture(scope="module")
def tokenizer(varied_model_dir):
    return models.load_tokenizer(str(varied_model_dir), load_settings())


def make_engine(gguf_file, tokenizer, kv_tokens=2048, **kwargs):
    return llamacpp.LlamaCppEngine(gguf_file, tokenizer, name="varied", kv_tokens=kv_tokens, **kwargs)


@pytest.fixture
def engine(gguf_file, tokenizer):
    engine = make_engine(gguf_file, tokenizer, max_batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def alone(gguf_file, tokenizer):
    """answer(messages, tokens) on an engine of its own that takes one request at a time."""
    engine = make_engine(gguf_file, tokenizer, max_batch_size=1)
    cache: dict[tuple, str] = {}

    def answer(messages, tokens):
        key = (repr(messages), tokens)
        if key not in cache:
            cache[key] = asyncio.run(ask(engine, messages, tokens))[0]
        return cache[key]

    yield answer
    engine.close()


async def ask(engine, messages, tokens):
    return await collect(engine.submit(messages, SamplingParams(max_new_tokens=tokens)))


async def collect(stream):
    text, last = "", None
    async for delta in stream:
        text += delta.text
        last = delta
    return text, last


def together(engine, conversations, tokens):
    """Submit every conversation before the engine can admit any (it waits on the lock submit takes), so they
    are admitted, and prefilled, as one group; returns (text, last delta) of each."""

    async def main():
        with engine._wake:  # a re-entrant lock: submit takes it again from this thread
            streams = [engine.submit(c, SamplingParams(max_new_tokens=tokens)) for c in conversations]
        return await asyncio.gather(*[collect(s) for s in streams])

    return asyncio.run(main())


def record_decodes(engine):
    """Wrap the engine's llama_decode: returns the list that gets each call's rows (token, position, slots)."""
    calls = []
    decode = engine._decode

    def recorded(rows):
        calls.append([(row.token, row.position, tuple(row.slots)) for row in rows])
        decode(rows)

    engine._decode = recorded
    return calls


def idle(engine, timeout=5.0):
    deadline = time.monotonic() + timeout
    while engine.load != {"active": 0, "waiting": 0} and time.monotonic() < deadline:
        time.sleep(0.01)
    return (engine.load == {"active": 0, "waiting": 0} and sorted(engine._free_slots) == list(range(engine.max_batch_size))
            and engine._reserved == 0)


def test_eight_prompts_admitted_together_are_prefilled_in_one_decode_and_answer_as_alone(engine, alone):
    conversations = [chat_messages(p) for p in PROMPTS]
    calls = record_decodes(engine)
    results = together(engine, conversations, 24)
    prefill = calls[0]
    assert {slot for _, _, slots in prefill for slot in slots} >= set(range(8))  # every prompt in the first decode
    assert len(prefill) < sum(len(engine.tokenize(c)) for c in conversations)  # their shared system turn once
    assert any(len(slots) == 9 for _, _, slots in prefill)  # ... for all eight and the cached prefix
    for conversation, (text, last) in zip(conversations, results):
        assert text == alone(conversation, 24)
        assert last.finish_reason == "length" and last.usage.completion_tokens == 24
    assert len({text for text, _ in results}) > 4
    assert idle(engine)


def test_requests_joining_a_running_batch_are_prefilled_in_the_decode_of_its_next_token(engine, alone):
    first, later = [chat_messages(p) for p in PROMPTS[:4]], [chat_messages(p) for p in PROMPTS[4:]]
    paused, resume = threading.Event(), threading.Event()
    calls = record_decodes(engine)
    decode = engine._decode

    def pause_at_the_third_step(rows):
        decode(rows)
        if len(calls) == 3:  # the prefill of the first four, then two steps: hold the engine until the rest arrive
            paused.set()
            resume.wait(10)

    engine._decode = pause_at_the_third_step

    async def main():
        with engine._wake:
            streams = [engine.submit(c, SamplingParams(max_new_tokens=24)) for c in first]
        await asyncio.to_thread(paused.wait, 10)
        running = {seq.extra["slot"] for seq in engine._active}
        with engine._wake:
            streams += [engine.submit(c, SamplingParams(max_new_tokens=24)) for c in later]
        resume.set()
        return await asyncio.gather(*[collect(s) for s in streams]), running

    results, running = asyncio.run(main())
    mixed = calls[3]
    assert len(running) == 4 and sum(slots[0] in running for _, _, slots in mixed) == 4  # a token of each running one
    assert len(mixed) > 4 + 8  # and the prompts of the other four
    assert [text for text, _ in results] == [alone(c, 24) for c in first + later]
    assert idle(engine)


def test_prompts_longer_than_a_prefill_batch_are_split_across_batches(gguf_file, tokenizer, alone):
    engine = make_engine(gguf_file, tokenizer, max_batch_size=4, prefill_batch=16)
    try:
        conversations = [chat_messages(f"{i}: " + "pan y vino " * (2 + 3 * i)) for i in range(4)]
        lengths = [len(engine.tokenize(c)) for c in conversations]
        assert min(lengths) > 2 * 16 and max(lengths) + 16 < engine.context_length
        calls = record_decodes(engine)
        results = together(engine, conversations, 16)
        prefill = calls[: next(i for i, rows in enumerate(calls) if len(rows) < 16) + 1]
        assert len(prefill) > 3 and max(len(rows) for rows in calls) <= 16
        for conversation, (text, _) in zip(conversations, results):
            assert text == alone(conversation, 16)
        assert idle(engine)
    finally:
        engine.close()


def test_a_prompt_sharing_the_cached_prefix_and_one_that_does_not_are_prefilled_together(engine, alone):
    first = chat_messages("¿Abrís el domingo?", system=SYSTEM)
    assert together(engine, [first], 8)[0][0] == alone(first, 8)
    cached = len(engine._prefix)
    assert cached > 20
    hits = engine.prefix_hits
    sharing, other = chat_messages("¿Tenéis pan sin gluten?", system=SYSTEM), chat_messages("Forja trains models")
    calls = record_decodes(engine)
    results = together(engine, [sharing, other], 24)
    ids = engine.tokenize
    assert engine.prefix_hits - hits == common_prefix(ids(first), ids(sharing)) > 20  # only the one that shares it
    assert len(calls[0]) < len(engine.tokenize(sharing)) + len(engine.tokenize(other))
    assert [text for text, _ in results] == [alone(sharing, 24), alone(other, 24)]
    # and the cache left behind still gives the right answers
    again = chat_messages("¿Hacéis tartas por encargo?", system=SYSTEM)
    hits = engine.prefix_hits
    assert together(engine, [again], 24)[0][0] == alone(again, 24)
    assert engine.prefix_hits > hits
    assert idle(engine)


def test_prompts_that_share_a_start_only_with_each_other_compute_it_once(engine, alone):
    conversations = [chat_messages(q, system=SYSTEM) for q in ("¿Dónde estáis?", "¿Qué pan tenéis hoy?", "Hola")]
    calls = record_decodes(engine)
    results = together(engine, conversations, 16)
    assert engine.prefix_hits == 0  # a cold engine: nothing was cached
    ids = [engine.tokenize(c) for c in conversations]
    all_three = min(common_prefix(a, b) for a in ids for b in ids)
    assert all_three > 20
    assert sum(len(slots) == 4 for _, _, slots in calls[0]) == all_three  # the three prompts' and the prefix's
    assert len(calls[0]) == len({tuple(x[: p + 1]) for x in ids for p in range(len(x))})  # each distinct start once
    assert [text for text, _ in results] == [alone(c, 16) for c in conversations]
    assert len(engine._prefix) >= all_three
    assert idle(engine)


def test_the_next_turn_of_a_conversation_prefills_only_what_is_new(engine, alone):
    """A finished request's cells stay in its slot: the same prompt again, or the conversation's next turn
    (the previous prompt and answer, then a new question), takes that slot and prefills only the rest."""
    turn = chat_messages("¿Abrís el domingo?", system=SYSTEM)
    first = together(engine, [turn], 24)[0][0]
    assert first == alone(turn, 24)
    hits = engine.prefix_hits
    assert together(engine, [turn], 24)[0][0] == first
    assert engine.prefix_hits - hits == len(engine.tokenize(turn))  # the whole prompt, and its logits were kept
    follow_up = turn + [{"role": "assistant", "content": first}, {"role": "user", "content": "¿Y el lunes?"}]
    hits = engine.prefix_hits
    assert together(engine, [follow_up], 24)[0][0] == alone(follow_up, 24)
    assert engine.prefix_hits - hits >= len(engine.tokenize(turn))
    assert idle(engine)


def test_the_same_prompt_again_takes_its_first_token_from_the_kept_logits(engine, alone):
    """A finished request's slot keeps the logits after its prompt: the very same prompt again (a retry,
    "regenerate") is answered its first token without a llama_decode, and the same answer as alone; a prompt
    that goes on past it prefills up to its own last token, as before."""
    turn = chat_messages("¿Hacéis tartas por encargo?", system=SYSTEM)
    first = together(engine, [turn], 12)[0][0]
    assert first == alone(turn, 12)
    calls = record_decodes(engine)
    assert together(engine, [turn], 1)[0][0] == alone(turn, 1)
    assert calls == []  # one new token: nothing decoded at all
    assert [text for text, _ in together(engine, [turn, turn], 12)] == [first, first]  # one finds the logits, one not
    calls.clear()
    other = chat_messages("¿Hacéis tartas por encargo? Gracias.", system=SYSTEM)  # the same start, then more
    assert together(engine, [other], 4)[0][0] == alone(other, 4)
    assert calls and calls[0][-1][1] == len(engine.tokenize(other)) - 1  # prefilled up to its own last token
    assert idle(engine)


def test_finished_requests_cells_give_way_when_the_cache_is_full(gguf_file, tokenizer, alone):
    engine = make_engine(gguf_file, tokenizer, max_batch_size=2, kv_tokens=768)
    engine_cells = engine.kv_tokens
    try:
        conversations = [chat_messages(f"{i} " + "pan y vino " * 12) for i in range(6)]
        need = len(engine.tokenize(conversations[0])) + 100
        assert 2 * need < engine_cells < 6 * need  # the kept answers cannot all stay
        for conversation in conversations:
            # without room made, the request would wait for cells forever
            assert asyncio.run(asyncio.wait_for(ask(engine, conversation, 100), 60))[0] == alone(conversation, 100)
            assert idle(engine)
            assert sum(len(kept.tokens) for kept in engine._kept.values()) + len(engine._prefix) <= engine_cells
    finally:
        engine.close()


def test_cancelling_one_request_while_the_group_is_prefilled(gguf_file, tokenizer, alone):
    engine = make_engine(gguf_file, tokenizer, max_batch_size=4, prefill_batch=16)
    try:
        conversations = [chat_messages(f"{i}: " + "pan y vino " * (3 + 3 * i)) for i in range(3)]
        streams = []
        decode = engine._decode
        decodes = []

        def cancel_after_the_first(rows):
            decode(rows)
            decodes.append(len(rows))
            if len(decodes) == 1:
                streams[1].cancel()  # the middle prompt: still being prefilled

        engine._decode = cancel_after_the_first

        async def main():
            with engine._wake:
                streams.extend(engine.submit(c, SamplingParams(max_new_tokens=16)) for c in conversations)
            return await asyncio.gather(*[collect(s) for s in streams])

        results = asyncio.run(main())
        assert results[1][1].finish_reason == "cancelled" and results[1][0] == ""
        assert results[1][1].usage.completion_tokens == 0
        assert [results[0][0], results[2][0]] == [alone(conversations[0], 16), alone(conversations[2], 16)]
        assert idle(engine)
        assert asyncio.run(ask(engine, conversations[1], 16))[0] == alone(conversations[1], 16)
    finally:
        engine.close()


def test_prefill_rows_share_a_token_only_after_the_same_tokens_and_keep_each_prompts_order():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 5, 6], [7, 2, 3]]
    rows, paths = llamacpp.prefill_rows(prompts, [0, 0, 0, 0], slots=[10, 11, 12, 13])
    for ids, path in zip(prompts, paths):
        assert [rows[r].token for r in path] == ids and [rows[r].position for r in path] == list(range(len(ids)))
        assert path == sorted(path)  # a prompt's rows come in its own order
    assert rows[paths[0][0]].slots == [11, 10, 12]  # [1, 2, 3] by the three prompts that start with it
    assert rows[paths[0][4]].slots == [10, 12] and paths[0][4] == paths[2][4]
    assert rows[paths[3][1]].slots == [13]  # the same token after different ones is its own row
    assert len(rows) == 3 + 1 + 2 + 1 + 3
    # prompts that start after a cached prefix share rows only with prompts that start at the same place
    rows, paths = llamacpp.prefill_rows([[1, 2, 3, 4], [1, 2, 3, 5]], [2, 0], slots=[0, 1])
    assert all(len(row.slots) == 1 for row in rows) and len(rows) == 2 + 4
