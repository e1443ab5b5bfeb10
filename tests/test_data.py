"""Tests for forja.data: every format on real files, the one-line errors, cleaning, split and hash."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import pdf_pages_bytes

from forja.data import (DIALOGUE, KNOWLEDGE, NO_TEXT_LAYER, DataError, ReadOptions, inspect, meta_path, prepare,
                        validation_path)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


class WordTokenizer:
    """Stands in for a transformers tokenizer: a token per word and per punctuation mark."""

    name_or_path = "word-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


# --- Writing real files ------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_bytes(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_xlsx(path: Path, sheets: dict[str, list[list]]) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
    book.save(path)
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    return path


def write_docx(path: Path, paragraphs: list[str], table: list[list[str]] | None = None) -> Path:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, cells in enumerate(table):
            for c, text in enumerate(cells):
                grid.cell(r, c).text = text
    document.save(path)
    return path


def pdf_bytes(*lines: str) -> bytes:
    """A minimal valid one-page PDF showing `lines` in Helvetica (ASCII only), written by hand."""
    return pdf_pages_bytes(list(lines))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pair(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def prepared_rows(tmp_path: Path, *paths: Path, **options) -> list[dict]:
    """All rows `prepare` writes (training then validation), without their source."""
    out = tmp_path / "out" / "data.jsonl"
    prepare(list(paths), out, val_fraction=0, **options)
    return [{k: v for k, v in row.items() if k != "source"} for row in read_jsonl(out)]


def error_of(call) -> str:
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- Every format detected ---------------------------------------------------------------------------

QUESTION, ANSWER = "¿Abrís los lunes?", "No, los lunes cerramos."
SYSTEM = {"role": "system", "content": "Sé breve."}
SHAREGPT = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]

FORMATS = {
    "csv question/answer": (
        lambda d: write(d / "faq.csv", f'Question , Answer\n{QUESTION},"{ANSWER}"\n'),
        "CSV", "question/answer", {"messages": pair(QUESTION, ANSWER)},
    ),
    "csv with semicolons, Spanish columns": (
        lambda d: write(d / "faq.csv", f"pregunta;respuesta\n{QUESTION};{ANSWER}\n"),
        "CSV", "pregunta/respuesta", {"messages": pair(QUESTION, ANSWER)},
    ),
    "tsv prompt/response": (
        lambda d: write(d / "faq.tsv", f"prompt\tresponse\n{QUESTION}\t{ANSWER}\n"),
        "TSV", "prompt/response", {"messages": pair(QUESTION, ANSWER)},
    ),
    "json alpaca": (
        lambda d: write(d / "a.json", json.dumps([{"instruction": "Traduce", "input": "pan", "output": "bread"}])),
        "JSON", "alpaca", {"messages": pair("Traduce\n\npan", "bread")},
    ),
    "jsonl openai messages": (
        lambda d: write_jsonl(d / "chat.jsonl", [{"messages": [SYSTEM, *pair(QUESTION, ANSWER)]}]),
        "JSONL", "messages", {"messages": [SYSTEM, *pair(QUESTION, ANSWER)]},
    ),
    "jsonl sharegpt": (
        lambda d: write_jsonl(d / "share.jsonl", [{"conversations": SHAREGPT}]),
        "JSONL", "sharegpt", {"messages": pair(QUESTION, ANSWER)},
    ),
    "jsonl prompt/completion": (
        lambda d: write_jsonl(d / "c.jsonl", [{"prompt": QUESTION, "completion": ANSWER}]),
        "JSONL", "prompt/completion", {"messages": pair(QUESTION, ANSWER)},
    ),
    "xlsx pregunta/respuesta": (
        lambda d: write_xlsx(d / "faq.xlsx", {"FAQ": [["Pregunta", "Respuesta"], [QUESTION, ANSWER]]}),
        "Excel", "pregunta/respuesta", {"messages": pair(QUESTION, ANSWER)},
    ),
    "parquet messages": (
        lambda d: write_parquet(d / "chat.parquet", {"messages": [pair(QUESTION, ANSWER)]}),
        "Parquet", "messages", {"messages": pair(QUESTION, ANSWER)},
    ),
    "parquet text": (
        lambda d: write_parquet(d / "notes.parquet", {"text": ["El horno se enciende a las cuatro."]}),
        "Parquet", "text", {"text": "El horno se enciende a las cuatro."},
    ),
    "txt transcript": (
        lambda d: write(d / "soporte.txt", f"Usuario: {QUESTION}\nAsistente: {ANSWER}\n"),
        "text", "transcript", {"messages": pair(QUESTION, ANSWER)},
    ),
    "txt document": (
        lambda d: write(d / "notes.txt", "El horno   se enciende\n\n\n\na las cuatro.  \n"),
        "text", "document", {"text": "El horno se enciende\n\na las cuatro."},
    ),
    "md document": (
        lambda d: write(d / "manual.md", "# Manual\n\nEl horno es de leña.\n"),
        "Markdown", "document", {"text": "# Manual\n\nEl horno es de leña."},
    ),
    "pdf document": (
        lambda d: write_bytes(d / "manual.pdf", pdf_bytes("The oven is lit at four.")),
        "PDF", "document", {"text": "The oven is lit at four."},
    ),
    "docx document with a table": (
        lambda d: write_docx(
            d / "manual.docx", ["El horno es de leña.", "", "Se enciende a las cuatro."], [["Barra", "1,10 €"]]
        ),
        "Word", "document", {"text": "El horno es de leña.\n\nSe enciende a las cuatro.\n\nBarra | 1,10 €"},
    ),
}


@pytest.mark.parametrize("case", list(FORMATS))
def test_every_format_is_detected_and_normalised(tmp_path, case):
    build, container, format_name, expected_row = FORMATS[case]
    (tmp_path / "in").mkdir()
    path = build(tmp_path / "in")
    (report,) = inspect(path).files
    assert report.error is None
    assert (report.container, report.format) == (container, format_name)
    assert report.kind == (DIALOGUE if "messages" in expected_row else KNOWLEDGE)
    assert report.rows == 1
    assert prepared_rows(tmp_path, path) == [expected_row]


def test_a_json_file_may_hold_one_conversation(tmp_path):
    path = write(tmp_path / "one.json", json.dumps({"messages": pair(QUESTION, ANSWER)}))
    assert prepared_rows(tmp_path, path) == [{"messages": pair(QUESTION, ANSWER)}]


def test_a_messages_column_in_a_csv_may_hold_json(tmp_path):
    cell = json.dumps(pair(QUESTION, ANSWER), ensure_ascii=False).replace('"', '""')
    path = write(tmp_path / "chat.csv", f'messages\n"{cell}"\n')
    assert prepared_rows(tmp_path, path) == [{"messages": pair(QUESTION, ANSWER)}]


def test_openai_content_parts_are_joined(tmp_path):
    turns = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": ANSWER},
    ]
    path = write_jsonl(tmp_path / "parts.jsonl", [{"messages": turns}])
    assert prepared_rows(tmp_path, path) == [{"messages": pair(QUESTION, ANSWER)}]


# --- Transcripts -------------------------------------------------------------------------------------

TRANSCRIPT = """\
# Ejemplos del mostrador

