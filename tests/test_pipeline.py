"""`forja run`: two assistants from one tiny base end to end, steps skipped when their inputs have not
changed, a change rerunning one assistant from the step it reaches, a failed gate exiting non-zero."""

import csv
import json

import yaml
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings

runner = CliRunner()
STEPS = ["prepare", "train", "eval", "gate", "promote", "export", "package"]


def write_faq(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        writer.writerows(rows)


def pipeline_file(tmp_path, base, fail_under=0.0, export=("gguf", "hf", "systemd")):
    write_faq(tmp_path / "data" / "panaderia" / "faq.csv", [["¿Horario?", "De 7 a 14 h."], ["¿Pan?", "Sí, de masa madre."]])
    write_faq(tmp_path / "data" / "soporte.csv", [["Hola", "Buenos días."], ["Adiós", "Hasta luego."]])
    write_faq(tmp_path / "data" / "eval.csv", [["¿Horario?", "De 7 a 14 h."]])
    config = {"pipeline": {
        "defaults": {"base": str(base), "quant": "f16",
                     "train": {"method": "lora", "max_steps": 2, "eval_every": None, "checkpoint_every": None,
                               "stop_when_learned": False}},
        "assistants": [
            {"name": "panadero", "data": ["data/panaderia/"], "persona": {"system": "Eres el panadero.", "temperature": 0.3},
             "eval": {"testset": "data/eval.csv", "fail_under": {"token_f1": fail_under}, "max_tokens": 8},
             "export": list(export)},
            {"name": "soporte", "data": ["data/soporte.csv"]},
        ]}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def statuses(home, name="panadero"):
    runs = sorted((home / "pipelines" / "runs").iterdir())
    record = json.loads((runs[-1] / "run.json").read_text())
    return {a: [s["status"] for s in steps] for a, steps in record["assistants"].items()}, runs[-1]


def test_two_assistants_run_end_to_end_then_nothing_reruns_and_a_data_change_reruns_only_its_assistant(
        tiny_model_dir, tmp_path, forja_home):
    path = pipeline_file(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["run", "--file", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    seen, run_dir = statuses(forja_home)
    assert seen == {"panadero": ["ran"] * 7, "soporte": ["ran"] * 7}
    settings = load_settings()
    from forja import models

    versions = models.version_names(settings)
    assert len(versions) == 2 and {v.split("-")[0] for v in versions} == {"panadero", "soporte"}
    panadero = next(v for v in versions if v.startswith("panadero"))
    assert models.trained_system(settings, panadero) == "Eres el panadero."  # the persona's prompt is trained in
    gguf = list((forja_home / "pipelines" / "panadero" / "export" / "files").glob("*.gguf"))
    assert len(gguf) == 1 and gguf[0].stat().st_size > 0
    card = (forja_home / "pipelines" / "panadero" / "export" / "files" / panadero / "README.md").read_text()
    assert "| token_f1 |" in card and "Gate: passed (token_f1 ≥ 0)." in card  # the model card has its eval and gate
    assert (forja_home / "pipelines" / "panadero" / "package" / "files" / "systemd" / "forja-retrain.timer").is_file()
    personas = yaml.safe_load((forja_home / "pipelines" / "personas.yaml").read_text())["serve"]["personas"]
    assert {p["name"]: p["model"] for p in personas} == dict(zip(["panadero", "soporte"], sorted(versions)))
    report = (run_dir / "report.md").read_text()
    assert "| token_f1 |" in report and "gate: passed (token_f1" in report and "loss-panadero.png" in report
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<td>token_f1</td>" in html
    hashes = json.loads((run_dir / "reproduce" / "hashes.json").read_text())
    assert list(hashes["panadero"]["data"]) == [(tmp_path / "data/panaderia/faq.csv").as_posix()]
    assert "torch==" in (run_dir / "reproduce" / "packages.txt").read_text()
    replay = yaml.safe_load((run_dir / "reproduce" / "config.yaml").read_text())
    assert replay["pipeline"]["assistants"][1]["train"]["max_steps"] == 2  # the defaults are laid in

    result = runner.invoke(app, ["run", "--file", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert statuses(forja_home)[0] == {"panadero": ["skipped"] * 7, "soporte": ["skipped"] * 7}
    assert models.version_names(settings) == versions

    write_faq(tmp_path / "data" / "soporte.csv", [["Hola", "Muy buenos días."], ["Adiós", "Hasta luego."]])
    dry = runner.invoke(app, ["run", "--file", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "soporte prepare: would run: data changed (soporte.csv)" in dry.output
    assert "soporte train: would run: the step before it reran with new inputs" in dry.output
    assert "panadero prepare" not in dry.output and "panadero package" not in dry.output  # nothing of it would run
    assert len(models.version_names(settings)) == 2  # a dry run runs nothing

    result = runner.invoke(app, ["run", "--file", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert statuses(forja_home)[0] == {"panadero": ["skipped"] * 7, "soporte": ["ran"] * 7}
    assert len(models.version_names(settings)) == 3

    result = runner.invoke(app, ["run", "panadero", "--file", str(path), "--only", "gate", "--quiet"])
    assert result.exit_code == 0, result.output
    assert statuses(forja_home)[0] == {"panadero": ["skipped", "skipped", "skipped", "ran", "skipped", "skipped", "skipped"]}
    result = runner.invoke(app, ["run", "soporte", "--file", str(path), "--from", "promote", "--quiet"])
    assert statuses(forja_home)[0] == {"soporte": ["skipped"] * 4 + ["ran"] * 3}


def test_a_failed_gate_stops_its_assistant_exits_2_and_the_others_go_on(tiny_model_dir, tmp_path, forja_home):
    path = pipeline_file(tmp_path, tiny_model_dir, fail_under=1.5, export=("ollama",))
    result = runner.invoke(app, ["run", "--file", str(path), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "panadero gate: failed: gate failed for panadero" in result.output and "token_f1 mean" in result.output
    seen, run_dir = statuses(forja_home)
    assert seen["panadero"] == ["ran", "ran", "ran", "failed", "not run", "not run", "not run"]
    assert seen["soporte"] == ["ran"] * 7
    assert not (forja_home / "pipelines" / "panadero" / "export").exists()  # a failed version is never exported
    assert "FAILED: gate failed" in (run_dir / "report.md").read_text()
    again = runner.invoke(app, ["run", "--file", str(path), "--quiet"])  # the gate is checked again, and fails again
    assert again.exit_code == 2 and statuses(forja_home)[0]["panadero"][:4] == ["skipped", "skipped", "skipped", "failed"]


def test_pipeline_mistakes_are_one_line_errors(tiny_model_dir, tmp_path):
    path = pipeline_file(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["run", "nadie", "--file", str(path)])
    assert result.exit_code == 1 and "no assistant named 'nadie'" in result.output and "panadero, soporte" in result.output
    result = runner.invoke(app, ["run", "--file", str(path), "--force", "deploy"])
    assert result.exit_code == 1 and "--force 'deploy': not a step" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("assistants:\n  - name: a\n    train: {epochz: 3}\n")
    result = runner.invoke(app, ["run", "--file", str(bad)])
    assert result.exit_code == 1 and "pipeline.assistants.0.train: unknown train setting 'epochz'" in result.output
    bad.write_text("assistants:\n  - name: a\n  - name: a\n")
    result = runner.invoke(app, ["run", "--file", str(bad)])
    assert result.exit_code == 1 and "assistant 'a' is named twice" in result.output


def test_the_forja_yaml_pipeline_runs_without_file_and_activate_promotes_its_version(tiny_model_dir, tmp_path):
    from forja import models

    write_faq(tmp_path / "faq.csv", [["Hola", "Buenos días."]])
    (tmp_path / "forja.yaml").write_text(yaml.safe_dump({"pipeline": {
        "defaults": {"base": str(tiny_model_dir), "train": {"max_steps": 1, "eval_every": None, "checkpoint_every": None}},
        "assistants": [{"name": "recepcion", "data": ["faq.csv"], "activate": True}]}}))
    result = runner.invoke(app, ["run", "--quiet"])  # the test runs in tmp_path: ./forja.yaml is the config
    assert result.exit_code == 0, result.output
    settings = load_settings()
    version = models.version_names(settings)[0]
    assert models.active_model(settings) == version
    assert models.activation_log(settings)[-1]["reason"] == "forja run: recepcion passed its gate"
    result = runner.invoke(app, ["models", "delete", version])
    assert result.exit_code == 1 and "is the active version" in result.output
