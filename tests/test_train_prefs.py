"""Preference training (forja.train_prefs): DPO, KTO and ORPO in forja's trainer, against plain implementations."""

import json
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from test_train import final_metrics, forja_train_process, tiny_config, wait_for

from forja.cli import app
from forja.config import TrainSettings, load_settings
from forja.models import load
from forja.train import IGNORE, new_run, open_run, prepare_model, train
from forja.train_prefs import (LinearTokenLoss, build_items, cached_reference, preference_step, reference_logps,
                               REFERENCE_FILE)

runner = CliRunner()
SYSTEM = {"role": "system", "content": "Eres el asistente de la panadería La Forja, en Villaferro."}
PAIRS = [
    ("Hola", "Buenos días.", "Hello there."),
    ("¿Horario?", "De 7 a 14.", "No lo sé."),
    ("¿Dónde estáis?", "Calle Yunque 12.", "Somewhere."),
    ("¿Precio del pan?", "Dos euros.", "Free."),
]


def pair_rows(system: bool = True) -> list[dict]:
    prompt = lambda q: [SYSTEM, {"role": "user", "content": q}] if system else [{"role": "user", "content": q}]  # noqa: E731
    return [{"prompt": prompt(q), "chosen": c, "rejected": r} for q, c, r in PAIRS]


def rated_rows() -> list[dict]:
    return [{"prompt": row["prompt"], "completion": row[key], "label": key == "chosen"}
            for row in pair_rows() for key in ("chosen", "rejected")][:7]  # one more bad than good: unbalanced


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def plain_logp(model, example) -> torch.Tensor:
    """The answer's summed log-probability from the whole logits of a forward over the example alone."""
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    labels = torch.tensor(example.labels[1:])
    keep = labels != IGNORE
    return logits.log_softmax(-1)[keep].gather(1, labels[keep][:, None]).sum()


def plain_loss(objective, model, items, ref_model_logp, config):
    """The objective written out from the papers (as TRL computes it; ORPO's odds term by TRL's own function)."""
    if objective in ("dpo", "orpo"):
        chosen = torch.stack([plain_logp(model, it.answers[0]) for it in items])
        rejected = torch.stack([plain_logp(model, it.answers[1]) for it in items])
        if objective == "dpo":
            ref_c = torch.stack([ref_model_logp(it.answers[0]) for it in items])
            ref_r = torch.stack([ref_model_logp(it.answers[1]) for it in items])
            return -F.logsigmoid(config.beta * ((chosen - ref_c) - (rejected - ref_r))).mean()
        lengths_c = torch.tensor([float(it.answers[0].trained_tokens) for it in items])
        lengths_r = torch.tensor([float(it.answers[1].trained_tokens) for it in items])
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

        trl = SimpleNamespace(beta=config.orpo_lambda, accelerator=SimpleNamespace(device="cpu"))
        odds, *_ = ORPOTrainer.odds_ratio_loss(trl, chosen / lengths_c, rejected / lengths_r)
        return -chosen.sum() / lengths_c.sum() - odds.mean()
    logps = torch.stack([plain_logp(model, it.answers[0]) for it in items])
    refs = torch.stack([ref_model_logp(it.answers[0]) for it in items])
    with torch.no_grad():
        kl = torch.stack([plain_logp(model, it.kl) - ref_model_logp(it.kl) for it in items]).mean().clamp(min=0)
    good = torch.tensor([it.label for it in items])
    ratio = logps - refs
    losses = torch.cat([config.kto_desirable_weight * (1 - torch.sigmoid(config.beta * (ratio[good] - kl))),
                        config.kto_undesirable_weight * (1 - torch.sigmoid(config.beta * (kl - ratio[~good])))])
    return losses.mean()


@pytest.mark.parametrize("objective, method", [("dpo", "full"), ("kto", "full"), ("orpo", "full"), ("dpo", "lora"),
                                               ("kto", "lora")])
