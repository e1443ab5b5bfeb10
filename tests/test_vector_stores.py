"""/v1/files and /v1/vector_stores through the official `openai` client against uvicorn: uploads checked for
their purpose, knowledge collections as vector stores (made over REST or with `forja knowledge add`), search
with the uploaded filename, detaching and deleting, the size limit, unknown ids, admin keys, and the
multipart reader fed in chunks of every size."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
from conftest import TEST_DATABASE
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.serve.app import create_app
from forja.serve.deps import ApiError
from forja.serve.uploads import _Parser

ADMIN_KEY = "admin-key-0123456789abcdef"
USER_KEY = "user-key-0123456789abcdef"
MAX_BYTES = 100_000
MAX_BODY_BYTES = 16_384  # serve.max_body_bytes, far below files.max_bytes: uploads are held to the latter only

FILLER = ("The workshop keeps every manual in a grey binder by the door, and the binder is checked each spring "
          "so that the pages match the machines on the floor. ")
MANUAL = f"""# Zentrix 9 service manual

{FILLER * 3}

## Valves

The Quorvane valve of the Zentrix 9 must be replaced every 613 operating hours, with the press switched off.

## Lubrication

{FILLER * 2} Grease the main spindle with Vantoline paste once a fortnight.
"""
SHOP = "# Shop notes\n\nThe Kelderhof shop sells Zentrix spare belts at 27 euros each, on Thursdays only.\n"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, start_server):
    home = tmp_path_factory.mktemp("vector-stores-home")
    keys = [{"name": "ana", "key": USER_KEY}, {"name": "root", "key": ADMIN_KEY, "admin": True}]
    settings = load_settings(home=home, model=str(tiny_model_dir), dtype="float32", files={"max_bytes": MAX_BYTES},
                             serve={"api_keys": keys, "max_body_bytes": MAX_BODY_BYTES})
    server = start_server(create_app(settings, str(tiny_model_dir)))
    server.settings = settings
    return server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def wait_indexed(client, vector_store_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (store := client.vector_stores.retrieve(vector_store_id)).status == "in_progress":
        assert time.monotonic() < deadline, "indexing did not finish"
        time.sleep(0.1)
    return store


def chunk_rows(served, file_id: str) -> int:
    """The file's chunks in the knowledge index, read straight from its database (SQLite's, or PostgreSQL's)."""
    if TEST_DATABASE == "postgresql":
        engine = sa.create_engine(served.settings.database)
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM knowledge_chunks c JOIN knowledge_files f "
                                            "ON f.id = c.file_id WHERE f.path LIKE :path"),
                                    {"path": f"%/{file_id}/%"}).scalar_one()
        finally:
            engine.dispose()
    db = sqlite3.connect(served.settings.knowledge_dir / "knowledge.db")
    try:
        return db.execute("SELECT count(*) FROM chunks c JOIN files f ON f.id = c.file_id WHERE f.path LIKE ?",
                          (f"%/{file_id}/%",)).fetchone()[0]
    finally:
        db.close()


