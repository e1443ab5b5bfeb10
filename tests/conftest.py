"""Shared fixtures: a temp FORJA_HOME for every test, a tiny random Llama model built in seconds,
(for `slow` tests) a home where the real bundled model has been converted once, and, when the suite runs
with FORJA_TEST_DATABASE=postgresql, a throw-away PostgreSQL cluster that every store opened points at."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tests compare served answers with PyTorch's own; the llama.cpp backend is tested where asked for.
os.environ.setdefault("FORJA_SERVE__BACKEND", "pytorch")

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. La capital de Francia es París.",
    "Forja trains a small language model on your own data and serves it.",
    "¿Cuál es el horario de la panadería? Abrimos de lunes a sábado, de 7 a 14 h.",
    "Hello, how can I help you today? Hola, ¿en qué puedo ayudarte hoy?",
    "Ñandú, pingüino, acción, corazón — ünïcödé テスト 🚀",
] * 20


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (any UTF-8 text encodes) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_model(directory: Path, seed: int = 0, context: int = 256) -> Path:
    """A randomly initialised 2-layer Llama with the tiny tokenizer, saved as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


# `make test` runs the whole suite on SQLite, then the suites that talk to the store once more with
# FORJA_TEST_DATABASE=postgresql: every module and every test gets a database of its own on one cluster.
TEST_DATABASE = os.environ.get("FORJA_TEST_DATABASE", "sqlite")
# PostgreSQL 16 with pgvector from the pgserver wheel (the test extra installs it: Debian 12 packages no pgvector
# for its PostgreSQL 15), which knowledge collections on PostgreSQL need; Debian's 15 without it, found by the
# test that names what is missing.
DEBIAN_POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def _pgserver_bin() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # found, not imported: only its binaries are used
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" if spec else None


POSTGRES_BIN = _pgserver_bin() or DEBIAN_POSTGRES_BIN


class PostgresCluster:
    """A PostgreSQL cluster in a temp dir (initdb, pg_ctl start on a free port, its unix socket in that dir),
    run as an unprivileged user when the tests run as root (initdb refuses root). Durability is switched off:
    nothing in it outlives the session."""

    def __init__(self, directory: Path, bin: Path = POSTGRES_BIN):
        import pwd
        import socket

        if not (bin / "initdb").exists():
            pytest.fail(f"PostgreSQL is missing ({bin}): run `make install-test` (pip install pgserver, "
                        "apt-get install postgresql)")
        self.bin = bin
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            nobody = pwd.getpwnam("nobody")
            os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._run("initdb", "-D", str(self.data), "-U", "forja", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        options = (f"-p {self.port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                   "-c wal_level=minimal -c max_wal_senders=0 -c max_wal_size=64MB -c min_wal_size=32MB")
        self.options = options
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True,
                       cwd=self.directory)

    def start(self) -> None:
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", self.options)

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def running(self) -> bool:
        import subprocess

        return subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "status", "-D", str(self.data)],
                              capture_output=True, cwd=self.directory).returncode == 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://forja@/{database}?host={self.directory}&port={self.port}"

    def _admin(self):
        import psycopg

        return psycopg.connect(host=str(self.directory), port=self.port, user="forja", dbname="postgres",
                               autocommit=True)

    def create_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import uuid

        name = f"t_{uuid.uuid4().hex[:16]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a test's database unless something still holds a connection to it (a server the test started
        lives to the end of the session): the cluster stays small, however many tests ran."""
        name = url.split("/")[3].split("?")[0]
        with self._admin() as conn:
            if not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def pytest_collection_modifyitems(config, items):
    if TEST_DATABASE == "postgresql":
        skip = pytest.mark.skip(reason="reads the SQLite file itself; run on SQLite by the first pass of make test")
        for item in items:
            if "sqlite" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """The session's PostgreSQL cluster (started on first use, in either mode), stopped at the end."""
    cluster = new_cluster()
    yield cluster
    cluster.stop()
    import shutil

    shutil.rmtree(cluster.directory, ignore_errors=True)


def new_cluster(bin: Path = POSTGRES_BIN) -> PostgresCluster:
    """A started cluster in a directory of its own: a short path (a unix socket's path must stay under ~100
    bytes), in memory where there is a tmpfs (thousands of small files written and removed are seconds there,
    minutes on a busy disk), that `nobody` can reach."""
    import tempfile

    shm = Path("/dev/shm")
    return PostgresCluster(Path(tempfile.mkdtemp(prefix="forja-pg-", dir=shm if os.access(shm, os.W_OK) else None)), bin)


