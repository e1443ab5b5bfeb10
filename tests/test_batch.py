"""Batch requests (forja.jobs.batch) on the tiny model: the file's checks name the line, answers and errors are
written as OpenAI writes them, an interrupted run continues without answering twice, and `forja generate
--input/--output` over a table."""

import json

import pytest
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.jobs.batch import BatchError, Counts, read_requests, run_batch, run_table

CHAT = "/v1/chat/completions"


@pytest.fixture
def settings(tiny_model_dir, forja_home):
    return load_settings(home=forja_home, model=str(tiny_model_dir), dtype="float32")


def chat_line(custom_id, content, **body):
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **body}}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def ids_of(path):
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "line 2: not valid JSON"),
    (chat_line("a", "again"), "line 2: custom_id 'a' is already on line 1"),
    ({**chat_line("b", "x"), "method": "GET"}, "line 2: method is 'GET'"),
    ({**chat_line("b", "x"), "url": "/v1/images"}, "line 2: url is '/v1/images'"),
    ({**chat_line("b", "x"), "url": "/v1/completions"}, "line 2: url is /v1/completions, line 1's is"),
    ({**chat_line("b", "x"), "body": "hola"}, "line 2: body is missing or not a JSON object"),
    ({"method": "POST", "url": CHAT, "body": {}}, "line 2: custom_id is missing"),
])
def test_a_bad_line_of_the_file_is_named_with_its_problem(tmp_path, bad, problem):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hola"), bad])
    with pytest.raises(BatchError, match=problem) as caught:
        read_requests(path)
    assert str(caught.value).startswith("file line 2: ") and caught.value.line == 2


def test_blank_lines_are_skipped_and_an_empty_file_is_refused(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hola"), "", chat_line("b", "adiós")])
    assert [r["custom_id"] for r in read_requests(path)] == ["a", "b"]
    with pytest.raises(BatchError, match="no requests"):
        read_requests(write_lines(tmp_path / "empty.jsonl", [""]))


def test_every_request_is_answered_and_a_bad_body_goes_to_the_error_file(settings, tmp_path):
    lines = [chat_line(f"q{i}", f"Pregunta {i}") for i in range(10)] + [chat_line("hot", "x", temperature=9)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    seen = []
    counts = run_batch(settings, source, tmp_path / "out.jsonl", tmp_path / "err.jsonl", progress=seen.append,
                       owner="alice")
    assert counts == Counts(total=11, completed=10, failed=1)
    assert len(seen) == 11 and seen[-1].done == 11
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in out) == sorted(f"q{i}" for i in range(10))
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"] == response["body"]["id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["usage"]["completion_tokens"] <= 4
    (error,) = [json.loads(line) for line in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert error["custom_id"] == "hot" and error["error"] is None
    assert error["response"]["status_code"] == 422  # what the route answers: never a 500 for a bad body
    assert error["response"]["body"]["error"]["param"] == "temperature"
    # the exchanges are recorded under the batch's owner, as if its key had sent them
    from forja.store import Store

    store = Store.open(settings)
    try:
        assert {store.exchange(line["response"]["request_id"]).api_key_name for line in out} == {"alice"}
    finally:
        store.close()


def test_completions_and_embeddings_lines_are_answered_too(settings, tmp_path):
    completions = write_lines(tmp_path / "c.jsonl", [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hola", "max_tokens": 3}}
        for i in range(3)])
    assert run_batch(settings, completions, tmp_path / "c.out", tmp_path / "c.err") == Counts(3, 3, 0)
    embeddings = write_lines(tmp_path / "e.jsonl", [
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "hola"}},
        {"custom_id": "e2", "method": "POST", "url": "/v1/embeddings", "body": {"input": ["a", "b"]}},
        {"custom_id": "e3", "method": "POST", "url": "/v1/embeddings", "body": {"input": ""}}])
    assert run_batch(settings, embeddings, tmp_path / "e.out", tmp_path / "e.err",
                     endpoint="/v1/embeddings") == Counts(3, 2, 1)
    out = {json.loads(line)["custom_id"]: json.loads(line) for line in (tmp_path / "e.out").read_text().splitlines()}
    assert len(out["e2"]["response"]["body"]["data"]) == 2
    assert len(out["e1"]["response"]["body"]["data"][0]["embedding"]) == 384
    assert ids_of(tmp_path / "e.err") == ["e3"]