def test_an_uploaded_fact_is_found_first_with_its_filename_and_gone_once_the_file_is_deleted(client, served, tmp_path):
    manual = write(tmp_path, "zentrix-manual.md", MANUAL)
    uploaded = client.files.create(file=manual.open("rb"), purpose="assistants")
    assert (uploaded.object, uploaded.filename, uploaded.purpose, uploaded.bytes) == (
        "file", "zentrix-manual.md", "assistants", len(MANUAL.encode()))
    assert client.files.retrieve(uploaded.id).filename == "zentrix-manual.md"
    assert client.files.content(uploaded.id).read() == manual.read_bytes()
    assert uploaded.id in [f.id for f in client.files.list(purpose="assistants")]

    store = client.vector_stores.create(name="zentrix", file_ids=[uploaded.id])
    assert store.id == "vs_zentrix" and store.name == "zentrix" and store.file_counts.total == 1
    attached = client.vector_stores.files.poll(uploaded.id, vector_store_id=store.id)
    assert attached.status == "completed" and attached.last_error is None
    shop = client.vector_stores.files.upload_and_poll(vector_store_id=store.id,
                                                      file=write(tmp_path, "shop.md", SHOP).open("rb"))
    assert shop.status == "completed"
    store = client.vector_stores.retrieve(store.id)
    assert (store.status, store.file_counts.completed, store.file_counts.total) == ("completed", 2, 2)

    results = client.vector_stores.search(store.id, query="How often must the Quorvane valve be changed?",
                                          max_num_results=3).data
    best = results[0]
    assert (best.file_id, best.filename) == (uploaded.id, "zentrix-manual.md")
    assert "613 operating hours" in best.content[0].text and best.content[0].type == "text"
    assert best.attributes["headings"] == "Zentrix 9 service manual > Valves"
    start, end = int(best.attributes["start"]), int(best.attributes["end"])  # the client reads numbers as floats
    assert MANUAL[start:end] == best.content[0].text
    read = client.vector_stores.files.content(uploaded.id, vector_store_id=store.id).data
    assert [(part.type, part.text) for part in read] == [("text", MANUAL)]
    assert 0 < best.score <= 1 and best.score >= max(r.score for r in results)
    assert str(served.settings.home) not in str(results)  # sources are named by the uploaded filename

    spare = client.vector_stores.search(store.id, query="price of spare belts", max_num_results=1).data[0]
    assert (spare.filename, spare.file_id) == ("shop.md", shop.id)

    assert client.files.delete(uploaded.id).deleted
    left = client.vector_stores.search(store.id, query="Quorvane valve 613 hours", max_num_results=10).data
    assert left and all(r.file_id != uploaded.id and "613" not in r.content[0].text for r in left)
    assert chunk_rows(served, uploaded.id) == 0
    assert [f.id for f in client.vector_stores.files.list(store.id)] == [shop.id]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)

    assert client.vector_stores.files.delete(shop.id, vector_store_id=store.id).deleted
    assert client.vector_stores.search(store.id, query="spare belts").data == []
    assert client.files.retrieve(shop.id).filename == "shop.md"  # detached, still uploaded


def test_create_and_poll_attaches_an_uploaded_file_and_attributes_come_back_with_results(client, tmp_path):
    uploaded = client.files.create(file=("valves.txt", b"The Brallin gasket is torqued to 19 newton metres."),
                                   purpose="assistants")
    store = client.vector_stores.create(name="gaskets")
    assert store.status == "completed" and store.file_counts.total == 0
    attached = client.vector_stores.files.create_and_poll(uploaded.id, vector_store_id=store.id,
                                                          attributes={"team": "maintenance"})
    assert attached.status == "completed" and attached.vector_store_id == store.id
    hit = client.vector_stores.search(store.id, query="Brallin gasket torque").data[0]
    assert hit.filename == "valves.txt" and hit.attributes["team"] == "maintenance"
    updated = client.vector_stores.files.update(uploaded.id, vector_store_id=store.id, attributes={"team": "night"})
    assert updated.attributes == {"team": "night"}
    assert client.vector_stores.search(store.id, query="Brallin gasket").data[0].attributes["team"] == "night"
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.vector_stores.files.update(uploaded.id, vector_store_id=store.id,
                                          attributes={f"k{i}": i for i in range(17)})
    assert raised.value.param == "attributes"
    renamed = client.vector_stores.update(store.id, name="seals")
    assert (renamed.id, renamed.name, renamed.file_counts.completed) == ("vs_seals", "seals", 1)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store.id)
    assert client.vector_stores.delete(renamed.id).deleted
    assert client.files.retrieve(uploaded.id).id == uploaded.id


