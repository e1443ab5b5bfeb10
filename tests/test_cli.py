import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from forja.cli import app

runner = CliRunner()


def forja(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_generate_json(tiny_model_dir):
    result = forja("generate", "Hola", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model"] == str(tiny_model_dir)
    assert payload["usage"]["completion_tokens"] <= 8
    assert payload["usage"]["total_tokens"] == payload["usage"]["prompt_tokens"] + payload["usage"]["completion_tokens"]
    assert isinstance(payload["text"], str)


def test_generate_streams_and_reads_stdin(tiny_model_dir):
    result = forja("generate", "--model", str(tiny_model_dir), "--max-new-tokens", "5", input="Hola desde stdin\n")
    assert result.exit_code == 0, result.output
    assert "tokens at" in result.stderr


def test_generate_uses_config_defaults(tiny_model_dir, tmp_path):
    (tmp_path / "forja.yaml").write_text(f"model: {tiny_model_dir}\ngenerate:\n  max_new_tokens: 3\n")
    payload = json.loads(forja("generate", "Hola", "--json").stdout)
    assert payload["usage"]["completion_tokens"] <= 3


def test_generate_sampling_flags_reach_the_engine_over_the_config(tiny_model_dir, tmp_path, monkeypatch):
    from forja import engine

    seen = []
    real_answer = engine.answer

    def recording(running, prompt, params, on_text=None):
        seen.append(params)
        return real_answer(running, prompt, params, on_text)

    monkeypatch.setattr(engine, "answer", recording)
    (tmp_path / "forja.yaml").write_text(f"model: {tiny_model_dir}\ngenerate:\n  repetition_penalty: 1.3\n  top_k: 7\n")
    result = forja("generate", "Hola", "--json", "--max-new-tokens", "4", "--repetition-penalty", "1.15",
                   "--min-p", "0.05", "--frequency-penalty", "0.5", "--presence-penalty", "-0.25")
    assert result.exit_code == 0, result.output
    (params,) = seen
    assert (params.repetition_penalty, params.top_k, params.min_p) == (1.15, 7, 0.05)
    assert (params.frequency_penalty, params.presence_penalty, params.max_new_tokens) == (0.5, -0.25, 4)


def test_generate_refuses_a_sampling_flag_out_of_range_in_one_line(tiny_model_dir):
    result = forja("generate", "Hola", "--model", str(tiny_model_dir), "--repetition-penalty", "0")
    assert result.exit_code == 1
    assert "--repetition-penalty: Input should be greater than 0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "missing.gguf"], "model file missing.gguf does not exist"),
        (["--model", "someone/some-model"], "hub is not reachable"),
        (["--max-new-tokens", "400"], "more than the model's context of 256"),
    ],
)
def test_generate_errors_are_one_line(tiny_model_dir, tmp_path, args, message):
    (tmp_path / "forja.yaml").write_text(f"model: {tiny_model_dir}\n")
    result = forja("generate", "Hola", *args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_models_lists_bundled_and_json():
    result = forja("models", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["name"] == "smollm2-135m" and rows[0]["kind"] == "bundled"


def test_config_prints_resolved_settings(forja_home):
    result = forja("config")
    assert result.exit_code == 0
    assert f"home: {forja_home}" in result.stdout


def test_corrupt_gguf_through_the_real_command(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    proc = subprocess.run(
        [sys.executable, "-m", "forja.cli", "generate", "hi", "--model", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("forja: error: ") and "corrupt.gguf: not a valid GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_bench_repetition_answers_every_prompt_greedy_and_per_seed_at_each_penalty(varied_model_dir):
    from forja.bench import REPETITION_PROMPTS, REPETITION_SEEDS

    result = forja("bench", "repetition", "--model", str(varied_model_dir), "--backend", "pytorch", "--penalty", "1.0",
                   "--penalty", "1.5", "--max-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["sampling"], r["value"]) for r in rows] == [
        ("greedy", 1.0), ("greedy", 1.5), ("temperature 0.3, top_p 0.9", 1.0), ("temperature 0.3, top_p 0.9", 1.5)]
    assert {r["penalty"] for r in rows} == {"repetition_penalty"}
    assert [r["answers"] for r in rows] == [len(REPETITION_PROMPTS)] * 2 + [len(REPETITION_PROMPTS) * len(REPETITION_SEEDS)] * 2
    assert all(len(r["looping_answers"]) == r["looping"] and r["mean_tokens"] <= 6 for r in rows)
    table = forja("bench", "repetition", "--model", str(varied_model_dir), "--backend", "pytorch", "--kind", "frequency",
                  "--penalty", "0.5", "--max-tokens", "4", "--no-sampled")
    assert table.exit_code == 0, table.output
    assert "greedy" in table.stdout and "frequency_penalty 0.5" in table.stdout and "temperature" not in table.stdout
    refused = forja("bench", "repetition", "--model", str(varied_model_dir), "--penalty", "0")
    assert refused.exit_code == 1 and "--penalty 0.0: Input should be greater than 0" in refused.stderr
