"""LoRA versions served as adapters on one loaded base: PyTorch decodes requests for several adapters in one
batch, llama.cpp one llama_decode per adapter; either way a greedy answer is the merged version's alone."""

import asyncio
import json

import pytest

from conftest import answer_alone
from forja import models
from forja.config import TrainSettings, load_settings
from forja.engine import AdapterEngine, SamplingParams, adapter_engine, llamacpp, shared_base
from forja.engine.pytorch import PackedLinear, PyTorchEngine
from forja.engine.text import chat_messages

PROMPTS = ["Hola", "What is the capital of France?", "¿Cuál es el horario?", "Forja trains models",
           "Tell me about bread", "Where is the shop?"]
# a shared system turn longer than the prefix cache's threshold, so prefixes are cached (per adapter)
SYSTEM = "You are the assistant of a small bakery in a small town; answer briefly and kindly, in the customer's language."
needs_llama = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def lora_home(varied_model_dir, tmp_path_factory):
    """Two LoRA versions of the varied tiny model, trained a few steps at a high learning rate on different
    answers, so each answers differently from the base and from the other."""
    from forja.train import new_run, train

    home = tmp_path_factory.mktemp("adapters-home")
    settings = load_settings(home=home, model=str(varied_model_dir), serve={"share_base": True})
    for name, answer in (("panadero", "Pan recién hecho cada mañana."), ("soporte", "Reinicie el router, por favor.")):
        data = home / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": answer}]}) + "\n"
                                for q in PROMPTS[:3]))
        hyper = TrainSettings(method="lora", max_steps=4, learning_rate=3e-2, eval_every=None, checkpoint_every=None)
        train(settings, new_run(settings, [data], name, str(varied_model_dir), hyper), progress=False)
    return settings


def greedy(engine, prompt, tokens=24):
    async def run() -> str:
        stream = engine.submit(chat_messages(prompt, SYSTEM), SamplingParams(max_new_tokens=tokens))
        return "".join([d.text async for d in stream])

    return run()


def mixed(engines_prompts, tokens=24):
    """Every (engine, prompt) submitted at once: one batch on the host they share."""
    async def run():
        return await asyncio.gather(*(greedy(engine, prompt, tokens) for engine, prompt in engines_prompts))

    return asyncio.run(run())


def alone(settings, name, tokens=24):
    loaded = models.load(name, settings, dtype="float32")  # a LoRA version: merged, a model of its own
    return {p: answer_alone(loaded, chat_messages(p, SYSTEM), SamplingParams(max_new_tokens=tokens)).text
            for p in PROMPTS}


def test_a_lora_version_names_its_base_to_share_and_the_setting_turns_it_off(lora_home, varied_model_dir):
    def settings(**serve):
        return load_settings(home=lora_home.home, model=str(varied_model_dir), serve=serve)

    on = settings(share_base=True)
    assert shared_base("panadero", on) == str(varied_model_dir)
    assert shared_base(str(varied_model_dir), on) is None  # not a version
    assert shared_base("panadero", settings(share_base=False)) is None
    # auto, the default: on llama.cpp, not (yet) on PyTorch
    assert shared_base("panadero", settings(backend="llamacpp")) == str(varied_model_dir)
    assert shared_base("panadero", settings(backend="pytorch")) is None


@pytest.mark.parametrize("pack", [False, True])
def test_mixed_batches_of_two_adapters_and_the_base_answer_as_each_version_alone(lora_home, varied_model_dir, pack):
    settings = lora_home
    expected = {name: alone(settings, name) for name in ("panadero", "soporte", str(varied_model_dir))}
    assert expected["panadero"] != expected["soporte"] != expected[str(varied_model_dir)]  # the test can fail
    host = PyTorchEngine(models.load(str(varied_model_dir), settings, dtype="float32"), max_batch_size=8, pack=pack)
    try:
        views = {name: adapter_engine(host, name, settings) for name in ("panadero", "soporte")}
        assert all(isinstance(v, AdapterEngine) for v in views.values())
        if pack:  # PEFT wraps plain Linear layers: packed again inside its wrappers, the others stay packed
            packed = [name for name, m in host.model.named_modules() if isinstance(m, PackedLinear)]
            wrapped = [name for name in packed if name.endswith(".base_layer")]
            assert len(wrapped) == 14 and any(name.endswith("lm_head") for name in packed), packed
            assert host.packed_linears == len(packed) == 15
        engines = {**views, str(varied_model_dir): host}
        order = [(name, p) for p in PROMPTS for name in engines]  # every step mixes the three
        answers = mixed([(engines[name], p) for name, p in order])
        got = {name: {} for name in engines}
        for (name, p), text in zip(order, answers):
            got[name][p] = text
        assert host.max_rows_seen >= 3  # they did share a batch
        assert got == expected
        # again, now that the prefixes of the shared system turn are cached: each adapter's own, never another's
        hits = host.prefixes.hits
        assert mixed([(engines[name], p) for name, p in order]) == answers
        assert host.prefixes.hits > hits
        assert {e.adapter for e in host.prefixes.entries} >= {"panadero", "soporte", None}
    finally:
        host.close()


def test_a_prefix_cached_under_one_adapter_is_never_reused_for_another():
    import torch

    from forja.engine.pytorch import PrefixCache

    layers = [(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))]
    cache = PrefixCache(max_tokens=100)
    entry = cache.add(list(range(30)), layers, "panadero")
    assert cache.lookup(list(range(40)), "panadero") == (entry, 30)
    assert cache.lookup(list(range(40)), "soporte") == (None, 0)
    assert cache.lookup(list(range(40))) == (None, 0)
    cache.lookup(list(range(50)), "soporte")  # remembered as soporte's recent prompt
    assert cache.shared_length(list(range(45)), [], "soporte") == 44
    assert cache.shared_length(list(range(45)), [], "panadero") == 40  # the lookup of range(40)


