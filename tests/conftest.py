"""Shared fixtures: a temp FORJA_HOME for every test, a tiny random Llama model built in seconds,
and (for `slow` tests) a home where the real bundled model has been converted once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. La capital de Francia es París.",
    "Forja trains a small language model on your own data and serves it.",
    "¿Cuál es el horario de la panadería? Abrimos de lunes a sábado, de 7 a 14 h.",
    "Hello, how can I help you today? Hola, ¿en qué puedo ayudarte hoy?",
    "Ñandú, pingüino, acción, corazón — ünïcödé テスト 🚀",
] * 20


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (any UTF-8 text encodes) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with the tiny tokenizer, saved as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def forja_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "forja-home"
    monkeypatch.setenv("FORJA_HOME", str(home))
    monkeypatch.delenv("FORJA_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    # never let a test reach for the network: the hub "endpoint" is a closed local port
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def bundled_home(tmp_path_factory) -> Path:
    """A FORJA_HOME in which the bundled GGUF has been converted once for all slow tests."""
    from forja.config import load_settings
    from forja.models import bundled_gguf, converted_dir

    home = tmp_path_factory.mktemp("bundled-home")
    previous = os.environ.get("FORJA_HOME")
    os.environ["FORJA_HOME"] = str(home)
    try:
        converted_dir(bundled_gguf("smollm2-135m"), load_settings())
    finally:
        if previous is None:
            os.environ.pop("FORJA_HOME", None)
        else:
            os.environ["FORJA_HOME"] = previous
    return home
