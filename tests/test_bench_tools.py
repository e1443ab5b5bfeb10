"""`forja bench tools` on the tiny random model through a real `forja serve` (PyTorch): every figure is there,
and a required call always parses and validates, whatever the model."""

import json
import shutil

import jsonschema
from typer.testing import CliRunner

from forja.bench_tools import BENCH_DATA, SCHEMAS, render_tools
from forja.cli import app


def test_bench_tools_reports_every_measure_and_required_calls_always_validate(varied_model_dir, tmp_path):
    # the tools' system prompt takes some 700 tokens of the tiny 512-token vocabulary: a 2,048-token context
    model = tmp_path / "long-model"
    shutil.copytree(varied_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    rows = [json.loads(line) for line in BENCH_DATA.read_text(encoding="utf-8").splitlines()]
    picked = [next(r for r in rows if r["tool"] == "get_weather"), next(r for r in rows if r["tool"] == "book_table"),
              next(r for r in rows if r["tool"] is None)]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    out = tmp_path / "tools.json"

    result = CliRunner().invoke(app, ["bench", "tools", "--model", str(model), "--backend", "pytorch", "--rounds", "2",
                                      "--data", str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["prompts"] == 3 and report["expect_a_tool"] == 2 and list(report["backends"]) == ["pytorch"]
    figures = report["backends"]["pytorch"]

    required = figures["required"]
    assert required["requests"] == 3 and required["valid"] == 1.0
    for row in required["rows"]:
        assert row["finish_reason"] == "tool_calls" and len(row["calls"]) == 1
        call = row["calls"][0]
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    auto = figures["auto"]
    assert auto["expected_tool"] + auto["other_tool"] + auto["text_when_tool_expected"] == 1.0
    assert auto["tool_when_none_expected"] in (0.0, 1.0) and auto["calls_valid"] in (None, 1.0)
    assert figures["json_schema"]["requests"] == 3 and figures["json_schema"]["valid"] == 1.0

    cost = figures["cost"]
    for mode in ("free", "json_schema", "free_logprobs", "tool_call"):
        assert cost[mode]["tokens_per_s"] > 0 and len(cost[mode]["runs_tokens_per_s"]) == 2
    # every mode reads the same prompt: the tools' system prompt, then the question
    assert len({cost[mode]["prompt_tokens"] for mode in ("free", "json_schema", "free_logprobs", "tool_call")}) == 1
    for ratio in ("json_schema_over_free", "tool_call_over_free_logprobs", "logprobs_over_free"):
        assert cost[ratio] > 0 and cost[ratio + "_best"] > 0
    assert isinstance(cost["holds"], bool)
    assert "required: calls that parse and validate" in result.stdout and "| pytorch |" in result.stdout
    assert render_tools(report) in result.stdout
