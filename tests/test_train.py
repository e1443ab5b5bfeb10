import json
import os
import signal
import subprocess
import sys
import time
from ctypes.util import find_library
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from conftest import answer_alone

from forja.cli import app
from forja.config import TrainSettings, jemalloc_env, load_settings
from forja.models import load
from forja.train import (
    IGNORE,
    TrainError,
    batch_order,
    build_examples,
    dialogue_example,
    knowledge_examples,
    micro_batches,
    new_run,
    open_run,
    train,
)

runner = CliRunner()

PAIRS = [
    ("Hola", "Buenos días."),
    ("¿Horario?", "De 7 a 14."),
    ("Where?", "Calle Yunque 12."),
    ("Price?", "Two euros."),
]


def write_pairs(path: Path, pairs=PAIRS) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_dialogue_labels_cover_assistant_turns_and_eos_only(tokenizer):
    messages = [
        {"role": "system", "content": "Eres breve."},
        {"role": "user", "content": "Hola"},
        {"role": "assistant", "content": "Buenos días."},
        {"role": "user", "content": "¿Y mañana?"},
        {"role": "assistant", "content": "Igual."},
    ]
    example = dialogue_example(tokenizer, messages)
    trained = [t for t in example.labels if t != IGNORE]
    assert tokenizer.decode(trained) == "Buenos días.<|im_end|>Igual.<|im_end|>"
    # the end-of-turn token is learned although it is also what the tokenizer pads with
    assert trained.count(tokenizer.eos_token_id) == 2
    assert len(example.input_ids) == len(example.labels)


def test_knowledge_is_split_never_cut(tokenizer):
    text = "La masa madre se alimenta cada día con harina y agua. " * 20
    examples = knowledge_examples(tokenizer, text, max_len=32)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for e in examples for t in e.input_ids] == ids
    assert all(len(e.input_ids) <= 32 and e.labels == e.input_ids for e in examples)


def test_too_long_dialogues_are_reported_not_cut(tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "hola " * 200}, {"role": "assistant", "content": "sí"}], "source": "f.csv:2"},
        {"messages": [{"role": "user", "content": "hola"}, {"role": "assistant", "content": "sí"}], "source": "f.csv:3"},
        {"text": "pan " * 100},
    ]
    examples, too_long = build_examples(tokenizer, rows, max_len=64)
    assert len(too_long) == 1 and too_long[0].startswith("f.csv:2: ")
    assert sum(1 for e in examples if e.labels != e.input_ids) == 1  # the short dialogue
    assert sum(len(e.input_ids) for e in examples if e.labels == e.input_ids) == len(tokenizer("pan " * 100, add_special_tokens=False)["input_ids"])


def test_batches_are_reproducible_and_bounded(tokenizer):
    rows = [{"text": "palabra " * n} for n in range(1, 60)]
    examples, _ = build_examples(tokenizer, rows, max_len=256)
    first = batch_order(examples, 4, seed=3, epoch=0)
    assert first == batch_order(examples, 4, seed=3, epoch=0)
    assert first != batch_order(examples, 4, seed=3, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(len(examples)))
    for batch in first:
        parts = micro_batches(batch, examples, max_tokens=64)
        assert sorted(i for p in parts for i in p) == sorted(batch)
        for part in parts:
            assert sum(len(examples[i].input_ids) for i in part) <= 64 or len(part) == 1  # knowledge: nothing shared


def tiny_config(**overrides) -> TrainSettings:
    values = dict(method="full", learning_rate=3e-3, batch_size=4, max_steps=2, eval_every=None,
                  checkpoint_every=None, seed=0, warmup_ratio=0.0, lr_scheduler="constant")
    return TrainSettings(**{**values, **overrides})


