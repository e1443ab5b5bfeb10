from pathlib import Path

import pytest

from forja.config import ConfigError, load_settings


def test_defaults_point_home_at_env(forja_home):
    settings = load_settings()
    assert settings.home == forja_home
    assert settings.model == "smollm2-135m"
    assert settings.generate.temperature == 0.0


def test_precedence_file_then_env_then_flags(tmp_path, monkeypatch):
    (tmp_path / "forja.yaml").write_text("model: from-file\ngenerate:\n  temperature: 0.5\n  max_new_tokens: 40\n")
    assert load_settings().model == "from-file"
    assert load_settings().generate.max_new_tokens == 40
    monkeypatch.setenv("FORJA_MODEL", "from-env")
    monkeypatch.setenv("FORJA_GENERATE__TEMPERATURE", "0.9")
    settings = load_settings()
    assert settings.model == "from-env"
    assert settings.generate.temperature == 0.9
    assert settings.generate.max_new_tokens == 40  # nested values merge, they are not replaced
    assert load_settings(model="from-flag").model == "from-flag"


def test_explicit_config_file(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.yaml"
    path.write_text("dtype: float32\n")
    monkeypatch.setenv("FORJA_CONFIG", str(path))
    assert load_settings().dtype == "float32"
    monkeypatch.setenv("FORJA_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_settings()


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed\n", "line 2: not valid YAML"),
        ("- a list\n", "top level must be a mapping"),
        ("generate:\n  temperature: 7\n", "'generate.temperature'"),
        ("no_such_setting: 1\n", "'no_such_setting'"),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, message):
    (tmp_path / "forja.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings()
    assert "\n" not in str(info.value)


def test_example_config_loads(monkeypatch):
    example = Path(__file__).parent.parent / "forja.example.yaml"
    monkeypatch.setenv("FORJA_CONFIG", str(example))
    settings = load_settings()
    assert settings.generate.max_new_tokens > 0
    # the example shows the measured defaults (README, Default sampling and the served file)
    monkeypatch.delenv("FORJA_CONFIG")
    defaults = load_settings()
    assert settings.generate == defaults.generate
    assert (settings.serve.gguf_source, settings.serve.gguf_quant) == (defaults.serve.gguf_source, defaults.serve.gguf_quant)


def test_default_sampling_is_greedy_with_a_frequency_penalty_and_forja_config_shows_it(forja_home):
    from typer.testing import CliRunner

    from forja.cli import app

    generate = load_settings().generate
    assert (generate.temperature, generate.repetition_penalty, generate.frequency_penalty) == (0.0, 1.0, 1.0)
    shown = CliRunner().invoke(app, ["config"]).stdout
    assert "frequency_penalty: 1.0" in shown and "repetition_penalty: 1.0" in shown and "gguf_quant: f16" in shown