@pytest.fixture(scope="module", autouse=True)
def module_database(request):
    """On PostgreSQL, a database for the module: its module-scoped servers keep it for all its tests."""
    if TEST_DATABASE != "postgresql":
        yield None
        return
    url = request.getfixturevalue("postgres").create_database()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORJA_DATABASE_URL", url)
        yield url


@pytest.fixture
def new_database(request, tmp_path):
    """new_database() → the URL of a new, empty database on the engine the suite runs on: a SQLite file,
    or a PostgreSQL database."""
    made: list[str] = []

    def make() -> str:
        if TEST_DATABASE == "postgresql":
            made.append(request.getfixturevalue("postgres").create_database())
        else:
            made.append(f"sqlite:///{tmp_path / f'store-{len(made)}.db'}")
        return made[-1]

    yield make
    if TEST_DATABASE == "postgresql":
        for url in made:
            request.getfixturevalue("postgres").drop_database(url)


@pytest.fixture
def database_url(new_database) -> str:
    """A new, empty database on the engine the suite runs on."""
    return new_database()


@pytest.fixture(autouse=True)
def forja_home(tmp_path, monkeypatch, request) -> Path:
    home = tmp_path / "forja-home"
    monkeypatch.setenv("FORJA_HOME", str(home))
    if TEST_DATABASE == "postgresql":  # a fresh database for what the test opens itself
        monkeypatch.setenv("FORJA_DATABASE_URL", request.getfixturevalue("database_url"))
    monkeypatch.delenv("FORJA_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    # never let a test reach for the network: the hub "endpoint" is a closed local port
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def long_tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model reading 4096 tokens: room for a tool list and a loop's tool results."""
    return build_tiny_model(tmp_path_factory.mktemp("long-tiny-model"), context=4096)


@pytest.fixture(scope="session")
def bundled_home(tmp_path_factory) -> Path:
    """A FORJA_HOME in which the bundled GGUF has been converted once for all slow tests, and exported
    as llama.cpp serves it (serve.gguf_source auto: at serve.gguf_quant)."""
    from forja.config import load_settings
    from forja.engine import llamacpp
    from forja.export import served_gguf
    from forja.models import bundled_gguf, converted_dir

    home = tmp_path_factory.mktemp("bundled-home")
    previous = os.environ.get("FORJA_HOME")
    os.environ["FORJA_HOME"] = str(home)
    try:
        settings = load_settings()
        converted_dir(bundled_gguf("smollm2-135m"), settings)
        if llamacpp.available():
            served_gguf(settings, "smollm2-135m", settings.serve.gguf_quant)
    finally:
        if previous is None:
            os.environ.pop("FORJA_HOME", None)
        else:
            os.environ["FORJA_HOME"] = previous
    return home


class LiveServer:
    """A real uvicorn server on a free port, in a background thread of the test process."""

    def __init__(self, app, ready_path: str | None = "/health", timeout: float = 60.0):
        import socket
        import threading
        import time

        import httpx
        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        while ready_path:
            if httpx.get(self.url + ready_path).status_code != 503:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the test server's model did not load")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def start_server(request):
    """start_server(app) → a LiveServer (stopped at the end of the session); `app` from forja.serve.app.create_app."""
    if TEST_DATABASE == "postgresql":  # set up first, so stopped last: the servers close their stores before
        request.getfixturevalue("postgres")
    servers: list[LiveServer] = []

    def start(app, **kwargs) -> LiveServer:
        servers.append(LiveServer(app, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with larger random weights: its greedy answers vary from prompt to prompt
    (the plain tiny model answers almost every prompt with the same token), so batching tests can
    tell one request's output from another's."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("varied-model")
    shutil.copytree(tiny_model_dir, directory, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(directory)
    return directory


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots (git-ignored)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (never a browser Playwright downloads), one per test module:
    Playwright's sync API keeps an event loop in the main thread while it runs, which later tests'
    asyncio.run() must not find."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run `make install-test` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def answer_alone(loaded, prompt, params):
    """One request on a PyTorch engine of its own (a batch of one, the weights as loaded): what a batched or
    served answer must equal. Returns the engine's Answer (text, finish_reason, usage)."""
    from forja.engine import answer, run_coroutine
    from forja.engine.pytorch import PyTorchEngine

    engine = PyTorchEngine(loaded, max_batch_size=1, pack=False)
    try:
        return run_coroutine(lambda: answer(engine, prompt, params))
    finally:
        engine.close()


def pdf_pages_bytes(*pages: list[str]) -> bytes:
    """A minimal valid PDF with one page per list of lines (Helvetica, ASCII only), written by hand."""
    count = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
                   b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count)), count),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for index, lines in enumerate(pages):
        body = " ".join(f"({line}) Tj 0 -14 Td" for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td {body} ET".encode()
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 3 0 R >> >> >>" % (5 + 2 * index))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out