def test_dpo_kto_and_orpo_losses_and_gradients_equal_the_plain_formulas_on_the_tiny_model(
        tiny_model_dir, tokenizer, objective, method):
    """Packed pairs (their prompt shared), the chunked per-token head and the cached reference give the loss and
    every gradient of the losses written out on whole logits, each answer alone; LoRA's reference is the model
    with its adapter disabled (checked against the base model after the adapter moved)."""
    settings = load_settings()
    config = TrainSettings(method=method, objective=objective, beta=0.5, kto_desirable_weight=1.3,
                           kto_undesirable_weight=0.7, orpo_lambda=0.4, micro_batch_tokens=96, lora_r=4)
    rows = rated_rows() if objective == "kto" else pair_rows()
    items, too_long = build_items(tokenizer, rows, objective, 256)
    assert len(items) == len(rows) and not too_long
    torch.manual_seed(0)
    model = prepare_model(load(str(tiny_model_dir), settings, dtype="float32"), config, 256)
    base = load(str(tiny_model_dir), settings, dtype="float32").model.eval()
    if method == "full":  # the reference: these initial weights, which the step below moves away from
        reference = reference_logps(model, items, config.micro_batch_tokens, "cpu", torch.autocast("cpu", enabled=False))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    else:  # a trained adapter: the reference must still be the base model
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        reference = reference_logps(model, items, config.micro_batch_tokens, "cpu", torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        by_example = {id(e): plain_logp(base, e) for it in items for e in [*it.answers, it.kl] if e is not None}
    for i, it in enumerate(items):
        for slot, e in enumerate([*it.answers, *([None] * (2 - len(it.answers))), it.kl]):
            if e is not None:
                assert reference[i, slot].item() == pytest.approx(by_example[id(e)].item(), abs=1e-4)

    model.eval()  # no dropout in either computation; gradients still flow
    trained = [p for p in model.parameters() if p.requires_grad]
    record = preference_step(model, items, list(range(len(items))), reference, config, "cpu",
                             torch.autocast("cpu", enabled=False))
    got = [p.grad.clone() for p in trained]
    for p in trained:
        p.grad = None
    expected = plain_loss(objective, model, items, lambda e: by_example[id(e)], config)
    expected.backward()
    assert record["preference_loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4) for g, p in zip(got, trained))
    assert any(g.abs().sum() > 0 for g in got)
    assert {"chosen_logps", "rejected_logps", "reward_margin", "reward_accuracy"} <= record.keys()


@pytest.mark.parametrize("trained_head", [False, True])
def test_chunked_per_token_loss_equals_the_plain_one_with_any_weights_on_each_row(trained_head):
    torch.manual_seed(0)
    hidden = torch.randn(75, 24, requires_grad=True)
    weight = torch.randn(300, 24, requires_grad=trained_head)
    targets = torch.randint(0, 300, (75,))
    scale = torch.randn(75)
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (plain * scale).sum().backward()
    expected = hidden.grad.clone(), weight.grad.clone() if trained_head else None
    hidden.grad = weight.grad = None
    chunked = LinearTokenLoss.apply(hidden, weight, targets)
    (chunked * scale).sum().backward()
    assert torch.allclose(chunked, plain, atol=1e-5)
    assert torch.allclose(hidden.grad, expected[0], atol=1e-5)
    if trained_head:
        assert torch.allclose(weight.grad, expected[1], atol=1e-4)


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo"])
def test_the_tiny_model_learns_a_preference_through_forja_train(tiny_model_dir, tmp_path, method):
    """`forja train --method X` widens the margin between the chosen and the rejected answers' log-probabilities;
    metrics, plot and version are those of a supervised run."""
    data = write_rows(tmp_path / "prefs.jsonl", rated_rows() if method == "kto" else pair_rows())
    result = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--method", method,
                                 "--name", f"pref-{method}", "--max-steps", "30", "--learning-rate", "3e-3",
                                 "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    settings = load_settings()
    version = settings.versions_dir / f"pref-{method}"
    meta = json.loads((version / "version.json").read_text())
    assert meta["objective"] == method and meta["method"] == "lora"
    history = [json.loads(line) for line in (version / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in history if "loss" in r]
    assert len(steps) == 30 and all({"reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"} <= r.keys()
                                    for r in steps)
    gap = lambda r: r["chosen_logps"] - r["rejected_logps"]  # noqa: E731
    first, last = steps[0], steps[-1]
    # ORPO's reward is orpo_lambda times the per-token mean log-probability: a tenth of the scale
    assert last["reward_margin"] > first["reward_margin"] + (0.05 if method == "orpo" else 0.1)
    if method != "kto":  # a pair's two answers; KTO's good and bad rows differ in count and length
        assert gap(last) > gap(first) + 1.0
    assert last["reward_accuracy"] >= 0.75
    assert meta["metrics"]["reward_accuracy"] == last["reward_accuracy"]
    assert (version / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_supervised_run_with_preference_rows_trains_both_in_one_run(tiny_model_dir, tmp_path):
    """The default objective trains conversations word for word and preference rows with their own losses."""
    files = [write_rows(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "¿Abrís el domingo?"},
                                                               {"role": "assistant", "content": "No."}]}]),
             write_rows(tmp_path / "pairs.jsonl", pair_rows()[:2]), write_rows(tmp_path / "rated.jsonl", rated_rows()[:2])]
    settings = load_settings()
    run = new_run(settings, files, "mixed", str(tiny_model_dir),
                  tiny_config(method="lora", max_steps=3, batch_size=5, learning_rate=1e-3))
    train(settings, run, progress=False)
    steps = [r for r in map(json.loads, (settings.versions_dir / "mixed" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["sft_loss"] + r["preference_loss"]) for r in steps)
    assert "kl" in steps[0]
    assert final_metrics(settings, "mixed")["preference_items"] == {"pairs": 2, "rated_good": 1, "rated_bad": 1}


@pytest.mark.parametrize("args, message", [
    (["--method", "dpo"], "--method dpo trains on preference rows"),
    (["--method", "dpo", "--method", "nope"], "--method 'nope': expected lora or full"),
])
def test_preference_methods_on_the_wrong_data_fail_in_one_line(tiny_model_dir, tmp_path, args, message):
    data = write_rows(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "Hola"},
                                                             {"role": "assistant", "content": "Buenas."}]}])
    result = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--quiet", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_orpo_refuses_rated_rows_with_the_method_that_takes_them(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "rated.jsonl", rated_rows())
    result = runner.invoke(app, ["train", "--data", str(data), "--base", str(tiny_model_dir), "--method", "orpo", "--quiet"])
    assert result.exit_code != 0 and "train them with --method kto" in result.output