def test_the_endpoint_must_be_the_files(settings, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hola")])
    with pytest.raises(BatchError, match="endpoint is /v1/embeddings"):
        run_batch(settings, source, tmp_path / "out.jsonl", tmp_path / "err.jsonl", endpoint="/v1/embeddings")


def test_an_interrupted_batch_continues_without_answering_twice(tiny_model_dir, forja_home, tmp_path):
    # two batch slots: four requests in flight (jobs.batch.in_flight), so the cancel trips before all are sent
    settings = load_settings(home=forja_home, model=str(tiny_model_dir), dtype="float32", serve={"max_batch_size": 2})
    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"Pregunta {i}") for i in range(12)]
                         + [chat_line("hot", "x", temperature=9)])
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    answered = []
    first = run_batch(settings, source, out, err, progress=answered.append, cancelled=lambda: len(answered) >= 3)
    assert 3 <= first.done <= 3 + 4  # the requests in flight when it tripped are answered and written
    with out.open("a") as file:  # killed in the middle of a line: that request is answered again
        file.write('{"id": "batch_req_cut", "custom_id": "q')
    second = run_batch(settings, source, out, err)
    assert second == Counts(13, 12, 1)
    assert sorted(ids_of(out) + ids_of(err)) == sorted([f"q{i}" for i in range(12)] + ["hot"])
    assert run_batch(settings, source, out, err) == Counts(13, 12, 1)  # nothing left: nothing sent


def test_a_stream_request_is_an_error_line(settings, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("s", "hola", stream=True)])
    assert run_batch(settings, source, tmp_path / "out.jsonl", tmp_path / "err.jsonl") == Counts(1, 0, 1)
    (line,) = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert line["response"]["status_code"] == 400 and "stream" in line["response"]["body"]["error"]["message"]


def test_an_output_of_another_batch_is_refused(settings, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hola")])
    write_lines(tmp_path / "out.jsonl", [{"custom_id": "zzz"}])
    with pytest.raises(BatchError, match="written for another batch"):
        run_batch(settings, source, tmp_path / "out.jsonl", tmp_path / "err.jsonl")


# ------------------------------------------------------------------------------------------------ tables

runner = CliRunner()


def forja(*args):
    return runner.invoke(app, list(args))


def test_generate_answers_every_row_of_a_table_and_resumes(tiny_model_dir, tmp_path):
    table = tmp_path / "preguntas.csv"
    table.write_text("id;Pregunta;notas\n1;Hola;a\n2;¿Qué tal?;b\n3;;c\n4;Adiós;d\n", encoding="cp1252")
    out = tmp_path / "out.jsonl"
    result = forja("generate", "--input", str(table), "--output", str(out), "--model", str(tiny_model_dir),
                   "--max-new-tokens", "3", "--system", "Responde en español.", "--temperature", "0")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["row-1", "row-2", "row-3", "row-4"]  # in row order once done
    assert [line["prompt"] for line in lines] == ["Hola", "¿Qué tal?", "", "Adiós"]
    assert "empty" in lines[2]["error"] and "answer" not in lines[2]
    for line in (lines[0], lines[1], lines[3]):
        assert isinstance(line["answer"], str) and line["usage"]["completion_tokens"] <= 3
        assert line["finish_reason"] in ("stop", "length") and line["row"] in (1, 2, 4)
    assert "3 of 4 answered, 1 error" in result.stderr
    again = forja("generate", "--input", str(table), "--output", str(out), "--model", str(tiny_model_dir))
    assert again.exit_code == 0 and "nothing left to answer" in again.stderr
    assert len(out.read_text().splitlines()) == 4


def test_a_table_run_cut_short_continues_where_it_stopped(tiny_model_dir, forja_home, tmp_path):
    settings = load_settings(home=forja_home, model=str(tiny_model_dir), dtype="float32", serve={"max_batch_size": 2})
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"question": f"Pregunta {i}", "lang": "es"}) + "\n" for i in range(10)))
    out, answered = tmp_path / "out.jsonl", []
    first = run_table(settings, table, out, body={"max_tokens": 3}, progress=answered.append,
                      cancelled=lambda: len(answered) >= 2)
    assert 2 <= first.done <= 2 + 4
    second = run_table(settings, table, out, body={"max_tokens": 3})
    assert second == Counts(10, 10, 0)
    assert ids_of(out) == [f"row-{i}" for i in range(1, 11)]
    table.write_text(json.dumps({"question": "otra cosa"}) + "\n")
    with pytest.raises(BatchError, match="written for another table"):
        run_table(settings, table, out)