def test_a_file_batch_uploads_and_indexes_several_files_and_is_polled_to_the_end(client):
    store = client.vector_stores.create(name="batch")
    done = client.vector_stores.file_batches.upload_and_poll(
        store.id, files=[("oven.md", b"# Oven\n\nThe Pelmar oven heats to 260 degrees."),
                         ("mixer.txt", b"The Grunwald mixer has nine speeds.")])
    assert (done.status, done.file_counts.completed, done.file_counts.total) == ("completed", 2, 2)
    assert done.id.startswith("vsfb_") and done.vector_store_id == store.id
    listed = client.vector_stores.file_batches.list_files(done.id, vector_store_id=store.id)
    assert len(listed.data) == 2 and {f.status for f in listed.data} == {"completed"}
    assert client.vector_stores.file_batches.retrieve(done.id, vector_store_id=store.id).status == "completed"
    assert client.vector_stores.file_batches.cancel(done.id, vector_store_id=store.id).status == "completed"
    hit = client.vector_stores.search(store.id, query="how many speeds has the mixer?").data[0]
    assert hit.filename == "mixer.txt"
    with pytest.raises(openai.NotFoundError) as raised:
        client.vector_stores.file_batches.retrieve("vsfb_nope", vector_store_id=store.id)
    assert raised.value.param == "batch_id"
    with pytest.raises(openai.NotFoundError) as raised:
        client.vector_stores.file_batches.create(store.id, file_ids=[listed.data[0].id, "file-nope"])
    assert raised.value.param == "file_ids.1"


def test_a_collection_made_with_the_cli_is_a_vector_store_and_the_other_way_round(client, served, tmp_path):
    notes = write(tmp_path, "press-notes.md", "# Press\n\nThe Ostrava press runs on 400 volt three-phase power.\n")
    runner = CliRunner()
    env = {"FORJA_HOME": str(served.settings.home), "FORJA_DATABASE_URL": served.settings.database}  # the server's
    assert runner.invoke(app, ["knowledge", "add", "press", str(notes)], env=env).exit_code == 0
    listed = {s.id: s for s in client.vector_stores.list()}
    assert "vs_press" in listed and listed["vs_press"].file_counts.completed == 1
    hit = client.vector_stores.search("vs_press", query="Ostrava press voltage").data[0]
    assert hit.filename == "press-notes.md" and hit.file_id.startswith("kfile-")
    assert [f.id for f in client.vector_stores.files.list("vs_press")] == [hit.file_id]

    client.vector_stores.create(name="made-over-rest")
    result = runner.invoke(app, ["knowledge", "list"], env=env)
    assert "made-over-rest" in result.output and "press" in result.output
    assert client.vector_stores.files.delete(hit.file_id, vector_store_id="vs_press").deleted
    assert runner.invoke(app, ["knowledge", "show", "press"], env=env).output.count("press-notes.md") == 0


def test_a_store_deleted_or_a_file_detached_while_it_is_indexed_leaves_nothing_behind(client, served, tmp_path):
    from forja.knowledge import collections, vector_stores

    uploaded = client.files.create(file=write(tmp_path, "manual.md", MANUAL).open("rb"), purpose="assistants")
    store = client.vector_stores.create(name="short-lived", file_ids=[uploaded.id])
    assert client.vector_stores.delete(store.id).deleted
    kept = client.vector_stores.create(name="kept")
    client.vector_stores.files.create(vector_store_id=kept.id, file_id=uploaded.id)
    assert client.vector_stores.files.delete(uploaded.id, vector_store_id=kept.id).deleted
    vector_stores.worker.submit(lambda: None).result()  # the indexing thread has done all it was given
    names = [c.name for c in collections(served.settings)]
    assert "short-lived" not in names and "kept" in names
    assert client.vector_stores.files.list(kept.id).data == [] and chunk_rows(served, uploaded.id) == 0


def test_files_still_queued_when_the_server_stops_are_dropped_and_read_failed(client, served):
    import threading

    from forja.knowledge import vector_stores

    uploaded = client.files.create(file=("queued.md", b"# Queued\n\nThe Harvik drill idles at 300 rpm."),
                                   purpose="assistants")
    store = client.vector_stores.create(name="queued")
    gate = threading.Event()
    busy = vector_stores.worker.submit(gate.wait, 30)  # the worker is busy with a long file
    try:
        assert client.vector_stores.files.create(vector_store_id=store.id, file_id=uploaded.id).status == "in_progress"
        vector_stores.drop_queued(served.settings)  # what the app's lifespan does when the server stops
    finally:
        gate.set()
        busy.result()
    left = client.vector_stores.files.retrieve(uploaded.id, vector_store_id=store.id)
    assert left.status == "failed" and "attach the file again" in left.last_error.message
    assert client.vector_stores.files.create_and_poll(uploaded.id, vector_store_id=store.id).status == "completed"


