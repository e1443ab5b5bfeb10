import asyncio
import math
from dataclasses import replace

import pytest
import torch
from conftest import answer_alone

from forja.config import load_settings
from forja.engine import ContextLengthExceeded, SamplingParams
from forja.engine.pytorch import PyTorchEngine
from forja.engine.sampling import Sampler
from forja.engine.text import TextStream, chat_messages, chat_prompt_ids
from forja.models import load, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir), load_settings(), dtype="float32")


def test_prompt_uses_chat_template(tiny):
    ids = chat_prompt_ids(tiny.tokenizer, chat_messages("Hola", system="Eres breve."))
    text = tiny.tokenizer.decode(ids)
    assert text == "<|im_start|>system\nEres breve.<|im_end|>\n<|im_start|>user\nHola<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_matches_transformers_generate(tiny):
    messages = chat_messages("What is the capital of France?")
    ids = chat_prompt_ids(tiny.tokenizer, messages)
    reply = answer_alone(tiny, messages, SamplingParams(max_new_tokens=24))
    reference = tiny.model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=list(tiny.eos_token_ids),
        pad_token_id=tiny.tokenizer.pad_token_id,
    )[0, len(ids):]
    reference = [t for t in reference.tolist() if t not in tiny.eos_token_ids]
    assert reply.text == tiny.tokenizer.decode(reference, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(reference)
    assert reply.finish_reason in ("stop", "length")


def test_sampling_is_reproducible_with_seed(tiny):
    messages = chat_messages("Hola")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = answer_alone(tiny, messages, params).text
    assert first == answer_alone(tiny, messages, params).text
    others = {answer_alone(tiny, messages, SamplingParams(16, 1.0, 0.9, seed=s)).text for s in range(5)}
    assert len(others) > 1


def test_the_engine_takes_the_token_ids_it_was_given(tiny):
    """Callers that counted a prompt's tokens submit those ids; they decode exactly like the messages."""
    messages = chat_messages("Hola")
    params = SamplingParams(max_new_tokens=12)
    ids = chat_prompt_ids(tiny.tokenizer, messages)
    by_ids, by_messages = answer_alone(tiny, ids, params), answer_alone(tiny, messages, params)
    assert by_ids.text == by_messages.text and by_ids.usage.prompt_tokens == len(ids)


PROBS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def picks(params: SamplingParams, logits=PROBS, draws: int = 300, prompt=()) -> set[int]:
    sampler = Sampler(replace(params, seed=0), list(prompt), "cpu")
    return {sampler.pick(logits) for _ in range(draws)}


def test_top_p_top_k_and_min_p_keep_only_the_likely_tokens():
    assert picks(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}
    assert picks(SamplingParams(temperature=1.0, top_k=3)) == {0, 1, 2}
    assert picks(SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}  # 0.15 < 0.5 x 0.5
    assert picks(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert picks(SamplingParams(temperature=0.0)) == {0}


def test_parameters_that_underflow_keep_the_top_token_instead_of_failing():
    """top_p 1e-300 at temperature 1 once emptied the nucleus and multinomial raised for the whole batch."""
    assert picks(SamplingParams(temperature=1.0, top_p=1e-300)) == {0}
    assert picks(SamplingParams(temperature=1.0, min_p=1.0)) == {0}
    assert picks(SamplingParams(temperature=2.0, top_k=1, top_p=1e-12)) == {0}


def test_logit_bias_and_penalties_move_the_choice():
    assert picks(SamplingParams(logit_bias={3: 100.0})) == {3}
    assert picks(SamplingParams(logit_bias={0: -100.0})) == {1}
    # the repetition penalty (transformers' rule) counts the prompt: token 0 was in it
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    assert picks(SamplingParams(repetition_penalty=1.3), logits, draws=1, prompt=[0]) == {1}
    assert picks(SamplingParams(repetition_penalty=1.3), logits, draws=1) == {0}
    # frequency penalty: each use of a token lowers it, so greedy alternates instead of repeating
    sampler = Sampler(SamplingParams(frequency_penalty=0.2), [], "cpu")
    assert [sampler.pick(logits) for _ in range(4)] == [0, 1, 0, 1]
    sampler = Sampler(SamplingParams(presence_penalty=0.5), [], "cpu")
    # presence lowers a used token once, however often it comes back: 1.5 < 1.9, then 1.5 > 1.4, then 1.5 > 1.4
    assert [sampler.pick(logits) for _ in range(4)] == [0, 1, 0, 0]


def test_logprobs_are_the_model_distribution_with_the_top_alternatives():
    sampler = Sampler(SamplingParams(logprobs=True, top_logprobs=2, temperature=0.0), [], "cpu")
    assert not sampler.plain
    token = sampler.pick(PROBS)
    (entry,) = sampler.take_logprobs()
    assert token == entry.token == 0 and entry.logprob == pytest.approx(math.log(0.5), abs=1e-5)
    assert [t for t, _ in entry.top] == [0, 1] and entry.top[1][1] == pytest.approx(math.log(0.3), abs=1e-5)
    assert sampler.take_logprobs() == []
    assert Sampler(SamplingParams(), [], "cpu").take_logprobs() is None


def test_context_length_is_checked(tiny):
    engine = PyTorchEngine(tiny, max_batch_size=1, pack=False)

    async def submit():
        engine.submit([5] * 250, SamplingParams(max_new_tokens=10))

    try:
        with pytest.raises(ContextLengthExceeded, match="prompt has 250 tokens and max_new_tokens is 10.*context of 256"):
            asyncio.run(submit())
    finally:
        engine.close()


def test_text_stream_never_splits_utf8(tiny):
    text = "Ωμέγα 🎉 日本語 über"
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    # multi-byte characters span several byte-level tokens, so single tokens decode to halves
    assert any("\ufffd" in tiny.tokenizer.decode([i]) for i in ids)
    stream = TextStream(tiny.tokenizer, stop=[])
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_strings_are_cut_and_never_leak(tiny):
    text = "Hola mundo. FIN y más texto"
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tiny.tokenizer, stop=["FIN"])
    out = ""
    for i in ids:
        out += stream.push(i)
        assert "F" not in out  # a partial stop string is held back, not emitted
        if stream.stopped:
            break
    out += stream.finish()
    assert out == "Hola mundo. "
    assert stream.stopped


# A long answer mixing what a byte-level tokenizer splits: accents, emoji (one is a ZWJ sequence), CJK,
# newlines, and a leading space (byte-level BPE keeps it; so must the stream).
LONG_ANSWER = "".join(
    f" {i}. ¿Cuál es el horario de la panadería? Abrimos de lunes a sábado 🚀🎉\n"
    f"日本語のテキスト、中文の字符。Ñandú, pingüino — über naïve café 👩‍👩‍👧\n\n" for i in range(40)
)


class SlowTokenizer:
    """The tiny tokenizer as a slow one (no Rust backend), so TextStream takes its window fallback;
    decode is the fast one's."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast
        self.all_special_ids = fast.all_special_ids

    def decode(self, ids, skip_special_tokens=False):
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)


def stream_for(tiny, kind: str, stop=()):
    tokenizer = tiny.tokenizer if kind == "fast" else SlowTokenizer(tiny.tokenizer)
    return TextStream(tokenizer, stop=list(stop))


def pieces(tiny, *texts: str) -> list[int]:
    """The ids of each text encoded on its own, one after the other: token boundaries fall where the texts meet."""
    return [i for text in texts for i in tiny.tokenizer(text, add_special_tokens=False)["input_ids"]]


def streamed(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    return deltas + [stream.finish()]


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_streamed_text_equals_the_full_decode_of_a_long_mixed_answer(tiny, kind):
    ids = tiny.tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2000
    special = [tiny.tokenizer.eos_token_id, tiny.tokenizer.bos_token_id]
    ids = ids[:700] + special + ids[700:]  # special tokens in the middle are skipped, as decode skips them
    stream = stream_for(tiny, kind)
    deltas = streamed(stream, ids)
    assert "".join(deltas) == tiny.tokenizer.decode(ids, skip_special_tokens=True) == LONG_ANSWER
    assert deltas[0].startswith(" ")
    assert stream.text == LONG_ANSWER and stream.ids == ids


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_deltas_of_valid_text_never_hold_a_replacement_character(tiny, kind):
    ids = tiny.tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"]
    assert sum("\ufffd" in tiny.tokenizer.decode([i]) for i in ids) > 100  # many tokens are halves of characters
    deltas = streamed(stream_for(tiny, kind), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 1000  # and the text still streams, token by token


@pytest.mark.parametrize("kind", ["fast", "slow"])
@pytest.mark.parametrize("parts, stop, expected", [
    (("Hola mundo. F", "IN y más"), ["FIN"], "Hola mundo. "),  # across two tokens
    (("Hola mundo. F", "I", "N y más"), ["FIN"], "Hola mundo. "),  # across three
    (("Texto #", "#", "#END resto"), ["##END"], "Texto #"),  # begins inside the held-back "##", one character in
    (("Hola F", "INAL"), ["FIN!"], "Hola FINAL"),  # a held-back tail that turns out not to stop is released
    (("Hola A", "B", "C fin"), ["ABC", "BC"], "Hola "),  # two complete at once: the one that begins first wins
], ids=["two-tokens", "three-tokens", "inside-the-held-tail", "not-a-stop-after-all", "earliest-wins"])
def test_a_stop_string_split_over_tokens_is_found_and_never_leaks(tiny, kind, parts, stop, expected):
    ids = pieces(tiny, *parts)
    stream = stream_for(tiny, kind, stop)
    out = ""
    for i in ids:
        out += stream.push(i)
        assert not any(s in out for s in stop)
        if stream.stopped:
            break
    out += stream.finish()
    assert out == expected and stream.text == expected
    assert stream.stopped == (expected != "".join(parts))


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_a_push_at_token_2000_touches_no_more_than_one_at_token_10(tiny, kind, monkeypatch):
    """Not timed: count the work. Every call to the tokenizer's decode and every stop-string search is
    recorded; at token 1,900-2,000 they are as small as at token 10-100 (the old stream decoded all ids
    and searched the whole text on every push)."""
    import forja.engine.text as text_module

    searched: list[int] = []
    monkeypatch.setattr(text_module, "first_stop", lambda text, stop: searched.append(len(text)) or None)
    decoded: list[int] = []
    real_decode = tiny.tokenizer.decode
    monkeypatch.setattr(tiny.tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or real_decode(ids, **kw))
    stream = stream_for(tiny, kind, stop=["<|user|>", "\nUsuario:"])
    ids = tiny.tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"][:2000]
    work = []  # per push: ids decoded and characters searched
    for i in ids:
        decoded.clear(), searched.clear()
        stream.push(i)
        work.append((sum(decoded), sum(searched)))
    assert len(stream.ids) == 2000 and stream.text == real_decode(ids)[:len(stream.text)]
    early, late = work[10:100], work[1900:2000]
    assert max(w[0] for w in late) <= max(max(w[0] for w in early), 16)
    assert max(w[1] for w in late) <= max(max(w[1] for w in early), 40)
    assert sum(w[1] for w in late) > 0  # the stop strings were searched
    if kind == "fast":
        assert not any(w[0] for w in work)  # DecodeStream decodes the new token alone, never through decode()


@pytest.mark.slow
def test_the_bundled_tokenizer_streams_exactly_its_full_decode(bundled_home):
    """SmolLM2's tokenizer (byte-level BPE, from the GGUF): same text, leading space and all."""
    tokenizer = load_tokenizer("smollm2-135m", load_settings(home=bundled_home))
    ids = tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"]
    deltas = streamed(TextStream(tokenizer, stop=[]), ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == LONG_ANSWER
    assert deltas[0].startswith(" ") and all("\ufffd" not in d for d in deltas)