Usuario: ¿Qué lleva la hogaza?
Asistente: Solo esto:
- harina,
- agua y sal.

No lleva huevo.
Usuario: ¿Cuánto pesa?
Asistente: Un kilo.
---
User: Do you deliver?
Assistant: Yes, in the mornings.
"""


def test_transcript_turns_stay_paired_and_multi_line_turns_whole(tmp_path):
    path = write(tmp_path / "soporte.txt", TRANSCRIPT)
    rows = read_jsonl(prepare(path, tmp_path / "out.jsonl", val_fraction=0).train_path)
    assert [row["messages"] for row in rows] == [
        [
            {"role": "user", "content": "¿Qué lleva la hogaza?"},
            {"role": "assistant", "content": "Solo esto:\n- harina,\n- agua y sal.\n\nNo lleva huevo."},
            {"role": "user", "content": "¿Cuánto pesa?"},
            {"role": "assistant", "content": "Un kilo."},
        ],
        pair("Do you deliver?", "Yes, in the mornings."),
    ]
    assert [row["source"] for row in rows] == [f"{path}:3", f"{path}:12"]


def test_transcript_must_end_with_the_assistant(tmp_path):
    path = write(tmp_path / "soporte.txt", "Usuario: Hola\nAsistente: Hola.\nUsuario: ¿Y el pan?\n")
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f"{path} line 3: the last turn is the user's; it must be the assistant's, which the model learns "
        "(use --skip-bad to skip such rows)"
    )


def test_transcript_turns_must_alternate(tmp_path):
    path = write(tmp_path / "soporte.txt", "User: Hi\nUser: Anyone?\nAssistant: Hello.\n")
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(
        f"{path} line 2: user turn where the assistant's belongs"
    )


def test_text_outside_a_turn_is_a_bad_row(tmp_path):
    path = write(
        tmp_path / "soporte.txt", "User: Hi\nAssistant: Hello.\n---\nstray words\nUser: Bye\nAssistant: Bye.\n"
    )
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(f"{path} line 4: text outside a turn")
    summary = prepare(path, tmp_path / "out.jsonl", val_fraction=0, skip_bad=True)
    assert summary.train_rows == 2 and len(summary.skipped) == 1


# --- Errors name the file, the row and the field -----------------------------------------------------


def test_csv_row_is_the_line_it_starts_on(tmp_path):
    path = write(
        tmp_path / "faq.csv",
        'question,answer\n"¿Qué lleva\nla hogaza?",Harina.\n\n¿Abrís?,\n',  # line 2-3: one row; line 4 blank
    )
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f'{path} row 5: column "answer" is empty (use --skip-bad to skip such rows)'
    )


def test_csv_row_with_too_many_cells(tmp_path):
    path = write(tmp_path / "faq.csv", "question,answer\n¿Abrís?,No, los lunes no\n")
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(
        f"{path} row 2: 3 cells but the header has 2 columns"
    )


def test_csv_unclosed_quote(tmp_path):
    path = write(tmp_path / "faq.csv", 'question,answer\nA,B\n"¿Abrís?,No\n')
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(f"{path} row 3: cannot read as CSV")


def test_jsonl_row_is_the_line_number(tmp_path):
    path = write(tmp_path / "faq.jsonl", '{"question": "a", "answer": "b"}\n\n{"question": "c"}\n')
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f'{path} row 3: field "answer" is missing (use --skip-bad to skip such rows)'
    )


def test_json_row_is_the_item_number(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "  "}]
    path = write(tmp_path / "faq.json", json.dumps(rows))
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f'{path} row 2: field "response" is empty (use --skip-bad to skip such rows)'
    )


def test_excel_row_is_the_sheet_row(tmp_path):
    path = write_xlsx(tmp_path / "faq.xlsx", {"FAQ": [[], ["question", "answer"], ["a", "b"], ["c", None]]})
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f'{path} row 4: column "answer" is empty (use --skip-bad to skip such rows)'
    )


def test_excel_with_several_sheets_names_the_sheet(tmp_path):
    path = write_xlsx(
        tmp_path / "faq.xlsx",
        {"Pan": [["question", "answer"], ["a", "b"]], "Tartas": [["question", "answer"], ["c", "d"], ["", "e"]]},
    )
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(
        f'{path} sheet "Tartas" row 3: column "question" is empty'
    )


def test_parquet_row_is_the_record_number(tmp_path):
    path = write_parquet(tmp_path / "notes.parquet", {"text": ["uno", None]})
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f'{path} row 2: column "text" is empty (use --skip-bad to skip such rows)'
    )


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        (pair("a", "b") + [{"role": "user", "content": "c"}],
         '"messages" turn 3: the last turn is the user\'s; it must be the assistant\'s'),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         '"messages" turn 2: user turn where the assistant\'s belongs'),
        ([{"role": "assistant", "content": "a"}], '"messages" turn 1: assistant turn where the user\'s belongs'),
        ([{"role": "bot", "content": "a"}],
         '"messages" turn 1: "role" is "bot", expected one of system, user, assistant'),
        (pair("a", " "), '"messages" turn 2: "content" is empty'),
        ([{"role": "system", "content": "Sé breve."}], '"messages" has no user or assistant turn'),
        ([], '"messages" has no user or assistant turn'),
        ("not a list", '"messages" is not a JSON list of turns'),
    ],
)
def test_bad_conversations_name_the_row_and_turn(tmp_path, turns, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": pair("q", "a")}, {"messages": turns}])
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(f"{path} row 2: {problem}")


def test_empty_system_turns_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": ""}, *pair("q", "a")]}])
    assert prepared_rows(tmp_path, path) == [{"messages": pair("q", "a")}]


def test_forja_data_prepare_system_puts_the_system_turn_in_each_conversation_without_one(tmp_path):
    from typer.testing import CliRunner

    from forja.cli import app

    faq = write(tmp_path / "faq.csv", "question,answer\n¿Abrís?,Sí.\n¿Cuándo?,De 7 a 14 h.\n")
    own = write_jsonl(tmp_path / "own.jsonl", [{"messages": [{"role": "system", "content": "Mío."}, *pair("q", "a")]}])
    doc = write(tmp_path / "manual.md", "La panadería abre a las siete.")
    out = tmp_path / "out" / "data.jsonl"
    result = CliRunner().invoke(app, ["data", "prepare", str(faq), str(own), str(doc), "--out", str(out),
                                      "--system", "Eres el panadero.", "--val-fraction", "0", "--estimate"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    systems = sorted(row["messages"][0]["content"] for row in rows if "messages" in row)
    assert systems == ["Eres el panadero.", "Eres el panadero.", "Mío."]  # a row's own system turn stays
    assert [row["text"] for row in rows if "text" in row] == ["La panadería abre a las siete."]
    assert json.loads(meta_path(out).read_text())["system"] == "Eres el panadero."
    with pytest.raises(DataError, match="the system prompt is empty"):
        prepare([faq], out, system=" ")


# --- Malformed and unknown files ---------------------------------------------------------------------


def test_invalid_jsonl_line(tmp_path):
    path = write(tmp_path / "chat.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": }\n')
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")) == (
        f"{path} row 2: invalid JSON (Expecting value at column 29) (use --skip-bad to skip such rows)"
    )


def test_invalid_json_file(tmp_path):
    path = write(tmp_path / "faq.json", '[\n  {"prompt": "a",\n   "response" "b"}\n]')
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(
        f"{path} line 3: invalid JSON (Expecting ':' delimiter"
    )


@pytest.mark.parametrize(
    ("name", "content", "start"),
    [
        ("faq.xlsx", b"PK\x03\x04 not really a workbook", "cannot read as an Excel .xlsx workbook ("),
        ("notes.parquet", b"PAR1 not really parquet PAR1", "cannot read as Parquet ("),
        ("manual.pdf", b"%PDF-1.4\nnot really a pdf", "cannot read as PDF ("),
        ("manual.docx", b"not a zip at all", "cannot read as a Word .docx document ("),
    ],
)
def test_corrupt_binary_files(tmp_path, name, content, start):
    path = tmp_path / name
    path.write_bytes(content)
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(f"{path}: {start}")
    assert inspect(path).files[0].error.startswith(f"{path}: {start}")


@pytest.mark.parametrize("name", ["faq.csv", "notes.txt", "chat.jsonl"])
def test_text_that_is_not_the_encoding_forced(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("question,answer\n¿Abrís?,Sí\n".encode("latin-1"))
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl", options=ReadOptions(encoding="utf-8"))) == (
        f"{path} line 2: not utf-8 text (byte 0xbf); give the file's encoding with --encoding, or leave it out to "
        "detect it"
    )


def test_unknown_columns_list_the_accepted_formats(tmp_path):
    path = write(tmp_path / "data.csv", "foo,bar\n1,2\n")
    message = error_of(lambda: prepare(path, tmp_path / "out.jsonl"))
    assert message.startswith(
        f"{path}: columns foo, bar match no known format; name yours with --map question=COLUMN,answer=COLUMN; "
        "accepted: .csv"
    )
    assert "question+answer" in message and "messages" in message and "Usuario:" in message


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "setup.exe"
    path.write_bytes(b"MZ\x90\x00")
    message = error_of(lambda: prepare(path, tmp_path / "out.jsonl"))
    assert message.startswith(f"{path}: unknown file type .exe; accepted: .csv .tsv .json .jsonl .xlsx")


def test_mixed_formats_in_one_file_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": pair("a", "b")}, {"question": "c", "answer": "d"}])
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl", skip_bad=True)) == (
        f"{path}: mixed formats (row 1 is messages, row 2 is question/answer); put each format in its own file"
    )


def test_columns_fitting_two_formats_are_refused(tmp_path):
    path = write(tmp_path / "faq.csv", "question,answer,text\na,b,c\n")
    assert error_of(lambda: prepare(path, tmp_path / "out.jsonl")).startswith(
        f"{path} header: the columns fit several formats (question/answer, text)"
    )


def test_a_pdf_without_text_is_a_bad_file(tmp_path):
    empty = tmp_path / "scan.pdf"
    empty.write_bytes(pdf_bytes())
    good = write(tmp_path / "notes.md", "El horno es de leña.")
    assert error_of(lambda: prepare(tmp_path, tmp_path / "out" / "data.jsonl")) == (
        f"{empty}: {NO_TEXT_LAYER} (use --skip-bad to skip such files)"
    )
    summary = prepare([empty, good], tmp_path / "out.jsonl", skip_bad=True)
    assert summary.skipped == [f"{empty}: {NO_TEXT_LAYER}"]
    assert summary.kinds == {DIALOGUE: 0, KNOWLEDGE: 1}


def test_missing_path(tmp_path):
    assert error_of(lambda: inspect(tmp_path / "nope")) == f"{tmp_path / 'nope'}: no such file or folder"


# --- skip_bad ----------------------------------------------------------------------------------------


def test_skip_bad_reports_bad_rows_and_keeps_the_rest(tmp_path):
    csv_path = write(tmp_path / "in" / "faq.csv", "question,answer\na,b\nc,\n,e\nf,g\n")
    jsonl_path = write(tmp_path / "in" / "more.jsonl", '{"prompt": "h", "response": "i"}\nnot json\n')
    summary = prepare(tmp_path / "in", tmp_path / "out.jsonl", val_fraction=0, skip_bad=True)
    assert summary.skipped == [
        f'{csv_path} row 3: column "answer" is empty',
        f'{csv_path} row 4: column "question" is empty',
        f"{jsonl_path} row 2: invalid JSON (Expecting value at column 1)",
    ]
    rows = read_jsonl(summary.train_path)
    assert [row["messages"] for row in rows] == [pair("a", "b"), pair("f", "g"), pair("h", "i")]
    assert [row["source"] for row in rows] == [f"{csv_path}:2", f"{csv_path}:5", f"{jsonl_path}:1"]
    assert json.loads(summary.meta_path.read_text())["skipped"] == summary.skipped


def test_inspect_reports_bad_rows_and_unreadable_files_without_raising(tmp_path):
    write(tmp_path / "faq.csv", "question,answer\na,b\nc,\n")
    (tmp_path / "book.xlsx").write_bytes(b"garbage")
    report = inspect(tmp_path)
    broken, faq = report.files  # sorted by path
    assert broken.error.startswith(f"{tmp_path / 'book.xlsx'}: cannot read")
    assert faq.bad_rows == [f'{tmp_path / "faq.csv"} row 3: column "answer" is empty'] and faq.empty_fields == 1
    text = report.render()
    assert "ERROR" in text and 'row 3: column "answer" is empty' in text and "unreadable files: 1" in text


# --- Cleaning and duplicates -------------------------------------------------------------------------


def test_whitespace_is_normalised_and_exact_duplicates_removed(tmp_path):
    messy = '"  ¿Abrís   los lunes? ","No,\tlos lunes\r\n\r\n\r\ncerramos.  "'
    write(tmp_path / "in" / "a.csv", f"question,answer\n{messy}\n")
    write_jsonl(tmp_path / "in" / "b.jsonl", [
        {"messages": pair("¿Abrís los lunes?", "No, los lunes\n\ncerramos.")},  # the same once cleaned
        {"messages": pair("¿Y los martes?", "Sí.")},
        {"messages": pair("¿Y los martes?", "Sí.")},
    ])
    report = inspect(tmp_path / "in")
    assert [f.duplicates for f in report.files] == [0, 2]
    summary = prepare(tmp_path / "in", tmp_path / "out.jsonl", val_fraction=0)
    assert summary.duplicates_removed == 2
    assert [row["messages"] for row in read_jsonl(summary.train_path)] == [
        pair("¿Abrís los lunes?", "No, los lunes\n\ncerramos."),
        pair("¿Y los martes?", "Sí."),
    ]


# --- Split and hash ----------------------------------------------------------------------------------


def faq_rows(n: int) -> str:
    return "question,answer\n" + "".join(f"Pregunta {i},Respuesta {i}\n" for i in range(n))


def test_split_is_reproducible_and_depends_on_the_seed(tmp_path):
    path = write(tmp_path / "faq.csv", faq_rows(40))

    def split(seed: int, name: str) -> tuple[str, str]:
        summary = prepare(path, tmp_path / name / "data.jsonl", val_fraction=0.25, seed=seed)
        assert (summary.train_rows, summary.val_rows) == (30, 10)
        return summary.train_path.read_text(), summary.val_path.read_text()

    assert split(1, "a") == split(1, "b")
    assert split(1, "a")[1] != split(2, "c")[1]


def test_split_follows_content_not_file_order(tmp_path):
    lines = faq_rows(30).splitlines(keepends=True)
    forward = write(tmp_path / "a" / "faq.csv", "".join(lines))
    backward = write(tmp_path / "b" / "faq.csv", lines[0] + "".join(reversed(lines[1:])))

    def validation(path: Path) -> list:
        summary = prepare(path, path.parent / "out.jsonl", val_fraction=0.2, seed=7)
        return sorted(json.dumps(row["messages"]) for row in read_jsonl(summary.val_path))

    assert validation(forward) == validation(backward)


def test_hash_is_stable_and_follows_content(tmp_path):
    write(tmp_path / "a" / "faq.csv", faq_rows(12))
    first = prepare(tmp_path / "a", tmp_path / "out1" / "data.jsonl", val_fraction=0.1, seed=3)
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere")  # same content in another folder
    second = prepare(tmp_path / "elsewhere", tmp_path / "out2" / "data.jsonl", val_fraction=0.1, seed=3)
    assert first.hash == second.hash and re.fullmatch(r"[0-9a-f]{64}", first.hash)
    meta = json.loads(first.meta_path.read_text())
    assert meta["hash"] == first.hash
    assert meta["train"] == {"path": "data.jsonl", "rows": 11}
    assert meta["validation"] == {"path": "data.val.jsonl", "rows": 1}
    assert meta["sources"][0]["format"] == "question/answer"

    write(tmp_path / "a" / "faq.csv", faq_rows(12).replace("Respuesta 5", "Respuesta cinco"))
    assert prepare(tmp_path / "a", tmp_path / "out3" / "data.jsonl", val_fraction=0.1, seed=3).hash != first.hash


def test_small_data_holds_no_row_out_by_default_and_says_so(tmp_path):
    small = prepare(write(tmp_path / "small" / "faq.csv", faq_rows(30)), tmp_path / "s" / "data.jsonl")
    assert (small.train_rows, small.val_rows, small.small_data) == (30, 0, True)
    assert "no row held out for validation: 30 rows is small data" in small.render()
    assert json.loads(small.meta_path.read_text())["small_data"] is True
    large = prepare(write(tmp_path / "large" / "faq.csv", faq_rows(400)), tmp_path / "l" / "data.jsonl")
    assert (large.train_rows, large.val_rows, large.small_data) == (360, 40, False)
    asked = prepare(tmp_path / "small", tmp_path / "a" / "data.jsonl", val_fraction=0.1)  # asked for: honoured
    assert (asked.train_rows, asked.val_rows, asked.small_data) == (27, 3, False)


def test_openai_weight_zero_marks_an_answer_as_context(tmp_path):
    turns = [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Mal.", "weight": 0},
             {"role": "user", "content": "¿Horario?"}, {"role": "assistant", "content": "De 9 a 14.", "weight": 1}]
    path = write(tmp_path / "chat.jsonl", json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    rows = read_jsonl(prepare(path, tmp_path / "out.jsonl").train_path)
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "Mal.", "weight": 0}
    assert "weight" not in rows[0]["messages"][3]
    for bad in ({"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "x", "weight": 0.5}):
        write(tmp_path / "bad.jsonl", json.dumps({"messages": [bad, turns[1]] if bad["role"] == "user" else [turns[0], bad]}) + "\n")
        with pytest.raises(DataError, match='"weight" must be 0 or 1 and only on assistant turns'):
            prepare(tmp_path / "bad.jsonl", tmp_path / "bad-out.jsonl")
    write(tmp_path / "none.jsonl", json.dumps({"messages": turns[:2]}) + "\n")
    with pytest.raises(DataError, match="every assistant turn has weight 0"):
        prepare(tmp_path / "none.jsonl", tmp_path / "none-out.jsonl")


def test_output_paths(tmp_path):
    out = tmp_path / "prepared" / "bakery.jsonl"
    assert validation_path(out) == tmp_path / "prepared" / "bakery.val.jsonl"
    assert meta_path(out) == tmp_path / "prepared" / "bakery.meta.json"


def test_preparing_into_the_data_folder_does_not_read_its_own_output(tmp_path):
    write(tmp_path / "faq.csv", faq_rows(10))
    first = prepare(tmp_path, tmp_path / "prepared.jsonl")
    again = prepare(tmp_path, tmp_path / "prepared.jsonl")
    assert again.hash == first.hash and len(again.files) == 1


# --- Folders, knowledge chunks and token counts ------------------------------------------------------


def test_folders_are_read_recursively_in_path_order_skipping_hidden_files(tmp_path):
    write(tmp_path / "data" / "knowledge" / "b.md", "Bee.")
    write(tmp_path / "data" / "dialogue" / "z.csv", "question,answer\nq,a\n")
    write(tmp_path / "data" / "a.txt", "Ay.")
    write(tmp_path / "data" / ".hidden" / "x.exe", "no")
    write(tmp_path / "data" / "~$book.xlsx", "lock file")
    report = inspect(tmp_path / "data")
    assert [Path(f.path).relative_to(tmp_path / "data").as_posix() for f in report.files] == [
        "a.txt", "dialogue/z.csv", "knowledge/b.md",
    ]


def long_document() -> str:
    sentences = [f"Sentence {i} tells fact number {i} about the bakery." for i in range(60)]
    paragraphs = [" ".join(sentences[i : i + 15]) for i in range(0, 60, 15)]  # longer than a chunk
    return "# Handbook\n\n" + "\n\n".join(paragraphs) + "\n"


def test_knowledge_is_chunked_within_the_limit_with_overlap(tmp_path):
    tokenizer = WordTokenizer()
    path = write(tmp_path / "manual.md", long_document())
    out = tmp_path / "out.jsonl"
    prepare(path, out, val_fraction=0, chunk_tokens=120, tokenizer=tokenizer)
    rows = read_jsonl(out)
    chunks = [row["text"] for row in rows]
    assert len(chunks) > 3
    assert all(len(tokenizer.encode(chunk)) <= 120 for chunk in chunks)
    assert [row["source"] for row in rows] == [f"{path}#{n}" for n in range(1, len(chunks) + 1)]
    # Nothing lost, chunks cut between sentences, and neighbours share a little text.
    for i in range(60):
        assert any(f"Sentence {i} tells fact number {i} about the bakery." in chunk for chunk in chunks)
    assert all(chunk.endswith(".") for chunk in chunks)
    assert any(a.split("\n\n")[-1].split(". ")[-1] in b for a, b in zip(chunks, chunks[1:]))


def test_chunks_end_at_paragraphs_when_they_can(tmp_path):
    paragraphs = [" ".join(f"Word{p}x{w}" for w in range(30)) + "." for p in range(4)]
    path = write(tmp_path / "notes.txt", "\n\n".join(paragraphs))
    chunks = [row["text"] for row in read_jsonl(
        prepare(path, tmp_path / "out.jsonl", val_fraction=0, chunk_tokens=80, tokenizer=WordTokenizer()).train_path
    )]
    assert chunks == ["\n\n".join(paragraphs[:2]), "\n\n".join(paragraphs[2:])]


def test_a_sentence_longer_than_a_chunk_is_cut_between_words(tmp_path):
    path = write(tmp_path / "notes.txt", " ".join(f"w{i}" for i in range(100)))
    chunks = [row["text"] for row in read_jsonl(
        prepare(path, tmp_path / "out.jsonl", val_fraction=0, chunk_tokens=30, tokenizer=WordTokenizer()).train_path
    )]
    assert all(len(chunk.split()) <= 30 for chunk in chunks)
    assert {word for chunk in chunks for word in chunk.split()} == {f"w{i}" for i in range(100)}


def test_text_column_rows_are_knowledge(tmp_path):
    path = write(tmp_path / "notes.csv", 'texto\n"El horno es de leña."\n"Se enciende a las cuatro."\n')
    assert prepared_rows(tmp_path, path) == [{"text": "El horno es de leña."}, {"text": "Se enciende a las cuatro."}]


def test_inspect_counts_tokens_with_a_tokenizer_or_says_it_estimates(tmp_path):
    path = write(tmp_path / "faq.csv", "question,answer\n¿Abrís hoy?,\"Sí, hasta las 20:00.\"\n")
    exact = inspect(path, tokenizer=WordTokenizer())
    assert exact.files[0].tokens == 4 + 8  # ¿ Abrís hoy ? / Sí , hasta las 20 : 00 .
    assert "word-tokenizer" in exact.token_unit
    estimated = inspect(path)
    assert estimated.files[0].tokens == 3 + 6  # ceil(2 words × 4/3) + ceil(4 × 4/3)
    assert "estimated" in estimated.token_unit and "no tokenizer" in estimated.token_unit
    assert "estimated" in estimated.render()


def test_report_render_has_a_histogram(tmp_path):
    path = write(tmp_path / "faq.csv", faq_rows(5))
    text = inspect(path).render()
    assert "question/answer → dialogue: 5 conversations, 10 turns" in text
    assert re.search(r"≤32 █+ +5$", text, re.MULTILINE)


# --- The shipped sample ------------------------------------------------------------------------------


def test_sample_data_prepares_without_errors(tmp_path):
    report = inspect(SAMPLE)
    assert not report.bad_rows and all(f.error is None for f in report.files)
    assert {Path(f.path).name: f.format for f in report.files} == {
        "faq_en.jsonl": "messages", "faq_es.csv": "question/answer",
        "soporte.txt": "transcript", "manual.md": "document",
    }
    summary = prepare(SAMPLE, tmp_path / "sample.jsonl")
    assert summary.skipped == [] and summary.duplicates_removed == 0
    assert summary.kinds[DIALOGUE] == 45 and summary.kinds[KNOWLEDGE] >= 1
    assert summary.train_rows + summary.val_rows == 45 + summary.kinds[KNOWLEDGE]
    assert "Wrote" in summary.render()


def test_empty_files_give_no_rows(tmp_path):
    write(tmp_path / "in" / "empty.jsonl", "\n")
    write(tmp_path / "in" / "header_only.csv", "question,answer\n")
    report = inspect(tmp_path / "in")
    assert [(f.format, f.rows, f.error) for f in report.files] == [("", 0, None), ("question/answer", 0, None)]
    assert error_of(lambda: prepare(tmp_path / "in", tmp_path / "out.jsonl")) == "no rows to write: the files are empty"


def test_a_jsonl_file_of_only_bad_lines_is_skipped_whole_with_skip_bad(tmp_path):
    bad = write(tmp_path / "in" / "bad.jsonl", "{oops\n")
    write(tmp_path / "in" / "good.csv", "question,answer\nq,a\n")
    summary = prepare(tmp_path / "in", tmp_path / "out.jsonl", skip_bad=True)
    assert summary.skipped == [f"{bad} row 1: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert summary.train_rows + summary.val_rows == 1


def test_a_long_document_in_a_csv_cell(tmp_path):
    document = " ".join(f"El horno {i} es de leña." for i in range(10_000))  # past csv's 128 KiB cell limit
    path = write(tmp_path / "notes.csv", f'text\n"{document}"\n')
    (report,) = inspect(path).files
    assert report.error is None and report.rows == 1 and report.chunks > 100