def test_lists_are_cursor_pages(client):
    for name in ("page-a", "page-b", "page-c"):
        client.vector_stores.create(name=name)
    first = client.vector_stores.list(limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    every = [s.name for s in client.vector_stores.list(limit=2, order="asc")]  # the client follows `after`
    assert [n for n in every if n.startswith("page-")] == ["page-a", "page-b", "page-c"]
    newest = [s.name for s in client.vector_stores.list(order="desc")]
    assert newest.index("page-c") < newest.index("page-a")
    with pytest.raises(openai.BadRequestError) as raised:
        client.vector_stores.list(after="vs_nothing-like-it")
    assert raised.value.param == "after"


def test_a_file_that_cannot_be_read_fails_with_its_name_and_leaves_no_chunk(client, served):
    broken = client.files.create(file=("broken.pdf", b"%PDF-1.4 this is not really a pdf"), purpose="assistants")
    store = client.vector_stores.create(name="broken")
    attached = client.vector_stores.files.create_and_poll(broken.id, vector_store_id=store.id)
    assert attached.status == "failed" and attached.last_error.code == "invalid_file"
    assert "broken.pdf" in attached.last_error.message and str(served.settings.home) not in attached.last_error.message
    store = client.vector_stores.retrieve(store.id)
    assert (store.status, store.file_counts.failed, store.file_counts.completed) == ("completed", 1, 0)
    assert chunk_rows(served, broken.id) == 0
    assert [f.status for f in client.vector_stores.files.list(store.id, filter="failed")] == ["failed"]

    # a file left in progress by a server that stopped is reported failed, never in progress forever
    from forja.store import vector_store_files

    stale = client.files.create(file=("stale.md", b"# Stale"), purpose="assistants")
    with served.app.state.forja.store.engine.begin() as conn:
        conn.execute(vector_store_files.insert().values(collection="broken", file_id=stale.id, created_at=time.time(),
                                                        status="in_progress", attributes={}))
    left = client.vector_stores.files.retrieve(stale.id, vector_store_id=store.id)
    assert left.status == "failed" and "restarted" in left.last_error.message
    assert client.vector_stores.retrieve(store.id).status == "completed"


def test_a_crash_while_indexing_fails_the_file_with_a_server_error_and_indexes_nothing(client, served, monkeypatch):
    from forja import embeddings

    def broken(texts, **_):
        raise RuntimeError("the embedder ran out of memory")

    uploaded = client.files.create(file=("notes.md", b"# Notes\n\nThe Tovik lathe runs at 900 rpm."),
                                   purpose="assistants")
    store = client.vector_stores.create(name="crash")
    monkeypatch.setattr(embeddings, "embed", broken)
    attached = client.vector_stores.files.create_and_poll(uploaded.id, vector_store_id=store.id)
    assert (attached.status, attached.last_error.code) == ("failed", "server_error")
    assert "ran out of memory" in attached.last_error.message and chunk_rows(served, uploaded.id) == 0
    monkeypatch.undo()
    again = client.vector_stores.files.create_and_poll(uploaded.id, vector_store_id=store.id)
    assert again.status == "completed" and client.vector_stores.retrieve(store.id).file_counts.failed == 0


def test_an_upload_over_files_max_bytes_is_a_413_and_leaves_nothing_behind(client, served):
    for size in (MAX_BYTES + 1, MAX_BYTES * 20):  # read until it passes the limit; refused by its length
        with pytest.raises(openai.APIStatusError) as raised:
            client.files.create(file=("big.txt", b"x" * size), purpose="assistants")
        assert raised.value.status_code == 413 and raised.value.code == "file_too_large"
        assert "files.max_bytes" in raised.value.message
    left = served.settings.files_dir / ".incoming" / "file-left-by-a-killed-server"
    left.mkdir(parents=True)
    os.utime(left, (time.time() - 2 * 24 * 3600,) * 2)
    assert client.files.create(file=("fits.txt", b"x" * MAX_BYTES), purpose="assistants").bytes == MAX_BYTES
    assert not any((served.settings.files_dir / ".incoming").iterdir())
    assert "big.txt" not in [f.filename for f in client.files.list()]


def test_a_chunked_upload_without_a_length_is_streamed_to_disk_and_stopped_at_the_limit(served):
    def body(size: int):  # a generator: httpx sends it chunked, with no Content-Length
        yield b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="long.txt"\r\n\r\n'
        for start in range(0, size, 7000):
            yield b"y" * min(7000, size - start)
        yield b"\r\n--xyz--\r\n"

    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "multipart/form-data; boundary=xyz"}
    fits = httpx.post(served.url + "/v1/files", headers=headers, content=body(MAX_BYTES), timeout=60)
    assert fits.status_code == 200 and fits.json()["bytes"] == MAX_BYTES > MAX_BODY_BYTES
    over = httpx.post(served.url + "/v1/files", headers=headers, content=body(MAX_BYTES + 1), timeout=60)
    assert over.status_code == 413 and over.json()["error"]["code"] == "file_too_large"
    assert not any((served.settings.files_dir / ".incoming").iterdir())
    # every other route keeps serve.max_body_bytes
    search = httpx.post(served.url + "/v1/vector_stores/vs_x/search", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        json={"query": "x" * MAX_BODY_BYTES})
    assert search.status_code == 413 and "serve.max_body_bytes" in search.json()["error"]["message"]