def test_submitting_to_an_adapter_the_engine_does_not_have_is_an_error(varied_model_dir):
    from forja.engine import GenerationError

    host = PyTorchEngine(models.load(str(varied_model_dir), load_settings(), dtype="float32"), max_batch_size=2)
    try:
        with pytest.raises(GenerationError, match="no adapter 'nadie'"):
            host.submit("Hola", SamplingParams(max_new_tokens=2), adapter="nadie")
    finally:
        host.close()


def chat(server, model, prompt, tokens=16):
    import httpx

    response = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("backend,share", [("pytorch", True), ("pytorch", False),
                                           pytest.param("llamacpp", True, marks=needs_llama)])
def test_the_server_serves_two_lora_personas_on_the_base_it_loaded_unless_told_not_to(
        lora_home, varied_model_dir, start_server, backend, share):
    from concurrent.futures import ThreadPoolExecutor

    from forja.serve.app import create_app

    base = str(varied_model_dir)
    personas = [{"name": f"{name}-bot", "model": name, "system": SYSTEM} for name in ("panadero", "soporte")]
    settings = load_settings(home=lora_home.home, model=base, dtype="float32", serve={
        "backend": backend, "share_base": share, "personas": personas, "gguf_quant": "f16",
        "pack_weights": False})  # as answer_alone: packing rounds differently, and this random model has near-ties
    server = start_server(create_app(settings, base))
    try:
        questions = [(f"{name}-bot", p) for p in PROMPTS[:3] for name in ("panadero", "soporte")]
        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(lambda q: chat(server, *q), questions))
        state = server.app.state.forja
        engines = {name: state.engines[name] for name in ("panadero", "soporte")}
        if share:
            assert all(isinstance(e, AdapterEngine) and e.host is state.engines[base] for e in engines.values())
            assert set(state.engines[base].adapters) == {"panadero", "soporte"}
            assert state.engines[base].backend == backend
            if backend == "llamacpp":  # f16 base, f32 adapters: measured agreement is the GGUF test's business
                assert len(set(answers)) > 1 and all(answers)
                return
        else:
            assert all(isinstance(e, PyTorchEngine) and e is not state.engines[base] for e in engines.values())
        penalty = settings.generate.frequency_penalty  # what the request path applies by default
        for (persona, p), text in zip(questions, answers):
            loaded = merged(lora_home, persona.removesuffix("-bot"))
            params = SamplingParams(max_new_tokens=16, frequency_penalty=penalty)
            assert text == answer_alone(loaded, chat_messages(p, SYSTEM), params).text, (persona, p)
    finally:
        server.stop()


_merged: dict[str, object] = {}


def merged(settings, name):
    if name not in _merged:
        _merged[name] = models.load(name, settings, dtype="float32")
    return _merged[name]


@needs_llama
def test_llama_cpp_serves_gguf_lora_adapters_on_one_base_as_the_merged_versions_answer(lora_home, varied_model_dir):
    """Over the base's f32 GGUF, each GGUF adapter answers as its merged version's f32 GGUF alone, its
    requests decoded in a llama_decode of their own each step (mixed with the other adapter's and the base's)."""
    import gguf

    from forja.engine.llamacpp import LlamaCppEngine
    from forja.export import export_gguf
    from forja.export_lora import served_lora_gguf

    settings, base = lora_home, str(varied_model_dir)
    lora = served_lora_gguf(settings, "panadero")
    reader = gguf.GGUFReader(str(lora))
    assert bytes(reader.get_field("general.type").parts[-1]) == b"adapter"
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"}
    tokenizer = models.load_tokenizer(base, settings)
    expected = {}
    for name in ("panadero", "soporte", base):
        engine = LlamaCppEngine(export_gguf(settings, name, "f32"), tokenizer, name=name, max_batch_size=1,
                                kv_tokens=1024)
        try:
            expected[name] = {p: asyncio.run(greedy(engine, p)) for p in PROMPTS}
        finally:
            engine.close()
    assert expected["panadero"] != expected["soporte"] != expected[base]
    host = LlamaCppEngine(export_gguf(settings, base, "f32"), tokenizer, name=base, max_batch_size=8, kv_tokens=4096)
    try:
        views = {name: adapter_engine(host, name, settings) for name in ("panadero", "soporte")}
        engines = {**views, base: host}
        order = [(name, p) for p in PROMPTS for name in engines]
        decodes = host.decodes
        answers = mixed([(engines[name], p) for name, p in order])
        assert host.max_rows_seen >= 3
        assert host.decodes - decodes > 24  # more decodes than steps: one per adapter
    finally:
        host.close()
    agreement = {name: sum(text == expected[name][p] for (n, p), text in zip(order, answers) if n == name)
                 for name in engines}
    print("greedy agreement of GGUF adapters with the merged GGUFs (of 6 prompts, 24 tokens):", agreement)
    assert all(count >= len(PROMPTS) - 1 for count in agreement.values()), agreement
    assert agreement[base] == len(PROMPTS)  # the base's rows never see an adapter


def test_only_a_lora_version_is_written_as_a_gguf_adapter(lora_home, varied_model_dir, tmp_path):
    from forja.export_lora import LoraExportError, export_lora_gguf

    with pytest.raises(LoraExportError, match="not a trained LoRA version"):
        export_lora_gguf(lora_home, str(varied_model_dir), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()
