"""Tests for reading data as people have it: column mapping and --guess, encodings and CSV dialects,
chat exports (WhatsApp, Telegram) and Hugging Face datasets, each on real files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import error_of, pair, prepared_rows, read_jsonl, write, write_bytes, write_jsonl
from typer.testing import CliRunner

from forja.cli import app
from forja.data import ReadOptions, Source, inspect, prepare
from forja.data.mapping import parse_map

runner = CliRunner()


def forja(*args: str):
    return runner.invoke(app, list(args))


def mapped(**fields: str) -> ReadOptions:
    return ReadOptions(map=fields)


# --- Column mapping ----------------------------------------------------------------------------------

BOT_CSV = 'user_message,bot_reply\n¿Abrís los lunes?,"No, los lunes cerramos."\n¿Hacéis envíos?,Sí.\n'


def test_unknown_columns_name_the_columns_and_the_mapping_to_try(tmp_path):
    path = write(tmp_path / "chat.csv", BOT_CSV)
    message = error_of(lambda: prepare(path, tmp_path / "out.jsonl"))
    assert message.startswith(
        f"{path}: columns user_message, bot_reply match no known format; "
        "try --map question=user_message,answer=bot_reply (or --guess to read it so); accepted:"
    )


def test_a_map_names_which_column_is_which(tmp_path):
    path = write(tmp_path / "faq.csv", "Consulta;Contestación\n¿Abrís los lunes?;No, los lunes cerramos.\n")
    options = ReadOptions(map=parse_map("question=Consulta,answer=Contestación"))
    assert prepared_rows(tmp_path, path, options=options) == [
        {"messages": pair("¿Abrís los lunes?", "No, los lunes cerramos.")}
    ]
    (report,) = inspect(path, options=options).files
    assert (report.format, report.mapping) == ("question/answer", "question=Consulta,answer=Contestación")


def test_a_map_matches_columns_whatever_their_case_and_accents(tmp_path):
    path = write(tmp_path / "faq.csv", "CONSULTA,Contestación\n¿Abrís?,Sí.\n")
    assert prepared_rows(tmp_path, path, options=mapped(question="consulta", answer="contestacion")) == [
        {"messages": pair("¿Abrís?", "Sí.")}
    ]


def test_system_and_context_columns_go_into_the_conversation(tmp_path):
    path = write(tmp_path / "faq.csv", "p,r,tono,ficha\n¿Cuánto cuesta?,12 €.,Sé breve.,Martillo de carpintero\n")
    options = mapped(question="p", answer="r", system="tono", context="ficha")
    assert prepared_rows(tmp_path, path, options=options) == [{"messages": [
        {"role": "system", "content": "Sé breve."},
        {"role": "user", "content": "Martillo de carpintero\n\n¿Cuánto cuesta?"},
        {"role": "assistant", "content": "12 €."},
    ]}]


def test_an_empty_mapped_column_is_named_by_the_users_name(tmp_path):
    path = write(tmp_path / "faq.csv", "Consulta,Contestación\n¿Abrís?,\n")
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl", options=mapped(question="Consulta", answer="Contestación"))) == (
        f'{path} row 2: column "contestación" is empty (use --skip-bad to skip such rows)'
    )


def test_a_mapped_column_that_is_not_there_says_which_are(tmp_path):
    path = write(tmp_path / "faq.csv", BOT_CSV)
    options = mapped(question="user_message", answer="bot_replies")
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl", options=options)) == (
        f'{path}: --map answer=bot_replies: no column "bot_replies" (did you mean "bot_reply"?); '
        "the columns are user_message, bot_reply"
    )
    assert inspect(path, options=options).files[0].error.startswith(f"{path}: --map answer=bot_replies")


def test_a_bad_map_is_refused_in_one_line():
    assert error_of(lambda: parse_map("pregunta=Consulta")) == (
        '--map "pregunta=Consulta": unknown field "pregunta"; fields are question, answer, system, context, text, '
        "conversation, role, content"
    )
    assert error_of(lambda: parse_map("question")).startswith('--map "question": write FIELD=COLUMN')
    assert error_of(lambda: parse_map("question=a")) == "map question=a: map both question and answer"


def test_a_file_of_a_known_format_ignores_a_map_for_other_files(tmp_path):
    write(tmp_path / "in" / "a.csv", BOT_CSV)
    write(tmp_path / "in" / "b.csv", "question,answer\n¿Y los martes?,Abrimos.\n")
    options = mapped(question="user_message", answer="bot_reply")
    report = inspect(tmp_path / "in", options=options)
    assert [f.rows for f in report.files] == [2, 1]
    assert report.files[1].notes == [
        "--map question=user_message,answer=bot_reply not applied: no such columns, and the file is question/answer"
    ]


def test_multi_turn_rows_are_grouped_by_conversation(tmp_path):
    path = write(tmp_path / "tickets.csv", (
        "ticket,quien,texto\n"
        "7,cliente,Hola\n7,cliente,¿Tenéis tacos del 8?\n7,agente,Sí, de nylon.\n"
        "9,cliente,¿Abrís el sábado?\n7,cliente,¿Cuánto valen?\n7,agente,3 € la caja.\n9,agente,Hasta las 14.\n"
    ).replace("Sí, de nylon.", '"Sí, de nylon."'))
    rows = prepared_rows(tmp_path, path, options=mapped(conversation="ticket", role="quien", content="texto"))
    assert rows == [
        {"messages": pair("Hola\n¿Tenéis tacos del 8?", "Sí, de nylon.") + pair("¿Cuánto valen?", "3 € la caja.")},
        {"messages": pair("¿Abrís el sábado?", "Hasta las 14.")},
    ]


def test_multi_turn_rows_with_names_as_roles_need_the_assistant(tmp_path):
    path = write(tmp_path / "chat.csv", "id,de,mensaje\n1,Ana,¿Abrís?\n1,Ferretería Sol,Sí.\n")
    options = mapped(conversation="id", role="de", content="mensaje")
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl", options=options)) == (
        f'{path} row 2: column "de" is "Ana", expected user, assistant or system (or name the assistant with '
        "--assistant) (use --skip-bad to skip such rows)"
    )
    options = ReadOptions(map=options.map, assistant="ferreteria sol")
    assert prepared_rows(tmp_path, path, options=options) == [{"messages": pair("¿Abrís?", "Sí.")}]


def test_a_field_of_turn_lists_maps_its_keys(tmp_path):
    turns = [{"Quien": "usuario", "Texto": "¿Abrís?"}, {"Quien": "asistente", "Texto": "Sí."}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"dialogo": turns, "id": 1}])
    options = mapped(role="quien", content="texto", conversation="dialogo")  # in any order
    assert prepared_rows(tmp_path, path, options=options) == [{"messages": pair("¿Abrís?", "Sí.")}]


# --- --guess -----------------------------------------------------------------------------------------


def test_guess_takes_the_column_whose_values_end_in_a_question_mark(tmp_path):
    path = write(tmp_path / "faq.csv", (
        "campo1,campo2,id\n"
        "Cerramos los lunes.,¿Abrís los lunes?,1\nEn el pasillo 3.,¿Dónde están los tornillos?,2\n"
    ))
    (report,) = inspect(path, options=ReadOptions(guess=True)).files
    assert report.mapping == "question=campo2,answer=campo1" and report.rows == 2
    assert report.notes == ['guessed --map question=campo2,answer=campo1: "campo2" is the question '
                            '(2 of 2 values end in "?"), "campo1" the answer (the longer text) (give --map to change it)']
    assert prepared_rows(tmp_path, path, options=ReadOptions(guess=True))[0] == {
        "messages": pair("¿Abrís los lunes?", "Cerramos los lunes.")
    }


def test_guess_reads_names_and_multi_turn_tables(tmp_path):
    path = write(tmp_path / "log.csv", "sesion,rol,mensaje\na,user,Hola\na,assistant,Buenas\n")
    (report,) = inspect(path, options=ReadOptions(guess=True)).files
    assert report.mapping == "conversation=sesion,role=rol,content=mensaje"
    assert report.rows == 1 and report.turns == 2


def test_forja_data_inspect_guess_says_the_mapping_and_prepare_uses_it(tmp_path):
    write(tmp_path / "chat.csv", BOT_CSV)
    result = forja("data", "inspect", "chat.csv", "--guess", "--estimate")
    assert result.exit_code == 0, result.output
    assert "chat.csv: CSV" in result.stdout and "question/answer by --map question=user_message,answer=bot_reply" in result.stdout
    assert "guessed --map question=user_message,answer=bot_reply" in result.stdout
    result = forja("data", "prepare", "chat.csv", "--out", "out/train.jsonl", "--guess", "--estimate")
    assert result.exit_code == 0, result.output
    assert "chat.csv: guessed --map question=user_message,answer=bot_reply" in result.stdout
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 2
    meta = json.loads((tmp_path / "out" / "train.meta.json").read_text())
    assert meta["sources"][0]["map"] == "question=user_message,answer=bot_reply"


def test_forja_data_map_flag_and_its_errors_in_one_line(tmp_path):
    write(tmp_path / "chat.csv", BOT_CSV)
    result = forja("data", "prepare", "chat.csv", "-o", "t.jsonl", "--estimate", "--map", "question=user_message,answer=bot_reply")
    assert result.exit_code == 0, result.output
    result = forja("data", "prepare", "chat.csv", "-o", "t.jsonl", "--estimate", "--map", "question=user_message,answer=nope")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().startswith('forja: error: chat.csv: --map answer=nope: no column "nope"')


def test_the_config_gives_a_source_its_map(tmp_path):
    write(tmp_path / "data" / "chat.csv", BOT_CSV)
    write(tmp_path / "forja.yaml", "data:\n  sources:\n    - path: data\n      map: {question: user_message, answer: bot_reply}\n")
    for args in ([], ["data/chat.csv"], ["data"]):
        result = forja("data", "prepare", *args, "--out", "out.jsonl", "--estimate")
        assert result.exit_code == 0, (args, result.output)
        assert [row["messages"][1]["content"] for row in read_jsonl(tmp_path / "out.jsonl")] == [
            "No, los lunes cerramos.", "Sí."]
    write(tmp_path / "forja.yaml", "")
    result = forja("data", "inspect", "--estimate")
    assert result.exit_code == 1 and "list them under data.sources" in result.stderr


def test_sources_flags_override_the_config(tmp_path):
    from forja.config import DataSource
    from forja.data import sources

    configured = [DataSource(path="data", map={"question": "a", "answer": "b"}, encoding="cp1252")]
    (source,) = sources(["data/x.csv"], configured, map={"question": "c", "answer": "d"})
    assert source == Source("data/x.csv", ReadOptions(map={"question": "c", "answer": "d"}, encoding="cp1252"))
    (other,) = sources(["elsewhere.csv"], configured)
    assert other.options == ReadOptions()


# --- Encodings and CSV dialects ----------------------------------------------------------------------

EXCEL_ES = 'Consulta;Contestación\n¿Abrís los lunes?;"No, cerramos; sólo martes – 5 €"\n¿Tenéis piñones?;Sí, a 3 €.\n'
EXCEL_ES_ROWS = [
    {"messages": pair("¿Abrís los lunes?", "No, cerramos; sólo martes – 5 €")},
    {"messages": pair("¿Tenéis piñones?", "Sí, a 3 €.")},
]
ES_MAP = ReadOptions(map={"question": "Consulta", "answer": "Contestación"})


def test_a_windows_1252_semicolon_csv_from_excel_imports_with_its_accents(tmp_path):
    path = write_bytes(tmp_path / "faq.csv", EXCEL_ES.replace("\n", "\r\n").encode("cp1252"))
    assert prepared_rows(tmp_path, path, options=ES_MAP) == EXCEL_ES_ROWS
    (report,) = inspect(path, options=ES_MAP).files
    assert report.detail == 'Windows-1252, ";"-separated'
    assert f'{path}: CSV (Windows-1252, ";"-separated), question/answer by --map' in report.render()


@pytest.mark.parametrize(
    ("encoding", "content", "detected"),
    [
        ("utf-8-sig", EXCEL_ES, 'UTF-8 with BOM, ";"-separated'),
        ("utf-16", EXCEL_ES.replace(";", "\t"), "UTF-16 LE, tab-separated"),  # Excel's "Unicode text"
        ("utf-16-be", EXCEL_ES, 'UTF-16 BE, ";"-separated'),  # no byte order mark
        ("latin-1", EXCEL_ES.replace("–", "-").replace("€", "EUR"), 'Latin-1, ";"-separated'),
    ],
)
def test_encodings_are_detected(tmp_path, encoding, content, detected):
    path = write_bytes(tmp_path / "faq.csv", content.encode(encoding))
    (report,) = inspect(path, options=ES_MAP).files
    assert report.error is None and report.rows == 2
    # Latin-1 and Windows-1252 agree on every letter here; either is right.
    assert report.detail == detected or (encoding == "latin-1" and report.detail == 'Windows-1252, ";"-separated')
    rows = prepared_rows(tmp_path, path, options=ES_MAP)
    assert rows[0]["messages"][0]["content"] == "¿Abrís los lunes?"
    assert rows[1]["messages"][1]["content"] == ("Sí, a 3 EUR." if encoding == "latin-1" else "Sí, a 3 €.")


def test_a_text_file_in_windows_1252_is_read(tmp_path):
    path = write_bytes(tmp_path / "notas.txt", "Usuario: ¿Abrís?\nAsistente: Sí, señor.\n".encode("cp1252"))
    assert prepared_rows(tmp_path, path) == [{"messages": pair("¿Abrís?", "Sí, señor.")}]


def test_encoding_forces_one(tmp_path):
    path = write_bytes(tmp_path / "faq.csv", "question,answer\nPiñón?,Sí\n".encode("cp850"))
    assert prepared_rows(tmp_path, path, options=ReadOptions(encoding="cp850")) == [{"messages": pair("Piñón?", "Sí")}]
    assert error_of(lambda: inspect(path, options=ReadOptions(encoding="klingon")).files[0].error and
                    prepare(path, tmp_path / "o.jsonl", options=ReadOptions(encoding="klingon"))) == (
        f"{path}: unknown encoding 'klingon'; give one such as utf-8, cp1252, latin-1 or utf-16"
    )


def test_binary_bytes_are_not_taken_for_text(tmp_path):
    path = write_bytes(tmp_path / "faq.csv", bytes(range(256)) * 4)
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl")) == (
        f"{path}: cannot tell the text encoding (not UTF-8, UTF-16 or a Western one such as Windows-1252; binary?); "
        "save it as UTF-8, or give its encoding with --encoding"
    )


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ('question\tanswer\n¿Abrís?\t"Sí, a las 9; hasta las 14"\n', 'UTF-8, tab-separated'),
        ("question|answer\n¿Abrís?|Sí, a las 9\n", 'UTF-8, "|"-separated'),
        ("question,answer\n'¿Abrís, o no?','Sí; a las 9'\n", "UTF-8, \",\"-separated, quoted with '"),
    ],
)
def test_csv_dialects_are_sniffed(tmp_path, content, detail):
    path = write(tmp_path / "faq.csv", content)
    (report,) = inspect(path).files
    assert (report.detail, report.rows, report.bad_rows) == (detail, 1, [])


def test_forja_data_inspect_says_the_encoding_and_takes_encoding(tmp_path):
    write_bytes(tmp_path / "faq.csv", EXCEL_ES.encode("cp1252"))
    result = forja("data", "inspect", "faq.csv", "--map", "question=Consulta,answer=Contestación", "--estimate")
    assert result.exit_code == 0, result.output
    assert 'faq.csv: CSV (Windows-1252, ";"-separated)' in result.stdout
    result = forja("data", "inspect", "faq.csv", "--map", "question=Consulta,answer=Contestación", "--estimate",
                   "--encoding", "latin-1")
    assert 'faq.csv: CSV (Latin-1, ";"-separated)' in result.stdout


# --- forja data inspect's exit code ------------------------------------------------------------------


def test_forja_data_inspect_exits_non_zero_when_a_file_cannot_be_read(tmp_path):
    write(tmp_path / "in" / "faq.csv", "question,answer\n¿Abrís?,Sí\n")
    write_bytes(tmp_path / "in" / "book.xlsx", b"not a workbook")
    write_bytes(tmp_path / "in" / "setup.exe", b"MZ")
    result = forja("data", "inspect", "in", "--estimate")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "faq.csv: CSV (UTF-8" in result.stdout and "unreadable files: 2" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("forja: error: in/book.xlsx: cannot read as an Excel .xlsx workbook (")
    assert line.endswith("(1 more unreadable files above)")
    assert forja("data", "inspect", "in/faq.csv", "--estimate").exit_code == 0


# --- Chat exports ------------------------------------------------------------------------------------

LRM = "\u200e"
WHATSAPP_IOS = f"""\
[12/03/24 10:15:00] Ferretería Sol: {LRM}Los mensajes y las llamadas están cifrados de extremo a extremo.
[12/03/24 10:15:00] Ana López: Hola
[12/03/24 10:15:30] Ana López: ¿Tenéis tacos
del 8?
[12/03/24 10:16:02] Ferretería Sol: Sí, de nylon.
Cajas de 100.
[12/03/24 10:16:40] Ana López: {LRM}image omitted
[12/03/24 10:17:00] Ana López: ¿Y este?
[12/03/24 10:20:00] Ferretería Sol: Ese también <This message was edited>
[14/03/24 09:00:00] Ferretería Sol: ¡Ofertas esta semana!
[14/03/24 09:30:00] Ana López: ¿Abrís el sábado?
[14/03/24 09:35:00] Ferretería Sol: Hasta las 14.
[14/03/24 09:36:00] Ana López: Gracias
"""
WHATSAPP_ANDROID = """\
12/3/24, 10:15 - Los mensajes y las llamadas están cifrados de extremo a extremo. Toca para obtener más información.
12/3/24, 10:15 - Ana López: Hola
12/3/24, 10:15 - Ana López: ¿Tenéis tacos
del 8?
12/3/24, 10:16 - Ferretería Sol: Sí, de nylon.
Cajas de 100.
12/3/24, 10:16 - Ana López: <Multimedia omitido>
12/3/24, 10:17 - Ana López: ¿Y este?
12/3/24, 10:20 - Ferretería Sol: Ese también <Se editó este mensaje.>
14/3/24, 9:00 - Ferretería Sol: ¡Ofertas esta semana!
14/3/24, 9:30 - Ana López: ¿Abrís el sábado?
14/3/24, 9:35 - Ferretería Sol: Hasta las 14.
14/3/24, 9:36 - Ana López: Gracias
"""
CHAT_ROWS = [
    {"messages": pair("Hola\n¿Tenéis tacos\ndel 8?", "Sí, de nylon.\nCajas de 100.") + pair("¿Y este?", "Ese también")},
    {"messages": pair("¿Abrís el sábado?", "Hasta las 14.")},
]
SOL = ReadOptions(assistant="Ferretería Sol")


@pytest.mark.parametrize("export", [WHATSAPP_IOS, WHATSAPP_ANDROID], ids=["ios", "android"])
def test_a_whatsapp_export_becomes_conversations(tmp_path, export):
    path = write(tmp_path / "Chat de WhatsApp con Ana López.txt", export)
    assert prepared_rows(tmp_path, path, options=SOL) == CHAT_ROWS
    (report,) = inspect(path, options=SOL).files
    assert (report.container, report.format, report.rows, report.turns) == ("text", "whatsapp", 2, 6)
    assert report.notes[:2] == [
        "assistant: Ferretería Sol; user: Ana López; a pause over 6 h starts a new conversation",
        "1 media or deleted messages dropped",
    ]
    rows = read_jsonl(prepare(path, tmp_path / "o.jsonl", options=SOL).train_path)
    assert [row["source"] for row in rows] == [f"{path}:2", f"{path}:11"]


def test_a_shorter_gap_splits_more_conversations_and_a_longer_one_fewer(tmp_path):
    path = write(tmp_path / "chat.txt", WHATSAPP_ANDROID)
    # 3 minutes or more apart: "Ese también", the offer, the Saturday question and its answer stand alone.
    short = ReadOptions(assistant="ferreteria sol", gap_hours=0.04)
    assert prepared_rows(tmp_path, path, options=short) == [
        {"messages": pair("Hola\n¿Tenéis tacos\ndel 8?", "Sí, de nylon.\nCajas de 100.")}
    ]
    assert "4 stretches without both sides left out" in inspect(path, options=short).files[0].notes
    joined = prepared_rows(tmp_path, path, options=ReadOptions(assistant="Ferretería Sol", gap_hours=72))
    assert joined == [{"messages": pair("Hola\n¿Tenéis tacos\ndel 8?", "Sí, de nylon.\nCajas de 100.")
                       + pair("¿Y este?", "Ese también\n¡Ofertas esta semana!") + pair("¿Abrís el sábado?", "Hasta las 14.")}]


def test_whatsapp_12_hour_clock_and_month_first_dates(tmp_path):
    path = write(tmp_path / "chat.txt", (
        "[3/13/24, 9:15:00 PM] Ana: ¿Abrís?\n[3/13/24, 9:16:00 PM] Sol: Sí.\n"
        "[3/14/24, 8:00:00 AM] Ana: ¿Y hoy?\n[3/14/24, 8:01:00 AM] Sol: También.\n"
    ))
    assert len(prepared_rows(tmp_path, path, options=ReadOptions(assistant="Sol"))) == 2  # 10 h 44 min apart


def test_the_assistant_must_be_someone_in_the_chat(tmp_path):
    path = write(tmp_path / "chat.txt", WHATSAPP_ANDROID)
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl", options=ReadOptions(assistant="Ferretería"))) == (
        f'{path}: --assistant "Ferretería" names nobody in the chat; the participants are "Ana López", "Ferretería Sol"'
    )
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl")) == (
        f'{path}: a WhatsApp chat of "Ana López" (5 messages), "Ferretería Sol" (4 messages); say which one is the '
        "assistant with --assistant NAME"
    )


TELEGRAM = {
    "name": "Ana López", "type": "personal_chat", "id": 42,
    "messages": [
        {"id": 1, "type": "service", "date": "2024-03-12T10:00:00", "actor": "Ana López", "action": "phone_call"},
        {"id": 2, "type": "message", "date": "2024-03-12T10:15:00", "from": "Ana López", "from_id": "user1",
         "text": ["¿Tenéis tacos del ", {"type": "bold", "text": "8"}, "?"]},
        {"id": 3, "type": "message", "date": "2024-03-12T10:15:20", "from": "Ana López", "from_id": "user1",
         "photo": "photos/photo_1.jpg", "text": ""},
        {"id": 4, "type": "message", "date": "2024-03-12T10:16:00", "from": "Ferretería Sol", "from_id": "user2",
         "text": "Sí, de nylon."},
        {"id": 5, "type": "message", "date": "2024-03-12T10:16:30", "from": "Ferretería Sol", "from_id": "user2",
         "text": [{"type": "link", "text": "https://sol.example/tacos"}]},
        {"id": 6, "type": "message", "date": "2024-03-13T09:00:00", "from": "Ana López", "from_id": "user1",
         "text": "¿Abrís el sábado?"},
        {"id": 7, "type": "message", "date": "2024-03-13T09:01:00", "from": "Ferretería Sol", "from_id": "user2",
         "text": "Hasta las 14."},
    ],
}


def test_a_telegram_export_becomes_conversations(tmp_path):
    path = write(tmp_path / "result.json", json.dumps(TELEGRAM, ensure_ascii=False))
    assert prepared_rows(tmp_path, path, options=SOL) == [
        {"messages": pair("¿Tenéis tacos del 8?", "Sí, de nylon.\nhttps://sol.example/tacos")},
        {"messages": pair("¿Abrís el sábado?", "Hasta las 14.")},
    ]
    (report,) = inspect(path, options=SOL).files
    assert (report.container, report.format) == ("JSON", "telegram")
    assert "1 messages without text (media) dropped" in report.notes
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl", options=ReadOptions(assistant="Bob"))).endswith(
        'the participants are "Ana López", "Ferretería Sol"'
    )


def test_a_whole_telegram_account_export_reads_each_chat_apart(tmp_path):
    other = {**TELEGRAM, "name": "Luis", "messages": [
        {"id": 1, "type": "message", "date": "2024-03-12T10:16:10", "from": "Luis", "text": "¿Y tornillos?"},
        {"id": 2, "type": "message", "date": "2024-03-12T10:17:00", "from": "Ferretería Sol", "text": "También."},
    ]}
    path = write(tmp_path / "result.json", json.dumps({"about": "...", "chats": {"list": [TELEGRAM, other]}}))
    rows = prepared_rows(tmp_path, path, options=SOL)
    assert len(rows) == 3 and rows[2] == {"messages": pair("¿Y tornillos?", "También.")}


def test_forja_data_prepare_assistant_flag(tmp_path):
    write(tmp_path / "chat.txt", WHATSAPP_IOS)
    result = forja("data", "prepare", "chat.txt", "--assistant", "Ferretería Sol", "--gap-hours", "6", "-o", "t.jsonl",
                   "--estimate")
    assert result.exit_code == 0, result.output
    assert "chat.txt: assistant: Ferretería Sol; user: Ana López" in result.stdout
    result = forja("data", "inspect", "chat.txt", "--assistant", "Pepe", "--estimate")
    assert result.exit_code == 1
    assert result.stderr.strip() == ('forja: error: chat.txt: --assistant "Pepe" names nobody in the chat; the '
                                     'participants are "Ana López", "Ferretería Sol"')


# --- Hugging Face datasets ---------------------------------------------------------------------------

HUB_COLUMNS = {"Consulta": ["¿Abrís los lunes?", "¿Hacéis envíos?"], "Contestación": ["No.", "Sí, en 24 h."]}


def hub_layout(folder: Path) -> Path:
    """A dataset folder as the hub lays one out: data/<split>-00000-of-00001.parquet per split."""
    import pyarrow
    import pyarrow.parquet

    (folder / "data").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.table(HUB_COLUMNS), folder / "data" / "train-00000-of-00001.parquet")
    pyarrow.parquet.write_table(pyarrow.table({k: v[:1] for k, v in HUB_COLUMNS.items()}),
                                folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_a_dataset_in_the_hubs_layout_loads_with_its_split_and_the_mapping(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = hub_layout(tmp_path / "faq-dataset")
    ref = f"hf:{folder}"
    options = ReadOptions(map={"question": "Consulta", "answer": "Contestación"})
    assert prepared_rows(tmp_path, Source(ref, options)) == [
        {"messages": pair("¿Abrís los lunes?", "No.")}, {"messages": pair("¿Hacéis envíos?", "Sí, en 24 h.")}
    ]
    test_split = ReadOptions(map=options.map, split="test")
    (report,) = inspect(Source(ref, test_split)).files
    assert (report.container, report.detail, report.rows) == ("Hugging Face dataset", 'split "test"', 1)
    message = error_of(lambda: prepare(Source(ref, ReadOptions(map=options.map, split="validation")), tmp_path / "o.jsonl"))
    assert message.startswith(f'{ref}: Unknown split "validation". Should be one of [') and message.endswith("(give it with --split)")
    assert error_of(lambda: prepare(Source(ref), tmp_path / "o.jsonl")).startswith(
        f"{ref}: columns consulta, contestación match no known format; try --map question=consulta,answer=contestación"
    )


def test_a_dataset_saved_to_disk_loads(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"question": ["¿Abrís?"], "answer": ["Sí."]})}).save_to_disk(folder)
    assert prepared_rows(tmp_path, Source(f"hf:{folder}")) == [{"messages": pair("¿Abrís?", "Sí.")}]
    assert error_of(lambda: prepare(Source(f"hf:{folder}", ReadOptions(split="test")), tmp_path / "o.jsonl")) == (
        f'hf:{folder}: no split "test"; the splits are train (give one with --split)'
    )


def test_a_hub_id_offline_fails_at_once_and_says_what_to_do(tmp_path):
    import time

    start = time.monotonic()  # conftest points HF_ENDPOINT at a closed local port
    message = error_of(lambda: prepare("hf:ImadSaddik/BoDmaghDataset", tmp_path / "o.jsonl"))
    assert time.monotonic() - start < 5
    assert message.startswith("hf:ImadSaddik/BoDmaghDataset: cannot reach the Hugging Face hub at http://127.0.0.1:9 (")
    assert message.endswith("connect to the network, or set HF_HUB_OFFLINE=1 to use a copy in the cache, or give a "
                            "folder as hf:./folder")
    assert error_of(lambda: inspect("hf:not an id").files[0].error and prepare("hf:not an id", tmp_path / "o.jsonl")) == (
        "hf:not an id: neither a folder nor a hub id owner/name (e.g. hf:ImadSaddik/BoDmaghDataset)"
    )


def test_forja_data_prepare_reads_hf_with_split_and_map(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    hub_layout(tmp_path / "ds")
    result = forja("data", "prepare", "hf:./ds", "--split", "test", "--map", "question=Consulta,answer=Contestación",
                   "-o", "t.jsonl", "--estimate")
    assert result.exit_code == 0, result.output
    assert [row["source"] for row in read_jsonl(tmp_path / "t.jsonl")] == ["hf:./ds:1"]
    result = forja("data", "inspect", "hf:someone/missing", "--estimate")
    assert result.exit_code == 1 and "cannot reach the Hugging Face hub" in result.stderr


def test_guess_finds_the_keys_inside_lists_of_turns(tmp_path):
    turns = [{"speaker": "human", "words": "¿Abrís?"}, {"speaker": "bot", "words": "Sí."}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"dialog": turns}])
    (report,) = inspect(path, options=ReadOptions(guess=True)).files
    assert report.mapping == "conversation=dialog,role=speaker,content=words"
    assert prepared_rows(tmp_path, path, options=ReadOptions(guess=True)) == [{"messages": pair("¿Abrís?", "Sí.")}]


def test_a_mistyped_role_column_is_named(tmp_path):
    path = write(tmp_path / "log.csv", "sesion,rol,mensaje\na,user,Hola\na,assistant,Buenas\n")
    options = mapped(conversation="sesion", role="roll", content="mensaje")
    assert error_of(lambda: prepare(path, tmp_path / "o.jsonl", options=options)) == (
        f'{path}: --map role=roll: no column "roll" (did you mean "rol"?); the columns are sesion, rol, mensaje'
    )


def test_a_two_column_chat_csv_of_any_names_reads_by_the_mapping(tmp_path):
    path = write(tmp_path / "chat.csv", "Cliente,Ferretería Sol\n¿Abrís?,Sí.\nThis message was deleted.,x\n")
    options = mapped(question="Cliente", answer="Ferretería Sol")
    assert prepared_rows(tmp_path, path, options=options)[0] == {"messages": pair("¿Abrís?", "Sí.")}


def test_deleted_and_media_messages_with_a_full_stop_are_dropped(tmp_path):
    path = write(tmp_path / "chat.txt", (
        "12/3/24, 10:15 - Ana: ¿Abrís?\n12/3/24, 10:15 - Ana: Eliminaste este mensaje.\n"
        "12/3/24, 10:16 - Sol: Sí.\n12/3/24, 10:16 - Sol: IMG-20240312-WA0001.jpg (archivo adjunto)\n"
    ))
    assert prepared_rows(tmp_path, path, options=ReadOptions(assistant="Sol")) == [{"messages": pair("¿Abrís?", "Sí.")}]


def test_an_ios_whatsapp_zip_is_read_from_its_chat(tmp_path):
    import zipfile

    path = tmp_path / "WhatsApp Chat - Ana López.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("_chat.txt", WHATSAPP_IOS)
        archive.writestr("00000012-PHOTO-2024-03-12-10-16-40.jpg", b"\xff\xd8")
    assert prepared_rows(tmp_path, path, options=SOL) == CHAT_ROWS
    assert inspect(path, options=SOL).files[0].container == "WhatsApp zip"
    other = tmp_path / "photos.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("a.jpg", b"\xff\xd8")
    assert error_of(lambda: prepare(other, tmp_path / "o.jsonl")) == (
        f"{other}: a zip without a WhatsApp chat (_chat.txt) in it; forja reads a zip only as a WhatsApp export"
    )


def test_forja_train_reads_files_as_forja_data_does(tmp_path, tiny_model_dir, monkeypatch):
    """--map and --encoding on forja train, and data.sources from the config: the same rows as prepare."""
    csv_bytes = "Consulta;Contestación\r\n¿Abrís el sábado?;Sí, de 9 a 14.\r\n¿Dónde estáis?;En la plaza Mayor.\r\n"
    data = tmp_path / "consultas.csv"
    data.write_bytes(csv_bytes.encode("cp1252"))
    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    common = ["--max-steps", "1", "--eval-every", "1000", "--checkpoint-every", "1000", "--quiet"]
    refused = runner.invoke(app, ["train", "--data", str(data), "--name", "m0", *common])
    assert refused.exit_code == 1 and "--map" in refused.output and "Traceback" not in refused.output
    done = runner.invoke(app, ["train", "--data", str(data), "--map", "question=Consulta,answer=Contestación",
                               "--name", "m1", *common])
    assert done.exit_code == 0, done.output
    from forja.config import load_settings

    rows = read_jsonl(load_settings().versions_dir / "m1" / "data.jsonl")
    assert {r["messages"][-1]["content"] for r in rows} == {"Sí, de 9 a 14.", "En la plaza Mayor."}
    config = tmp_path / "forja.yaml"
    config.write_text(f"data:\n  sources:\n    - path: {data}\n      map: {{question: Consulta, answer: Contestación}}\n",
                      encoding="utf-8")
    from_config = runner.invoke(app, ["train", "--config", str(config), "--name", "m2", *common])
    assert from_config.exit_code == 0, from_config.output
    assert read_jsonl(load_settings().versions_dir / "m2" / "data.jsonl") == rows