def test_a_fine_tune_file_is_read_as_forja_data_reads_it_and_a_bad_row_is_named(client):
    good = b"question,answer\nWhen do you open?,At nine.\nWhere are you?,On the main square.\n"
    assert client.files.create(file=("faq.csv", good), purpose="fine-tune").purpose == "fine-tune"
    bad = (b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
           b'{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("train.jsonl", bad), purpose="fine-tune")
    assert raised.value.param == "file" and raised.value.code == "invalid_file"
    assert raised.value.body["message"].startswith("train.jsonl row 2:") and "assistant" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("train.jsonl", bad.split(b"\n")[0] + b'\n{"prompt_text": "Hi"}\n'),
                            purpose="fine-tune")
    assert raised.value.body["message"].startswith('train.jsonl row 2: field "messages" is missing')
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("faq.csv", good + b"Any parking?,\n"), purpose="fine-tune")
    assert 'faq.csv row 4: column "answer" is empty' in raised.value.message
    batch = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    assert client.files.create(file=("requests.jsonl", batch), purpose="batch").purpose == "batch"
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("requests.jsonl", batch + b"[1, 2]\n"), purpose="batch")
    assert "requests.jsonl line 2: a request is a JSON object" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("notes.rtf", b"{\\rtf1 hi}"), purpose="assistants")
    assert "notes.rtf: unknown file type .rtf" in raised.value.message