def test_two_step_losses_are_pinned(tiny_model_dir, tmp_path):
    """A silent change in tokenisation, masking, batching or the loss shows up here."""
    settings = load_settings()
    run = new_run(settings, [write_pairs(tmp_path / "pairs.jsonl")], "pinned", str(tiny_model_dir), tiny_config())
    version = train(settings, run, progress=False)
    losses = [r["loss"] for r in map(json.loads, (version / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses == pytest.approx([6.0829, 5.6601], abs=2e-3)


def test_bf16_autocast_trains_on_packed_batches(tiny_model_dir, tmp_path):
    """bfloat16 autocast (what a CPU with avx512_bf16 or a GPU gets) with the packed batches' float mask."""
    settings = load_settings()
    run = new_run(settings, [write_pairs(tmp_path / "pairs.jsonl")], "bf16", str(tiny_model_dir),
                  tiny_config(precision="bfloat16", method="lora", learning_rate=1e-2))
    version = train(settings, run, progress=False)
    losses = [r["loss"] for r in map(json.loads, (version / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert losses == pytest.approx([6.08, 6.0], abs=0.15)  # bf16 rounding of the fp32 figures above


def test_memorises_pairs_and_learns_to_stop(tiny_model_dir, tmp_path):
    from forja.engine import SamplingParams
    from forja.engine.text import chat_messages

    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    version = train(settings, new_run(settings, [data], "memo", str(tiny_model_dir), tiny_config(max_steps=60)), progress=False)
    metrics = json.loads((version / "version.json").read_text())["metrics"]
    # it stops once every answer is reproduced (checked twice, an epoch apart), well before max_steps
    assert metrics["stopped"] == "answers learned" and metrics["step"] < 60
    assert metrics["answers"] == {"checked": 4, "reproduced": 4, "of_rows": 4, "not_reproduced": []}
    learned = [r for r in map(json.loads, (version / "metrics.jsonl").read_text().splitlines()) if "learned" in r]
    assert [r["learned"] for r in learned[-2:]] == [4, 4]
    loaded = load("memo", settings, dtype="float32")
    for question, answer in PAIRS:
        reply = answer_alone(loaded, chat_messages(question), SamplingParams(max_new_tokens=20))
        assert reply.text == answer
        assert reply.finish_reason == "stop"  # EOS was learned


def test_lora_version_is_self_describing_and_merges(tiny_model_dir, tmp_path):
    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--name", "mi-asistente-v1",
                                 "--max-steps", "3", "--eval-every", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "model version mi-asistente-v1 written" in result.stdout
    version = settings.versions_dir / "mi-asistente-v1"
    description = json.loads((version / "version.json").read_text())
    assert description["base"] == str(tiny_model_dir) and description["method"] == "lora"
    assert len(description["data_hash"]) == 64 and description["forja_version"].startswith("0.1.0")
    assert description["config"]["max_steps"] == 3 and description["config"]["lora_r"] == 16
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.jsonl", "run.json"):
        assert (version / name).is_file(), name
    assert (version / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (settings.runs_dir / "mi-asistente-v1" / "checkpoints").exists()

    listed = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert any(row["name"] == "mi-asistente-v1" and row["kind"] == "version" for row in listed)

    merged = runner.invoke(app, ["models", "merge", "mi-asistente-v1"])
    assert merged.exit_code == 0, merged.output
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        a = load("mi-asistente-v1", settings, dtype="float32").model(input_ids=ids).logits
        b = load("mi-asistente-v1-merged", settings, dtype="float32").model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not (settings.versions_dir / "mi-asistente-v1-merged" / "adapter_config.json").exists()


def test_mixed_dialogue_and_knowledge_from_raw_files(tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    (folder / "dialogue").mkdir(parents=True)
    (folder / "knowledge").mkdir()
    (folder / "dialogue" / "faq.csv").write_text("question,answer\nHola,Buenos días.\n¿Horario?,De 7 a 14.\n")
    (folder / "knowledge" / "manual.md").write_text("# Manual\n\nLa masa madre se alimenta cada día.\n")
    result = runner.invoke(app, ["train", "--data", str(folder), "--base", str(tiny_model_dir), "--name", "mixed",
                                 "--max-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = (load_settings().runs_dir / "mixed" / "data.jsonl").read_text().splitlines()
    kinds = {"messages" if "messages" in json.loads(r) else "text" for r in rows}
    assert kinds == {"messages", "text"}


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give the training data with --data"),
        (["--data", "nowhere.csv"], "nowhere.csv: no such file or folder"),
        (["--data", "DATA", "--base", "no-such-model"], "unknown model 'no-such-model'"),
        (["--resume", "ghost"], "no run named 'ghost'"),
        (["--data", "DATA", "--name", "bad name!"], "may only hold letters"),
        (["--data", "DATA", "--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
    ],
)
def test_train_errors_are_one_line(tiny_model_dir, tmp_path, args, message):
    data = write_pairs(tmp_path / "pairs.jsonl")
    args = [str(data) if a == "DATA" else a for a in args]
    if "--base" not in args:
        args += ["--base", str(tiny_model_dir)]
    result = runner.invoke(app, ["train", *args, "--quiet"])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_existing_version_name_is_refused(tiny_model_dir, tmp_path):
    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    train(settings, new_run(settings, [data], "v1", str(tiny_model_dir), tiny_config()), progress=False)
    with pytest.raises(TrainError, match="'v1' already exists"):
        new_run(settings, [data], "v1", str(tiny_model_dir), tiny_config())


def forja_train_process(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "FORJA_HOME": str(home)}
    # a shell that starts the test run in the background ignores SIGINT, and children inherit that:
    # give the trainer the default disposition, as a terminal would
    return subprocess.Popen([sys.executable, "-m", "forja.cli", "train", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def final_metrics(settings, name: str) -> dict:
    return json.loads((settings.versions_dir / name / "version.json").read_text())["metrics"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path} appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_resume_after_kill_9_matches_uninterrupted_run(tiny_model_dir, tmp_path, forja_home):
    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    config = tiny_config(method="lora", max_steps=60, checkpoint_every=10, batch_size=2, seed=5, lora_dropout=0.1)
    train(settings, new_run(settings, [data], "straight", str(tiny_model_dir), config), progress=False)

    (tmp_path / "forja.yaml").write_text(yaml.safe_dump({"train": config.model_dump()}))
    victim = forja_train_process(forja_home, "--data", str(data), "--base", str(tiny_model_dir), "--name", "killed",
                                 "--config", str(tmp_path / "forja.yaml"))
    wait_for(settings.runs_dir / "killed" / "checkpoints" / "step-000020" / "state.pt", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (settings.versions_dir / "killed").exists()  # it really died mid-run

    train(settings, open_run(settings, "killed"), progress=False)
    straight, resumed = final_metrics(settings, "straight"), final_metrics(settings, "killed")
    assert straight["step"] == resumed["step"] == 60
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-3, abs=1e-4)
    steps = [r["step"] for r in map(json.loads, (settings.versions_dir / "killed" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 61))  # no step lost or logged twice


def test_ctrl_c_checkpoints_and_resumes(tiny_model_dir, tmp_path, forja_home):
    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    proc = forja_train_process(forja_home, "--data", str(data), "--base", str(tiny_model_dir), "--max-steps", "100000",
                               "--checkpoint-every", "10", "--batch-size", "2", "--name", "interrupted")
    wait_for(settings.runs_dir / "interrupted" / "checkpoints" / "step-000010" / "state.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "checkpoint saved, continue with: forja train --resume interrupted" in stderr
    assert "Traceback" not in stderr
    run = open_run(settings, "interrupted")
    stopped_at = int(run.last_checkpoint().name.split("-")[1])
    assert stopped_at >= 10
    run.config = run.config.model_copy(update={"max_steps": stopped_at + 3})  # finish quickly
    train(settings, run, progress=False)
    assert final_metrics(settings, "interrupted")["step"] == stopped_at + 3


def test_sigterm_many_times_over_is_one_stop_at_the_end_of_a_step_with_its_checkpoint(tiny_model_dir, tmp_path,
                                                                                       forja_home):
    # a job's process gets SIGTERM when its worker dies, once more for each thread of the worker's process
    # it passes to as that process ends: a second SIGINT would stop mid-step, with no checkpoint
    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    proc = forja_train_process(forja_home, "--data", str(data), "--base", str(tiny_model_dir), "--max-steps", "100000",
                               "--checkpoint-every", "1000", "--batch-size", "2", "--name", "terminated")
    metrics = settings.runs_dir / "terminated" / "metrics.jsonl"
    wait_for(metrics, proc)
    terminated_once_with_a_checkpoint(proc, metrics, "terminated", times=5)


def terminated_once_with_a_checkpoint(proc: subprocess.Popen, metrics: Path, name: str, times: int) -> None:
    """SIGTERM `times` over, 2 ms apart: one stop, at the end of a step, with that step's checkpoint."""
    for _ in range(times):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"checkpoint saved, continue with: forja train --resume {name}" in stderr, stderr
    assert "Traceback" not in stderr
    last_step = max(r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r)
    assert sorted(p.name for p in (metrics.parent / "checkpoints").iterdir())[-1] == f"step-{last_step:06d}"


def test_jemalloc_env_adds_the_library_once_unless_told_not_to(monkeypatch):
    if find_library("jemalloc") is None:
        assert jemalloc_env({"PATH": "/bin"}) is None
        pytest.skip("libjemalloc2 is not installed (make install installs it as root)")
    env = jemalloc_env({"LD_PRELOAD": "libfoo.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"].startswith("libfoo.so:") and "jemalloc" in env["LD_PRELOAD"] and env["PATH"] == "/bin"
    assert jemalloc_env(env) is None  # already there: no second start
    assert jemalloc_env({"FORJA_ALLOCATOR": "system"}) is None


def test_without_jemalloc_training_goes_on_with_a_one_line_note(monkeypatch, capsys):
    import ctypes.util

    from forja import cli

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.delenv("FORJA_ALLOCATOR", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    cli._start_with_jemalloc()  # nothing to preload: no second start, a note instead
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "apt-get install libjemalloc2" in note
    monkeypatch.setenv("FORJA_ALLOCATOR", "system")
    cli._start_with_jemalloc()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("choice", ["default", "system"])
def test_forja_train_starts_itself_with_jemalloc(tiny_model_dir, tmp_path, forja_home, monkeypatch, choice):
    """The CLI process re-executes itself with jemalloc preloaded; the version says which allocator it used."""
    if choice == "system":
        monkeypatch.setenv("FORJA_ALLOCATOR", "system")
    else:
        monkeypatch.delenv("FORJA_ALLOCATOR", raising=False)
    data = write_pairs(tmp_path / "pairs.jsonl")
    proc = forja_train_process(forja_home, "--data", str(data), "--base", str(tiny_model_dir), "--max-steps", "2",
                               "--name", "allocated")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    metrics = final_metrics(load_settings(), "allocated")
    installed = find_library("jemalloc") is not None
    assert metrics["allocator"] == ("jemalloc" if installed and choice == "default" else "system")
    assert ("jemalloc is not installed" in stderr) == (not installed and choice == "default")
    assert 50 < metrics["peak_rss_mb"] < 4096


@pytest.mark.slow
def test_real_model_learns_the_sample_answers(bundled_home, monkeypatch, tmp_path):
    """A short LoRA run on three sample pairs moves the bundled model's answers to the data."""
    from forja.engine import SamplingParams
    from forja.engine.text import chat_messages

    monkeypatch.setenv("FORJA_HOME", str(bundled_home))
    settings = load_settings()
    pairs = [
        ("Where is Panadería La Forja?", "We are at Calle del Yunque 12, in Villaferro."),
        ("When does Panadería La Forja open on Sunday?", "On Sundays we open from 8:00 to 13:00."),
        ("Does Panadería La Forja bake gluten-free bread?", "Yes, our gluten-free loaf is baked every Thursday."),
    ]

    def answer(loaded, question):
        return answer_alone(loaded, chat_messages(question), SamplingParams(max_new_tokens=30)).text

    before = load("smollm2-135m", settings, dtype="float32")
    assert "Yunque" not in answer(before, pairs[0][0])
    config = TrainSettings(max_steps=24, batch_size=3, learning_rate=1e-3, warmup_ratio=0.0, eval_every=None,
                           checkpoint_every=None, lr_scheduler="constant", faq_retrieval=False)  # asked without the rows
    data = write_pairs(tmp_path / "bakery.jsonl", pairs)
    train(settings, new_run(settings, [data], "bakery-v1", "smollm2-135m", config), progress=False)
    after = load("bakery-v1", settings, dtype="float32")
    learned = [answer(after, question) for question, _ in pairs]
    assert "Yunque 12" in learned[0], learned
    assert sum(expected == got for (_, expected), got in zip(pairs, learned)) >= 2, learned


def test_bench_train_runs_forja_and_the_three_references_on_the_same_examples(tiny_model_dir, tmp_path):
    data = tmp_path / "dialogue"
    data.mkdir()
    write_pairs(data / "pairs.jsonl", [(f"Pregunta {i}?", f"Respuesta número {i}.") for i in range(20)])
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "train", "--model", str(tiny_model_dir), "--data", str(data),
                                 "--steps", "2", "--max-length", "160", "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    sides = report["sides"]
    assert list(sides) == ["seeds", "padded", "trl", "forja"]
    assert report["examples"] == 8 and all(side["examples"] == 8 for side in sides.values())
    # the same real tokens on every side: truncation cuts nothing here, TRL's packing drops nothing
    assert len({side["tokens"] for side in sides.values()}) == 1 and sides["forja"]["tokens"] > 0
    assert sides["padded"]["padded_tokens"] == 8 * 160  # every example padded to max_length
    assert all(side["peak_rss_mb"] > 50 and side["val_loss"] > 0 for side in sides.values())
    assert all(sides[name]["allocator"] == "system" for name in ("seeds", "padded", "trl"))  # the tutorials'
    assert sides["forja"]["allocator"] == ("jemalloc" if find_library("jemalloc") else "system")
    assert report["ratios"]["forja/trl"] == pytest.approx(sides["forja"]["tokens_per_second"] / sides["trl"]["tokens_per_second"])
    machine = report["machine"]
    assert machine["matmul"]["float32"]["gflops"] > 0 and machine["parameters"] > 0
    assert report["roofline"]["tokens_per_second"] == pytest.approx(
        machine["matmul"][machine["precision"]]["gflops"] * 1e9 / (4 * machine["parameters"]), rel=1e-3)
    assert set(report["targets"]) == {"vs_trl", "roofline_share", "peak_mib"}
    for line in ("seeds' recipe", "padded baseline", "TRL SFTTrainer, packing", "forja / roofline", "CPU: "):
        assert line in result.stdout


def test_bench_train_reports_each_sides_median_round_and_the_median_ratio():
    from forja.bench_train import summarise

    def side(rate):
        return {"tokens_per_second": rate, "peak_rss_mb": 1000.0, "cpu_use": 1.0}

    runs = [{"trl": side(10.0), "forja": side(50.0)}, {"trl": side(20.0), "forja": side(60.0)},
            {"trl": side(12.0), "forja": side(30.0)}]
    machine = {"precision": "float32", "parameters": 10**6, "matmul": {"float32": {"gflops": 1.0}}, "matmul_runs": []}
    summary = summarise(runs, machine)
    assert summary["sides"]["trl"]["tokens_per_second"] == 12.0 and summary["sides"]["forja"]["tokens_per_second"] == 50.0
    assert summary["ratios"]["forja/trl"] == 3.0  # the rounds' ratios are 5, 3 and 2.5
    assert summary["roofline"]["tokens_per_second"] == 250.0 and summary["roofline"]["forja_share"] == 0.2
    assert summary["targets"]["vs_trl"]["met"] and not summary["targets"]["roofline_share"]["met"]


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    from forja.train import Run

    run = Run("r", tmp_path, tiny_config(), "base", tmp_path / "d.jsonl", "hash")
    for name in ("step-000010", "step-000020.tmp"):
        (run.checkpoints / name).mkdir(parents=True)
        (run.checkpoints / name / "state.pt").write_bytes(b"partial")
    (run.checkpoints / "step-000030").mkdir()  # killed before state.pt was written
    assert run.last_checkpoint() == run.checkpoints / "step-000010"


def test_lean_activations_give_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """SiluMul keeps less for backward, and the gated product and the norms' outputs are recomputed in the
    backward pass rather than kept; the loss and every LoRA gradient stay the same."""
    from forja.train import Example, Recompute, lean_activations, loss_sum, pack

    settings = load_settings()
    ids = [1, 5, 9, 12, 7, 3, 22, 8]
    unpacked = []
    real_unpack = Recompute.unpack
    monkeypatch.setattr(Recompute, "unpack", staticmethod(lambda packed: unpacked.append(type(packed)) or real_unpack(packed)))

    def loss_and_grads(lean: bool):
        torch.manual_seed(0)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(load(str(tiny_model_dir), settings, dtype="float32").model,
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.train()
        if lean:
            assert lean_activations(model) == 2  # the tiny model's two layers
            loss, count = loss_sum(model, pack([Example(ids, ids)], "cpu"))
            loss = loss / count
        else:
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = loss_and_grads(False)
    assert not unpacked
    lean_loss, lean = loss_and_grads(True)
    # per layer: q, k and v's LoRA A keep the first norm's output, gate and up's the second's, down's the product
    assert unpacked.count(tuple) == 2 * 6
    assert lean_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == lean.keys() and all(torch.allclose(plain[n], lean[n], atol=1e-6) for n in plain)


def test_packed_examples_give_each_alone_loss_and_gradients(tiny_model_dir, tokenizer):
    """Examples packed into one sequence (their shared system turn once, no padding, each attending to the
    prefix and itself) give the loss and every LoRA gradient of a plain forward over each example alone."""
    from peft import LoraConfig, get_peft_model

    from forja.train import loss_sum, pack, packed_tokens, shared_prefix

    system = {"role": "system", "content": "Eres el asistente de la panadería La Forja, en Villaferro."}
    examples = [dialogue_example(tokenizer, [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
                for q, a in PAIRS]
    examples.append(dialogue_example(tokenizer, [{"role": "user", "content": "Sin sistema"},
                                                 {"role": "assistant", "content": "Vale."}]))
    shared = shared_prefix(examples[:4])
    first_label = min(next(i for i, label in enumerate(e.labels) if label != IGNORE) for e in examples[:4])
    assert 8 <= shared < first_label  # the whole system turn, and nothing that is learnt
    assert packed_tokens(examples[:4]) == shared + sum(len(e.input_ids) - shared for e in examples[:4])
    assert shared_prefix(examples) < shared  # the fifth starts differently
    assert shared_prefix(examples[:1]) == 0
    assert shared_prefix(knowledge_examples(tokenizer, "pan " * 40, 16)) == 0  # every token is learnt
    for budget in (40, 80, 120, 400):  # micro_batches keeps its running prefix equal to packed_tokens' count
        expected: list[list[int]] = [[]]
        for i in sorted(range(5), key=lambda i: len(examples[i].input_ids)):
            if expected[-1] and packed_tokens([examples[j] for j in [*expected[-1], i]]) > budget:
                expected.append([])
            expected[-1].append(i)
        assert micro_batches(list(range(5)), examples, budget) == expected
    settings = load_settings()

    def lora_model():
        torch.manual_seed(0)
        model = get_peft_model(load(str(tiny_model_dir), settings, dtype="float32").model,
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.train()
        return model

    def grads(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    alone = lora_model()
    total = 0.0
    for e in examples:
        labels = torch.tensor([e.labels])
        loss = alone(input_ids=torch.tensor([e.input_ids]), labels=labels).loss * int((labels[:, 1:] != IGNORE).sum())
        loss.backward()
        total += loss.item()
    for part in (examples[:4], examples):
        packed = lora_model()
        summed, count = loss_sum(packed, pack(part, "cpu"))
        assert count == sum(e.trained_tokens for e in part)
        if len(part) == len(examples):
            summed.backward()
            assert summed.item() == pytest.approx(total, rel=1e-5)
    expected, got = grads(alone), grads(packed)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[n], got[n], atol=1e-5, rtol=1e-4) for n in expected)


@pytest.mark.parametrize("trained_head", [False, True])
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradients(trained_head):
    """The loss computed a chunk of rows at a time, gradients included, equals F.cross_entropy on whole logits."""
    from forja.train import LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(75, 24, requires_grad=True)  # 75 rows: chunks of 32, 32 and 11
    weight = torch.randn(300, 24, requires_grad=trained_head)
    targets = torch.randint(0, 300, (75,))
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (plain * 0.5).backward()
    expected = hidden.grad.clone(), weight.grad.clone() if trained_head else None
    hidden.grad = weight.grad = None
    chunked = LinearCrossEntropy.apply(hidden, weight, targets)
    (chunked * 0.5).backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(hidden.grad, expected[0], atol=1e-5)
    if trained_head:
        assert torch.allclose(weight.grad, expected[1], atol=1e-4)
    else:
        assert weight.grad is None


def test_a_run_that_would_not_fit_in_memory_is_refused_at_once_with_the_fix(tiny_model_dir, tmp_path, monkeypatch):
    import forja.train as training

    data = write_pairs(tmp_path / "pairs.jsonl")
    result = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--name", "fits"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("plan: "))
    assert "goal memorise, 4 examples" in line and "stopping once every answer is reproduced" in line
    # room for the process and the answer checks, not for the weights and all of the activations
    monkeypatch.setattr(training, "available_memory_mb", lambda: training.BASE_RSS_MB + training.ANSWER_CHECK_MB)
    refused = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--name", "too-big"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "this run needs about" in refused.output and "MB are available; use a smaller model" in refused.output
    assert not (load_settings().versions_dir / "too-big").exists()


def test_a_validation_file_of_its_own_is_the_validation_set_and_a_held_run_is_refused(tiny_model_dir, tmp_path):
    from forja.models import hold_run

    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl")
    held = tmp_path / "held.csv"
    held.write_text("question,answer\n¿Abrís el domingo?,No.\n", encoding="utf-8")
    result = runner.invoke(app, ["train", "--data", str(data), "--validation", str(held), "--base", str(tiny_model_dir),
                                 "--name", "with-val", "--max-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    run = settings.runs_dir / "with-val"
    rows = [json.loads(line) for line in (run / "data.val.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == ["No."]
    assert len((run / "data.jsonl").read_text().splitlines()) == len(data.read_text().splitlines())  # none held out
    assert "val_loss" in json.loads((settings.versions_dir / "with-val" / "version.json").read_text())["metrics"]

    again = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--name", "busy",
                                "--max-steps", "1", "--checkpoint-every", "1", "--quiet"])
    assert again.exit_code == 0, again.output
    (settings.versions_dir / "busy" / "version.json").unlink()  # as if it had not finished
    with hold_run(settings.runs_dir / "busy", "busy"):
        refused = runner.invoke(app, ["train", "--resume", "busy", "--quiet"])
    assert refused.exit_code == 1 and "is being trained by pid" in refused.output


MORE_PAIRS = PAIRS + [("¿Envíos?", "Sí, a toda España."), ("¿Pan sin gluten?", "Los viernes.")]


def losses_of(version: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (version / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_give_the_losses_and_weights_of_one_with_the_same_global_batch(tiny_model_dir, tmp_path,
                                                                                      method):
    """Data parallel over gloo: each process takes its share of every batch (6 rows, batches of 4: 2+2 and
    1+1, gradient accumulation over 2), the gradients are summed, so the steps are one process's."""
    settings = load_settings()
    data = write_pairs(tmp_path / "pairs.jsonl", MORE_PAIRS)
    config = tiny_config(method=method, max_steps=3, gradient_accumulation=2, batch_size=2, precision="float32",
                         learning_rate=3e-3 if method == "full" else 2e-2)
    one = train(settings, new_run(settings, [data], f"one-{method}", str(tiny_model_dir), config), progress=False)
    two = train(settings, new_run(settings, [data], f"two-{method}", str(tiny_model_dir), config), progress=False,
                processes=2)
    assert losses_of(two) == pytest.approx(losses_of(one), rel=1e-5) and len(losses_of(two)) == 3
    tokens = [json.loads(line).get("tokens") for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert tokens == [json.loads(line).get("tokens") for line in (one / "metrics.jsonl").read_text().splitlines()]
    a = load(one.name, settings, dtype="float32").model.state_dict()
    b = load(two.name, settings, dtype="float32").model.state_dict()
    assert a.keys() == b.keys()
    # fp32: the sums of gradients differ only in rounding (another order of additions, other packings);
    # under bf16 autocast the packings round differently enough that Adam's first steps move ~4% of the
    # weights apart by up to steps × lr
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_an_interrupted_two_process_run_resumes_to_the_same_losses(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "FORJA_HOME": str(home), "FORJA_TRAIN__PRECISION": "float32"}
    data = write_pairs(tmp_path / "pairs.jsonl", MORE_PAIRS)
    common = ["--data", str(data), "--base", str(tiny_model_dir), "--method", "full", "--batch-size", "2",
              "--learning-rate", "0.003", "--seed", "0", "--quiet"]
    base = [sys.executable, "-m", "forja.cli", "train"]
    straight = subprocess.run(base + common + ["--name", "straight", "--max-steps", "12", "--processes", "2"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    process = subprocess.Popen(base + common + ["--name", "cut", "--max-steps", "12", "--processes", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (as a terminal)
    metrics = home / "runs" / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # as the job worker stops a run
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "checkpoint saved, continue with: forja train --resume cut" in err, err
    assert "Traceback" not in err
    resumed = subprocess.run(base + ["--resume", "cut", "--processes", "2", "--quiet"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    versions = home / "models" / "versions"
    assert losses_of(versions / "cut") == pytest.approx(losses_of(versions / "straight"), abs=1e-5)


def test_a_two_process_run_takes_sigterm_many_times_over_as_one_stop_with_its_checkpoint(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "FORJA_HOME": str(home), "FORJA_TRAIN__PRECISION": "float32"}
    data = write_pairs(tmp_path / "pairs.jsonl", MORE_PAIRS)
    process = subprocess.Popen([sys.executable, "-m", "forja.cli", "train", "--data", str(data), "--base",
                                str(tiny_model_dir), "--method", "full", "--batch-size", "2", "--max-steps", "100000",
                                "--checkpoint-every", "1000", "--name", "cut", "--processes", "2", "--quiet"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = home / "runs" / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    terminated_once_with_a_checkpoint(process, metrics, "cut", times=3)  # the launcher passes each on to rank 0
