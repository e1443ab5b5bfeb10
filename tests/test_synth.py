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