def test_an_unknown_purpose_or_a_missing_field_is_a_400_naming_it(served):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reply = httpx.post(served.url + "/v1/files", headers=headers, files={"file": ("a.md", b"# A")},
                       data={"purpose": "vision"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "purpose"
    assert "'vision' is not one of fine-tune, batch, assistants" in reply.json()["error"]["message"]
    reply = httpx.post(served.url + "/v1/files", headers=headers, files={"file": ("a.md", b"# A")})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "purpose"
    reply = httpx.post(served.url + "/v1/files", headers=headers, data={"purpose": "assistants"},
                       files={"other": ("a.md", b"# A")})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "file"
    reply = httpx.post(served.url + "/v1/files", headers=headers, json={"purpose": "assistants"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_form"


def test_unknown_ids_are_404s_naming_the_field(client):
    for call, param in [(lambda: client.files.retrieve("file-nope"), "file_id"),
                        (lambda: client.files.content("file-nope"), "file_id"),
                        (lambda: client.files.delete("file-nope"), "file_id"),
                        (lambda: client.vector_stores.retrieve("vs_nope"), "vector_store_id"),
                        (lambda: client.vector_stores.retrieve("nope"), "vector_store_id"),
                        (lambda: client.vector_stores.search("vs_nope", query="x"), "vector_store_id"),
                        (lambda: client.vector_stores.files.create(vector_store_id="vs_nope", file_id="file-nope"),
                         "vector_store_id"),
                        (lambda: client.vector_stores.create(name="never", file_ids=["file-nope"]), "file_ids.0")]:
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        assert raised.value.param == param
    store = client.vector_stores.create(name="ids")
    for call in (lambda: client.vector_stores.files.retrieve("file-nope", vector_store_id=store.id),
                 lambda: client.vector_stores.files.create(vector_store_id=store.id, file_id="file-nope"),
                 lambda: client.vector_stores.files.delete("file-nope", vector_store_id=store.id)):
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        assert raised.value.param == "file_id"
    assert "never" not in [s.name for s in client.vector_stores.list()]
    with pytest.raises(openai.ConflictError):
        client.vector_stores.create(name="ids")
    with pytest.raises(openai.BadRequestError) as raised:
        client.vector_stores.create(name="two words")
    assert raised.value.param == "name"


def test_without_the_admin_key_every_route_is_refused(served):
    user = openai.OpenAI(base_url=served.url + "/v1", api_key=USER_KEY, max_retries=0)
    anonymous = httpx.Client(base_url=served.url)
    for method, path in [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x/content"),
                         ("GET", "/v1/vector_stores"), ("POST", "/v1/vector_stores"),
                         ("POST", "/v1/vector_stores/vs_x/search"), ("DELETE", "/v1/vector_stores/vs_x/files/f")]:
        assert anonymous.request(method, path).status_code == 401, path
    with pytest.raises(openai.PermissionDeniedError):
        user.files.list()
    with pytest.raises(openai.PermissionDeniedError):
        user.files.create(file=("a.md", b"# A"), purpose="assistants")
    with pytest.raises(openai.PermissionDeniedError):
        user.vector_stores.create(name="nope")


# ------------------------------------------------------------------------------------------------ multipart


def form(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_the_multipart_reader_gives_the_same_parts_in_chunks_of_any_size(tmp_path, size):
    content = b"line one\r\n--not-the-boundary\r\n\r\n" + bytes(range(256)) * 4 + b"\r\n--bound"
    body = form("bound4ry", [("purpose", None, b"assistants"), ("file", "../../etc/x.md", content)])
    parser = _Parser(b"bound4ry", "file", lambda name: tmp_path / str(size) / Path(name).name, 10_000,
                     ApiError(413, "too big"))
    for start in range(0, len(body), size):
        parser.feed(body[start:start + size])
    parser.finish()
    assert parser.upload.fields == {"purpose": "assistants"} and parser.upload.filename == "../../etc/x.md"
    assert parser.upload.path.read_bytes() == content and parser.upload.size == len(content)


def test_the_multipart_reader_takes_an_rfc_5987_filename(tmp_path):
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.md"; '
            b"filename*=UTF-8''na%C3%AFve%20notes.md\r\nContent-Type: text/markdown\r\n\r\n# Hi\r\n--b--")
    parser = _Parser(b"b", "file", lambda name: tmp_path / name, 100, ApiError(413, "too big"))
    parser.feed(body)
    parser.finish()
    assert parser.upload.filename == "naïve notes.md" and parser.upload.path.read_bytes() == b"# Hi"


def test_the_multipart_reader_stops_at_the_limit_and_refuses_a_body_without_its_end(tmp_path):
    parser = _Parser(b"b", "file", lambda name: tmp_path / name, 10, ApiError(413, "too big"))
    with pytest.raises(ApiError) as raised:
        parser.feed(form("b", [("file", "a.txt", b"x" * 11)]))
    assert raised.value.status == 413
    parser = _Parser(b"b", "file", lambda name: tmp_path / name, 10, ApiError(413, "too big"))
    parser.feed(form("b", [("file", "a.txt", b"x")])[:-10])
    with pytest.raises(ApiError) as raised:
        parser.finish()
    assert raised.value.status == 400


def parse(tmp_path, body: bytes, boundary: bytes = b"b", max_bytes: int = 100, size: int | None = None) -> _Parser:
    parser = _Parser(boundary, "file", lambda name: tmp_path / "out" / Path(name).name, max_bytes,
                     ApiError(413, "too big"))
    try:
        for start in range(0, len(body), size or len(body) or 1):
            parser.feed(body[start:start + (size or len(body))])
        parser.finish()
    finally:
        parser.close()
    return parser


@pytest.mark.parametrize("disposition, filename", [
    (b"filename*=UTF-8''%E6%96%87%E4%BB%B6.md", "文件.md"),  # filename*= alone, as urllib3 1.x sent it
    (b"filename*=ISO-8859-1'en'na%EFve.md; filename=\"x.md\"", "naïve.md"),  # Latin-1, filename*= first
    ("filename=\"文件 naïve.md\"".encode(), "文件 naïve.md"),  # raw UTF-8, as httpx and browsers send it
    (b'filename="say \\"hi\\".md"', 'say "hi".md'),
    (b"filename*=nocharset; filename=\"plain.md\"", "plain.md"),  # an unusable filename*= is passed over
])
def test_the_multipart_reader_takes_filenames_as_clients_send_them(tmp_path, disposition, filename):
    body = b'--b\r\nContent-Disposition: form-data; name="file"; ' + disposition + b"\r\n\r\n# Hi\r\n--b--\r\n"
    parser = parse(tmp_path, body)
    assert parser.upload.filename == filename and parser.upload.path.read_bytes() == b"# Hi"


@pytest.mark.parametrize("size", [1, 5, 11, 4096])
def test_the_multipart_reader_stops_at_the_limit_in_chunks_of_any_size(tmp_path, size):
    assert parse(tmp_path, form("b", [("file", "a.txt", b"x" * 10)]), max_bytes=10, size=size).upload.size == 10
    with pytest.raises(ApiError) as raised:
        parse(tmp_path, form("b", [("file", "a.txt", b"x" * 11)]), max_bytes=10, size=size)
    assert raised.value.status == 413


@pytest.mark.parametrize("body, message", [
    (form("b", [(f"f{i}", None, b"v") for i in range(17)]), "more than 16 parts"),
    (b'--b\r\nContent-Disposition: form-data; filename="a.md"\r\n\r\nx\r\n--b--\r\n', "has no name"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n", "no Content-Disposition: form-data"),
    (form("b", [("file", None, b"x")]), "'file' part is not a file (it has no filename)"),
    (form("b", [("file", "a.md", b"x"), ("file", "b.md", b"y")]), "more than one 'file' part"),
    (form("b", [("purpose", None, b"\xff")]), "'purpose' is not UTF-8 text"),
    (form("b", [("purpose", None, b"x" * (64 * 1024 + 1))]), "'purpose' is longer than 65536 bytes"),
    (b"--b\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)) + b"\r\nx\r\n--b--\r\n",
     "headers of a form part are longer than 16384 bytes"),
    (b"--b junk\r\n", "malformed"),
    (form("b", [("purpose", None, b"x")])[:-8], "ends before its closing boundary"),
    (b"", "ends before its closing boundary"),
])
def test_the_multipart_reader_refuses_a_bad_form_with_a_400_naming_why(tmp_path, body, message):
    for size in (1, len(body) or 1):
        with pytest.raises(ApiError) as raised:
            parse(tmp_path, body, size=size)
        assert (raised.value.status, raised.value.code) == (400, "invalid_form") and message in raised.value.message


def test_a_form_without_a_boundary_or_not_multipart_is_a_400_and_a_utf_8_filename_comes_back(served):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for content_type, message in [("multipart/form-data", "names no multipart boundary"),
                                  ('multipart/form-data; boundary=""', "names no multipart boundary"),
                                  ("text/plain; boundary=b", "the body is text/plain, not multipart/form-data")]:
        reply = httpx.post(served.url + "/v1/files", headers={**headers, "Content-Type": content_type},
                           content=form("b", [("purpose", None, b"assistants"), ("file", "a.md", b"# A")]))
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_form"
        assert message in reply.json()["error"]["message"]
    reply = httpx.post(served.url + "/v1/files", headers=headers, files={"file": ("naïve 文件.md", b"# A")},
                       data={"purpose": "assistants"})
    assert reply.status_code == 200 and reply.json()["filename"] == "naïve 文件.md"
    assert not any((served.settings.files_dir / ".incoming").iterdir())