def test_a_table_without_a_prompt_column_is_one_line_naming_its_columns(tiny_model_dir, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,pais\n1,España\n")
    result = forja("generate", "--input", str(table), "--output", str(tmp_path / "o.jsonl"), "--model", str(tiny_model_dir))
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "its columns are id, pais" in result.stderr
    assert "--column" in result.stderr and "Traceback" not in result.stderr
    named = forja("generate", "--input", str(table), "--output", str(tmp_path / "o.jsonl"), "--column", "nope",
                  "--model", str(tiny_model_dir))
    assert named.exit_code == 1 and "no column 'nope'" in named.stderr


@pytest.mark.parametrize("args, message", [
    (["--input", "in.csv"], "--output is missing"),
    (["--output", "out.jsonl"], "--input is missing"),
    (["Hola", "--input", "in.csv", "--output", "o.jsonl"], "a prompt argument and --input exclude each other"),
    (["--input", "in.csv", "--output", "o.jsonl", "--json"], "--json is for one prompt"),
    (["--input", "batch.jsonl", "--output", "o.jsonl", "--temperature", "0.5"], "--temperature is for a table"),
    (["--input", "missing.csv", "--output", "o.jsonl"], "no such file"),
])
def test_generate_file_options_that_do_not_fit_are_one_line(tiny_model_dir, tmp_path, args, message):
    (tmp_path / "in.csv").write_text("prompt\nHola\n")
    write_lines(tmp_path / "batch.jsonl", [chat_line("a", "hola")])
    result = forja("generate", "--model", str(tiny_model_dir), *args)
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert "Traceback" not in result.stderr


def test_generate_runs_a_batch_file_in_the_batch_format(tiny_model_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hola"), chat_line("b", "x", temperature=9)])
    result = forja("generate", "--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--model",
                   str(tiny_model_dir))
    assert result.exit_code == 0, result.output
    assert ids_of(tmp_path / "out.jsonl") == ["a"] and ids_of(tmp_path / "out.errors.jsonl") == ["b"]
    assert "1 of 2 answered, 1 error (in" in result.stderr
    bad = write_lines(tmp_path / "bad.jsonl", [chat_line("a", "hola"), chat_line("a", "again")])
    result = forja("generate", "--input", str(bad), "--output", str(tmp_path / "o2.jsonl"), "--model", str(tiny_model_dir))
    assert result.exit_code == 1 and "bad.jsonl: line 2: custom_id 'a' is already on line 1" in result.stderr


def test_bench_batch_measures_the_batch_and_the_api_one_by_one(settings, tiny_model_dir):
    from forja.bench_batch import batch_benchmark, render_batch

    results = batch_benchmark(settings, str(tiny_model_dir), prompts=5, max_tokens=4, backends=["pytorch"],
                              log=lambda line: None)
    figures = results["backends"]["pytorch"]
    for way in ("batch", "sequential"):
        assert figures[way]["answers"] == 5 and figures[way]["errors"] == 0
        assert 0 < figures[way]["tokens"] <= 5 * 4 and figures[way]["tokens_per_s"] > 0
    assert figures["batch"]["tokens"] == figures["sequential"]["tokens"]  # greedy: the same answers both ways
    shown = render_batch(results)
    assert "batch / sequential" in shown and "target >= 4x" in shown and results["cpu"] in shown


@pytest.mark.parametrize("suffix", [".xlsx", ".json", ".tsv"])
def test_every_table_format_forja_data_reads_is_answered(settings, tmp_path, suffix):
    table = tmp_path / f"t{suffix}"
    rows = [("Consulta", "id"), ("Hola", 1), ("Adiós", 2)]
    if suffix == ".xlsx":
        import openpyxl

        book = openpyxl.Workbook()
        for row in rows:
            book.active.append(row)
        book.save(table)
    elif suffix == ".json":
        table.write_text(json.dumps([{"Consulta": text, "id": n} for text, n in rows[1:]]))
    else:
        table.write_text("".join(f"{a}\t{b}\n" for a, b in rows))
    counts = run_table(settings, table, tmp_path / "out.jsonl", body={"max_tokens": 2})
    assert counts == Counts(2, 2, 0)
    assert [json.loads(line)["prompt"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == ["Hola", "Adiós"]