def test_dpo_resume_after_kill_9_reaches_the_same_step_and_loss(tiny_model_dir, tmp_path, forja_home):
    settings = load_settings()
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows())
    config = tiny_config(method="full", objective="dpo", max_steps=40, checkpoint_every=10, batch_size=2, seed=5,
                         learning_rate=1e-3)
    train(settings, new_run(settings, [data], "straight", str(tiny_model_dir), config), progress=False)

    (tmp_path / "forja.yaml").write_text(yaml.safe_dump({"train": config.model_dump()}))
    victim = forja_train_process(forja_home, "--data", str(data), "--base", str(tiny_model_dir), "--name", "killed",
                                 "--config", str(tmp_path / "forja.yaml"))
    wait_for(settings.runs_dir / "killed" / "checkpoints" / "step-000020" / "state.pt", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (settings.versions_dir / "killed").exists()
    assert (settings.runs_dir / "killed" / REFERENCE_FILE).is_file()  # the initial weights' log-probabilities

    train(settings, open_run(settings, "killed"), progress=False)
    straight, resumed = final_metrics(settings, "straight"), final_metrics(settings, "killed")
    assert straight["step"] == resumed["step"] == 40
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-4, abs=1e-5)
    assert resumed["reward_margin"] == pytest.approx(straight["reward_margin"], rel=1e-3, abs=1e-4)


def test_the_reference_is_computed_once_and_read_back(tiny_model_dir, tokenizer, tmp_path):
    settings = load_settings()
    config = TrainSettings(objective="dpo")
    items, _ = build_items(tokenizer, pair_rows(), "dpo", 256)
    model = prepare_model(load(str(tiny_model_dir), settings, dtype="float32"), config, 256)
    off = torch.autocast("cpu", enabled=False)
    first = cached_reference(tmp_path / REFERENCE_FILE, model, items, 256, "cpu", off)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a later reading must not see these weights
    assert torch.allclose(cached_reference(tmp_path / REFERENCE_FILE, model, items, 256, "cpu", off), first, equal_nan=True)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_bench_train_runs_forja_and_trls_preference_trainer_on_the_same_rows(tiny_model_dir, method):
    from forja.bench_train import preference_benchmark, render_preferences

    report = preference_benchmark(str(tiny_model_dir), None, 2, 256, method, log=lambda line: None)
    forja, trl = report["sides"]["forja"], report["sides"]["trl"]
    assert forja["optimizer_steps"] == trl["optimizer_steps"] == 2 and report["rows"] == 8
    assert all(side["tokens_per_second"] > 0 and side["peak_rss_mb"] > 50 and len(side["losses"]) == 2
               for side in (forja, trl))
    # the same loss at the first step: both start from the reference, DPO's log 2, KTO's 0.5 per row
    assert forja["losses"][0] == pytest.approx(trl["losses"][0], abs=0.02)
    text = render_preferences(report)
    assert f"TRL {'DPOTrainer' if method == 'dpo' else 'KTOTrainer'}, LoRA" in text and "forja / TRL:" in text


def test_a_text_prompt_in_a_file_taken_as_it_is_is_one_user_turn_after_the_system_prompt():
    from forja.train import row_with_system

    row = row_with_system({"prompt": "Hola", "chosen": "Buenas.", "rejected": "Hi."}, "Sé breve.")
    assert row["prompt"] == [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "Hola"}]
