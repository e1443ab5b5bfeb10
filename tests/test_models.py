import json
import shutil
import time

import pytest

from forja.config import load_settings
from forja.models import ModelError, check_gguf, list_models, load, resolve


def make_version(settings, name, source_dir, **meta):
    target = settings.versions_dir / name
    shutil.copytree(source_dir, target)
    (target / "version.json").write_text(json.dumps({"name": name, **meta}))
    return target


def test_resolve_each_kind(tiny_model_dir, tmp_path):
    settings = load_settings()
    assert resolve("smollm2-135m", settings).kind == "bundled"
    assert resolve(str(tiny_model_dir), settings).kind == "directory"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf), settings).kind == "gguf"
    assert resolve("HuggingFaceTB/SmolLM2-360M-Instruct", settings).kind == "hub"
    make_version(settings, "mi-asistente-v1", tiny_model_dir, base=str(tiny_model_dir), method="full")
    assert resolve("mi-asistente-v1", settings).kind == "version"


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model", "unknown model 'no-such-model'.*known names: smollm2-135m"),
        ("./missing.gguf", "model file .*missing.gguf does not exist"),
        ("/nowhere/model", "does not exist"),
        ("", "empty model name"),
    ],
)
def test_resolve_errors(name, message):
    with pytest.raises(ModelError, match=message):
        resolve(name, load_settings())


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a model \\(no config.json"):
        resolve(str(tmp_path), load_settings())


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40])
def test_corrupt_gguf(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="broken.gguf: not a valid GGUF file"):
        check_gguf(path)
    with pytest.raises(ModelError, match="not a valid GGUF"):
        load(str(path), load_settings())


def test_hub_without_network_fails_fast():
    started = time.perf_counter()
    with pytest.raises(ModelError, match="hub is not reachable"):
        load("someone/some-model", load_settings())
    assert time.perf_counter() - started < 10


def test_load_directory(tiny_model_dir):
    loaded = load(str(tiny_model_dir), load_settings(), dtype="float32")
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer.chat_template
    assert loaded.tokenizer.eos_token_id in loaded.eos_token_ids
    assert not loaded.model.training


def test_load_full_and_lora_versions(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = load_settings()
    make_version(settings, "full-v1", tiny_model_dir, base=str(tiny_model_dir), method="full")
    assert load("full-v1", settings, dtype="float32").ref.kind == "version"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    shutil.copy(tiny_model_dir / "tokenizer.json", adapter_dir)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", adapter_dir)
    make_version(settings, "lora-v1", adapter_dir, base=str(tiny_model_dir), method="lora")

    merged = load("lora-v1", settings, dtype="float32")
    plain = load(str(tiny_model_dir), settings, dtype="float32")
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert torch.allclose(merged.model(input_ids=ids).logits, expected, atol=1e-4)
        assert not torch.allclose(plain.model(input_ids=ids).logits, expected, atol=1e-4)

    names = {row["name"]: row["kind"] for row in list_models(settings)}
    assert names["full-v1"] == names["lora-v1"] == "version"
    assert names["smollm2-135m"] == "bundled"
