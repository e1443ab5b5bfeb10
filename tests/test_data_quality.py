"""Tests for the quality report of `forja data inspect` (forja.data.quality) and `prepare --redact`, on files
written here."""

from __future__ import annotations

import json
import random

from test_data import read_jsonl, write
from typer.testing import CliRunner

from forja.cli import app
from forja.data import inspect, prepare
from forja.data.quality import near_duplicates, trigrams

runner = CliRunner()

FAQ = """question,answer
¿Abrís los lunes?,"No, los lunes cerramos."
¿Abren los lunes?,"No, el lunes está cerrado."
¿Abrís los martes?,"Sí, de nueve a dos."
¿Cuánto cuesta el envío?,El envío cuesta 4 euros en toda la provincia de Zaragoza.
What time do you open?,We open at nine every weekday.
¿Dónde estáis?,"Estamos en la calle Mayor 3, Zaragoza."
Quiero devolver un pedido,"Escríbenos a tienda@example.com o al +54 9 341 555 0192 con tu DNI 30.123.456 y te explicamos cómo devolverlo paso a paso: primero guarda el ticket, después empaqueta el producto en su caja original con todos los accesorios, y por último llévalo a la tienda o pide la recogida a domicilio, que cuesta 3 euros y tarda dos días laborables en toda la provincia."
Bom dia,Olá
"""


def test_the_quality_report_finds_near_duplicates_lengths_languages_pii_context_and_shares(tmp_path):
    faq = write(tmp_path / "faq.csv", FAQ)
    notes = write(tmp_path / "notes.md", "El horno se enciende con el mando de la derecha y tarda diez minutos.")
    report = inspect([faq, notes], context=40)
    quality = report.quality
    assert [(p.first, p.second) for p in quality.near_duplicates] == [(f"{faq}:2", f"{faq}:3")]  # not the martes one
    assert quality.long_answers == [(f"{faq}:8", 86)] and quality.short_answers == []
    assert {lang: len(rows) for lang, rows in quality.languages.items()} == {"es": 7, "en": 1, "other": 1}
    assert quality.languages["other"] == [f"{faq}:9"]
    assert quality.pii == {"email": [f"{faq}:8"], "phone": [f"{faq}:8"], "national_id": [f"{faq}:8"]}
    assert quality.over_context == [(f"{faq}:8", 92)]
    assert [(path, rows) for path, rows, _ in quality.shares] == [(str(faq), 8), (str(notes), 1)]
    text = report.render()
    assert f'    {faq}:2 ~ {faq}:3 (0.61): "¿Abrís los lunes?" / "¿Abren los lunes?"' in text
    assert "  language per row: es 78% (7), en 11% (1), other 11% (1)" in text
    assert "  personal data: 3 found in 1 rows (forja data prepare --redact replaces it)" in text
    assert "  conversations over the context of 40 tokens: 1" in text


def test_prefix_filtered_near_duplicates_equal_comparing_every_pair():
    rng = random.Random(0)
    words = "abrir lunes martes envío precio horno pan tienda hora casa".split()
    questions = [(str(i), " ".join(rng.choices(words, k=rng.randint(1, 4)))) for i in range(120)]
    found = {(p.first, p.second) for p in near_duplicates(questions)}
    every = set()
    for i, (a, qa) in enumerate(questions):
        for b, qb in questions[i + 1:]:
            x, y = trigrams(qa), trigrams(qb)
            if x and len(x & y) / len(x | y) >= 0.6:
                every.add((a, b))
    assert found == every and len(every) > 50


def test_prepare_redact_replaces_the_personal_data_and_says_how_many_rows(tmp_path):
    faq = write(tmp_path / "faq.csv", FAQ)
    summary = prepare(faq, tmp_path / "out.jsonl", redact=True, allow=["tienda@example.com"])
    rows = read_jsonl(summary.train_path)
    answer = rows[6]["messages"][1]["content"]
    assert answer.startswith("Escríbenos a tienda@example.com o al [PHONE] con tu DNI [NATIONAL_ID] y te")
    assert summary.redacted == 1 and "personal data redacted in 1 rows" in summary.render()
    assert json.loads(summary.meta_path.read_text())["redacted"] == 1
    plain = prepare(faq, tmp_path / "plain.jsonl")
    assert "30.123.456" in read_jsonl(plain.train_path)[6]["messages"][1]["content"]


def test_forja_data_inspect_html_writes_a_self_contained_page(tmp_path, forja_home):
    faq = write(tmp_path / "faq.csv", FAQ)
    page = tmp_path / "report" / "quality.html"
    result = runner.invoke(app, ["data", "inspect", str(faq), "--estimate", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "Quality:" in result.output and f"wrote {page}" in result.output
    html = page.read_text(encoding="utf-8")
    assert html.count("<rect") == 3 and "<script" not in html and "http" not in html.replace('lang="en"', "")
    assert "¿Abren los lunes?" in html and "national_id" in html
    redacted = runner.invoke(app, ["data", "prepare", str(faq), "--out", str(tmp_path / "o.jsonl"), "--redact",
                                   "--estimate"])
    assert redacted.exit_code == 0 and "personal data redacted in 1 rows" in redacted.output
