"""Tests for `forja data synth` (forja/synth.py): question–answer pairs from a document written here, by a
scripted engine (the drop logic, exactly), by the tiny random model through the real engine and grammar
(shape and counts), and by the bundled model (slow); paraphrases of a FAQ's questions."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from test_data import read_jsonl, write
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.data import inspect, prepare
from forja.engine import Delta, Engine, SamplingParams, Stream, Usage
from forja.synth import SUPPORT_OVERLAP, check_pair, support, synth

runner = CliRunner()

DOC = """# Panadería Sol

Horneamos pan de centeno los martes y los jueves. La hogaza de centeno cuesta 3 euros.

## Envíos

Enviamos a toda la provincia de Zaragoza en 24 horas; el envío cuesta 4 euros.
"""


class ScriptedEngine(Engine):
    """Answers each prompt with the text of the first key found in its last message."""

    name = "scripted"
    backend = "scripted"
    context_length = 4096

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers, self.prompts = tokenizer, answers, []
        self.eos_token_ids = {tokenizer.eos_token_id}

    def tokenize(self, prompt) -> list[int]:
        return [0] * len(json.dumps(prompt))

    def submit(self, prompt, params: SamplingParams) -> Stream:
        self.prompts.append(prompt)
        assert params.grammar is not None  # the output is always constrained
        text = next((a for key, a in self.answers.items() if key in prompt[-1]["content"]), "{}")

        class Scripted(Stream):
            async def __aiter__(self):
                yield Delta(text=text)
                await asyncio.sleep(0)
                yield Delta(finish_reason="stop", usage=Usage(10, 10))

            def cancel(self):
                pass

        return Scripted()


def pairs(*items: tuple[str, str]) -> str:
    return json.dumps({"pairs": [{"question": q, "answer": a} for q, a in items]}, ensure_ascii=False)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_support_is_the_share_of_the_answers_content_words_in_the_chunk():
    chunk = "La hogaza de centeno cuesta 3 euros."
    assert support("Cuesta 3 euros.", chunk) == 1.0
    assert support("La hogaza cuesta 5 euros", chunk) == 3 / 4  # "5" is not in the chunk
    assert support("Abrimos los domingos por la tarde", chunk) == 0.0
    assert check_pair("¿Cuánto cuesta?", "3 euros", chunk, set()) is None
    assert check_pair("¿Cuánto cuesta?", "Unos 12 dólares americanos", chunk, set()) == "unsupported"
    assert check_pair("¿Cuánto cuesta?", "3 euros", chunk, {"cuanto cuesta"}) == "duplicate"
    assert check_pair("¿?", "3 euros", chunk, set()) == "empty"
    looping = "La hogaza de centeno cuesta 3 euros. La hogaza de centeno cuesta 3 euros."
    assert support(looping, chunk) == 1.0 and check_pair("¿Precio?", looping, chunk, set()) == "repetitive"


def test_synth_keeps_supported_pairs_and_drops_and_counts_the_rest(tmp_path, tokenizer):
    doc = write(tmp_path / "panaderia.md", DOC)
    engine = ScriptedEngine(tokenizer, {
        "centeno": pairs(("¿Qué días hacéis pan de centeno?", "Los martes y los jueves."),
                         ("¿Cuánto cuesta la hogaza de centeno?", "La hogaza de centeno cuesta 3 euros."),
                         ("¿Tenéis pan sin gluten?", "Sí, todos los días, elaborado con harina de arroz."),
                         ("¿Qué días hacéis pan de centeno?", "Martes y jueves.")),
        "Zaragoza": '{"pairs": [{"question": "¿Envi',  # cut short: not JSON
    })
    report = synth(load_settings(), [str(doc)], tmp_path / "qa.jsonl", engine=engine)
    assert (report.chunks, report.generated, report.kept) == (2, 4, 2)
    assert dict(report.dropped) == {"unsupported": 1, "duplicate": 1, "unparsed": 1}
    rows = read_jsonl(tmp_path / "qa.jsonl")
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": "¿Qué días hacéis pan de centeno?"},
         {"role": "assistant", "content": "Los martes y los jueves."}],
        [{"role": "user", "content": "¿Cuánto cuesta la hogaza de centeno?"},
         {"role": "assistant", "content": "La hogaza de centeno cuesta 3 euros."}],
    ]
    assert {r["source"] for r in rows} == {f"{doc}#1"} and all(r["support"] >= SUPPORT_OVERLAP for r in rows)
    assert "Horneamos pan de centeno" in rows[0]["chunk"]
    meta = json.loads((tmp_path / "qa.synth.json").read_text())
    assert (meta["kept"], meta["dropped"], meta["sources"]) == (2, dict(report.dropped), {f"{doc}#1": 2})
    assert "Section: Panadería Sol" in engine.prompts[0][-1]["content"]
    # ordinary dialogue data: prepare takes it and keeps where each row came from
    summary = prepare(tmp_path / "qa.jsonl", tmp_path / "train.jsonl")
    assert summary.kinds["dialogue"] == 2
    assert read_jsonl(summary.train_path)[0]["source"] == f"{tmp_path / 'qa.jsonl'}:1 from {doc}#1"


def test_paraphrase_rewords_each_faq_question_and_keeps_its_answer(tmp_path, tokenizer):
    faq = write(tmp_path / "faq.csv", "question,answer\n¿Abrís los lunes?,\"No, los lunes cerramos.\"\n")
    engine = ScriptedEngine(tokenizer, {"lunes": json.dumps(
        {"questions": ["¿Abren los lunes?", "¿Está abierto el lunes?", "¿abrís los lunes"]})})
    report = synth(load_settings(), [str(faq)], tmp_path / "para.jsonl", paraphrase=3, engine=engine)
    rows = read_jsonl(tmp_path / "para.jsonl")
    assert [r["messages"][0]["content"] for r in rows] == ["¿Abren los lunes?", "¿Está abierto el lunes?"]
    assert all(r["messages"][1]["content"] == "No, los lunes cerramos." for r in rows)
    assert rows[0]["source"] == f"{faq}:2" and rows[0]["paraphrase_of"] == "¿Abrís los lunes?"
    assert (report.paraphrased, report.paraphrases, dict(report.paraphrases_dropped)) == (1, 2, {"duplicate": 1})


def test_bad_inputs_are_one_line_and_exit_non_zero(tmp_path):
    faq = write(tmp_path / "faq.csv", "question,answer\n¿Abrís?,No.\n")
    for args, message in (
        ([str(faq)], f"{faq}: the files hold conversations only; add --paraphrase N to reword their questions"),
        ([str(tmp_path / "nada.md")], f"{tmp_path / 'nada.md'}: no such file or folder"),
        ([], "no files given: name the documents"),
        ([str(write(tmp_path / "doc.md", DOC)), "--model", "nope"], "unknown model 'nope': not a bundled model"),
    ):
        result = runner.invoke(app, ["data", "synth", *args, "--out", str(tmp_path / "qa.jsonl")])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert message in result.output, result.output


def test_the_tiny_model_writes_json_the_grammar_allows_and_every_pair_is_counted(tmp_path, tiny_model_dir):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # room for the instructions and a chunk
    (model / "config.json").write_text(json.dumps(config))
    doc = write(tmp_path / "panaderia.md", DOC)
    result = runner.invoke(app, ["data", "synth", str(doc), "--out", str(tmp_path / "qa.jsonl"), "--model", str(model),
                                 "--backend", "pytorch", "--questions", "1", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "qa.synth.json").read_text())
    assert meta["chunks"] == 2 and meta["model"] == str(model)
    # random weights: whatever it wrote is dropped as cut short (unparsed), empty or unsupported, and counted
    assert meta["kept"] + sum(meta["dropped"].values()) - meta["dropped"].get("unparsed", 0) == meta["generated"]
    assert meta["generated"] + meta["dropped"].get("unparsed", 0) >= 2
    assert len(read_jsonl(tmp_path / "qa.jsonl")) == meta["kept"]
    assert "2 chunks → " in result.output


@pytest.mark.slow
def test_the_bundled_model_writes_pairs_its_chunks_support(tmp_path, bundled_home, monkeypatch):
    monkeypatch.setenv("FORJA_HOME", str(bundled_home))
    doc = write(tmp_path / "panaderia.md", DOC)
    report = synth(load_settings(), [str(doc)], tmp_path / "qa.jsonl")
    rows = read_jsonl(tmp_path / "qa.jsonl")
    assert report.chunks == 2 and report.generated >= 2 and len(rows) == report.kept
    assert all(support(r["messages"][1]["content"], r["chunk"]) >= SUPPORT_OVERLAP for r in rows)
    assert inspect(tmp_path / "qa.jsonl").files[0].kind == "dialogue" or not rows


HELD_BACK = ("¿Qué precio tiene el envío?", "El envío cuesta 4 euros.")  # answered by the document, not asked in the pairs


def test_training_on_synthesised_pairs_makes_a_held_back_answer_of_the_document_likelier(tmp_path, tokenizer,
                                                                                         tiny_model_dir):
    """Pairs made from the document (by a scripted engine) teach the tiny model its answer to a question the
    pairs do not ask, far more than as many pairs about something else do. Measured as the answer's mean
    log-probability per token: a random 2-layer model's greedy answer to a reworded question is a coin
    flip (README has the bundled model's greedy answers)."""
    import torch

    from forja.config import TrainSettings
    from forja.models import load
    from forja.train import new_run, train

    doc = write(tmp_path / "panaderia.md", DOC)
    engine = ScriptedEngine(tokenizer, {
        "centeno": pairs(("¿Qué días hacéis pan de centeno?", "Los martes y los jueves."),
                         ("¿Cuánto cuesta la hogaza de centeno?", "La hogaza de centeno cuesta 3 euros.")),
        "Zaragoza": pairs(("¿Cuánto cuesta enviar un pedido?", "El envío cuesta 4 euros."),
                          ("¿Enviáis a toda la provincia?", "Enviamos a toda la provincia de Zaragoza en 24 horas.")),
    })
    settings = load_settings()
    report = synth(settings, [str(doc)], tmp_path / "qa.jsonl", engine=engine)
    assert report.kept == 4 and HELD_BACK[0] not in (tmp_path / "qa.jsonl").read_text()
    other = write(tmp_path / "other.jsonl", "".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n" for q, a in [
        ("¿Dónde está la tienda?", "En la calle Mayor 3."), ("¿Tenéis aparcamiento?", "Sí, detrás del local."),
        ("¿Aceptáis tarjeta?", "Sí, y también Bizum."), ("¿Hacéis tartas?", "Por encargo, con dos días.")]))

    def likelihood(model: str) -> float:
        loaded = load(model, settings, dtype="float32")
        prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": HELD_BACK[0]}],
                                                      add_generation_prompt=True, tokenize=False)
        ids = loaded.tokenizer(prompt + HELD_BACK[1], add_special_tokens=False, return_tensors="pt").input_ids
        start = len(loaded.tokenizer(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = loaded.model(ids).logits[0, start - 1 : -1].log_softmax(-1)
        return float(logits.gather(1, ids[0, start:, None]).mean())

    config = TrainSettings(method="full", learning_rate=3e-3, batch_size=4, max_steps=40, eval_every=None,
                           checkpoint_every=None, seed=0, warmup_ratio=0.0, lr_scheduler="constant",
                           precision="float32", stop_when_learned=False)
    trained = {name: likelihood(train(settings, new_run(settings, [path], name, str(tiny_model_dir), config),
                                      progress=False).name)
               for name, path in (("synth", tmp_path / "qa.jsonl"), ("control", other))}
    before = likelihood(str(tiny_model_dir))
    assert trained["synth"] > before + 3.0, (before, trained)  # -6.1 → -1.3 nats per token, measured
    assert trained["synth"] > trained["control"] + 1.5, (before, trained)  # the control: -6.7
