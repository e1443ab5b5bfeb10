"""`forja bench knowledge`: how fast a collection is built and searched at 1k, 10k and 100k chunks, on
generated Spanish and English product catalogues written to a temp dir. Per size: indexing chunks/s against
the same chunks embedded alone, the index on disk, peak RSS, hybrid query latency and hit@1/hit@5 of questions
whose answer chunk is known.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forja.bench import _pct
from forja.models import cpu_line
from forja.config import ConfigError, Settings

SIZES = (1_000, 10_000, 100_000)
# Short chunks (about one catalogue paragraph each, 41 tokens on average) keep 100k chunks within reach of 2
# cores; the index does the same work per chunk whatever its length, so the ratio to embedding alone is if
# anything harder to meet with short chunks than with the default 200 tokens. The CLI's default too.
CHUNK_TOKENS = 48
QUERIES = 100
TOP_K = 5
ENTITIES_PER_FILE = 40
# torch's threads: one, as `forja serve` runs it beside llama.cpp (engine/llamacpp.py), where searches are
# served. On these 2 shared cores two OpenMP threads make any other job's burst a stall: one query's
# embedding went from 6 ms to a p95 of 228 ms (one thread: 6.8 ms) and batches from 211 to 28 chunks/s.
THREADS = 1
TARGET_P95_MS = 100.0  # the target at 100k chunks
TARGET_RATIO = 1.20  # indexing takes at most 20% longer than embedding the same chunks alone
COLLECTION = "bench"

SYLLABLES = ("ba be bi bo bu ca ce ci co cu da de di do fa fe fi fo ga ge go gu la le li lo lu ma me mi mo mu "
             "na ne ni no pa pe pi po ra re ri ro ru sa se si so ta te ti to tu va ve vi vo za ze zo").split()
ENDINGS = ("x", "n", "r", "l", "s", "")

# Per fact kind: the sentence in each language, two ways of asking for it, and its value.
FACTS: dict[str, dict[str, Any]] = {
    "weight": {"es": "El {n} pesa {v} kilos", "en": "The {n} weighs {v} kilograms",
               "ask_es": ("¿Cuántos kilos pesa el {n}?", "¿Qué peso tiene el {n}?"),
               "ask_en": ("How heavy is the {n}?", "What does the {n} weigh?"),
               "value": lambda r: f"{r.randint(2, 90)},{r.randint(0, 9)}"},
    "price": {"es": "El {n} cuesta {v} euros", "en": "The {n} costs {v} euros",
              "ask_es": ("¿Cuál es el precio del {n}?", "¿Cuánto vale el {n}?"),
              "ask_en": ("How much is the {n}?", "What is the price of the {n}?"),
              "value": lambda r: str(r.randint(19, 2400))},
    "warranty": {"es": "La garantía del {n} dura {v} meses", "en": "The warranty of the {n} lasts {v} months",
                 "ask_es": ("¿Cuánto tiempo de garantía tiene el {n}?", "¿Cuántos meses está cubierto el {n}?"),
                 "ask_en": ("How long is the {n} guaranteed for?", "For how many months is the {n} covered?"),
                 "value": lambda r: str(r.randint(6, 60))},
    "made_in": {"es": "El {n} se fabrica en {v}", "en": "The {n} is made in {v}",
                "ask_es": ("¿Dónde se fabrica el {n}?", "¿En qué ciudad hacen el {n}?"),
                "ask_en": ("Where is the {n} produced?", "In which city is the {n} built?"),
                "value": lambda r: r.choice(CITIES)},
    "battery": {"es": "La batería del {n} aguanta {v} horas", "en": "The battery of the {n} runs for {v} hours",
                "ask_es": ("¿Cuántas horas dura la batería del {n}?", "¿Qué autonomía tiene el {n}?"),
                "ask_en": ("How long does the battery of the {n} last?", "How many hours does the {n} run unplugged?"),
                "value": lambda r: str(r.randint(2, 72))},
    "colour": {"es": "El {n} se vende en color {v}", "en": "The {n} is sold in {v}",
               "ask_es": ("¿De qué color es el {n}?", "¿En qué color se puede comprar el {n}?"),
               "ask_en": ("What colour is the {n}?", "Which colour does the {n} come in?"),
               "value": lambda r: r.choice(COLOURS)},
    "tank": {"es": "El depósito del {n} tiene {v} litros", "en": "The tank of the {n} holds {v} litres",
             "ask_es": ("¿Qué capacidad tiene el depósito del {n}?", "¿Cuántos litros caben en el {n}?"),
             "ask_en": ("How much does the tank of the {n} hold?", "How many litres fit in the {n}?"),
             "value": lambda r: f"{r.randint(1, 40)},{r.randint(0, 9)}"},
    "support": {"es": "El servicio técnico del {n} atiende en el {v}", "en": "Support for the {n} answers at {v}",
                "ask_es": ("¿A qué teléfono llamo si se estropea el {n}?", "¿Cuál es el número de asistencia del {n}?"),
                "ask_en": ("Which number do I call when the {n} breaks?", "What is the helpline of the {n}?"),
                "value": lambda r: f"{r.randint(600, 999)} {r.randint(100, 999)} {r.randint(100, 999)}"},
}
CITIES = ("Zaragoza", "Teruel", "Oviedo", "Cádiz", "Lugo", "Murcia", "Segovia", "Huesca", "Bilbao", "Valencia",
          "Leeds", "Porto", "Lyon", "Turín", "Gdansk", "Tarragona", "Cuenca", "Soria", "Jaén", "Girona")
COLOURS = ("rojo", "azul", "verde", "negro", "blanco", "gris", "amarillo", "naranja", "morado", "granate")
# Filler: sentences of the catalogue's register, from parts combined at random, so the keyword index has
# posting lists of every length and no two paragraphs read the same.
FILLER = {
    "es": (("Cada unidad", "El equipo", "Este aparato", "La pieza", "El modelo", "La carcasa"),
           ("se revisa", "se limpia", "se guarda", "se envía", "se ajusta", "se prueba", "se monta"),
           ("a mano", "en el taller", "con cuidado", "antes de salir", "cada temporada", "sin herramientas"),
           ("para la cocina.", "para el jardín.", "en invierno.", "junto al horno.", "por la mañana.", "en la obra.")),
    "en": (("Each unit", "The device", "This appliance", "The part", "The model", "The casing"),
           ("is checked", "is cleaned", "is stored", "is shipped", "is adjusted", "is tested", "is assembled"),
           ("by hand", "in the workshop", "with care", "before it leaves", "every season", "without tools"),
           ("for the kitchen.", "for the garden.", "in winter.", "next to the oven.", "in the morning.", "on site.")),
}
LOOKALIKE = {"es": "Se parece al {o}, pero no es igual.", "en": "It looks like the {o}, but it is not the same."}


@dataclass(frozen=True)
class KnownAnswer:
    """A question and the sentence its answer chunk must contain."""

    question: str
    fact: str


def write_catalogues(folder: Path, chunks: int, seed: int = 0) -> list[KnownAnswer]:
    """Markdown catalogues, half Spanish and half English, of about `chunks` paragraphs (one chunk each at
    CHUNK_TOKENS): a product per section, three facts about it in three paragraphs. Returns a question for
    every fact."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    entities = max(1, round(chunks / 3))
    names = _names(rng, entities)
    answers: list[KnownAnswer] = []
    for number, start in enumerate(range(0, entities, ENTITIES_PER_FILE)):
        lang = "es" if number % 2 == 0 else "en"
        lines = [f"# {'Catálogo' if lang == 'es' else 'Catalogue'} {number + 1}", ""]
        for name in names[start:start + ENTITIES_PER_FILE]:
            lines += [f"## {name}", ""]
            for kind in rng.sample(sorted(FACTS), 3):
                fact = FACTS[kind]
                sentence = fact[lang].format(n=name, v=fact["value"](rng))
                paragraph = [sentence + ".", _filler(rng, lang)]
                if rng.random() < 0.3:  # another product named in passing: its name alone is not the answer
                    paragraph.append(LOOKALIKE[lang].format(o=rng.choice(names)))
                lines += [" ".join(paragraph), ""]
                answers.append(KnownAnswer(rng.choice(fact[f"ask_{lang}"]).format(n=name), sentence))
        (folder / f"catalogue-{number + 1:05d}.md").write_text("\n".join(lines), encoding="utf-8")
    return answers


def _names(rng: random.Random, count: int) -> list[str]:
    names: dict[str, None] = {}
    while len(names) < count:
        parts = rng.choices(SYLLABLES, k=rng.choice((2, 3, 3)))
        names["".join(parts).capitalize() + rng.choice(ENDINGS)] = None
    return list(names)


def _filler(rng: random.Random, lang: str) -> str:
    return " ".join(rng.choice(part) for part in FILLER[lang])


# ------------------------------------------------------------------------------------------------ measure


def knowledge_benchmark(settings: Settings, sizes: list[int] | None = None, *, chunk_tokens: int = CHUNK_TOKENS,
                        queries: int = QUERIES, threads: int | None = THREADS, random_vectors: bool = False,
                        alone_every: int = 1, sqlite_vec: bool = False,
                        log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Per size, in a fresh FORJA_HOME under a temp dir (knowledge in it, or where knowledge.store says: in
    PostgreSQL with database_url set, best an empty database): write the catalogues, `add` them as one collection
    file by file, each file's chunks also embedded alone, then ask `queries` known-answer questions, each
    searched top 5. `threads`: torch's (None: its default, one per core). `random_vectors`: chunks get random
    unit vectors instead of MiniLM's (queries are still embedded): the index and the search at a size whose
    embedding would take hours, without the embedding; nothing is embedded alone then. `alone_every`: only
    every n-th file is also embedded alone, and the ratio is that of those files. `sqlite_vec`: the road not
    taken, measured beside the one taken: the same vectors in a sqlite-vec table, ranked by it (SQLite store only)."""
    import torch

    from forja.embeddings import embed
    from forja.knowledge.index import store_kind

    if sqlite_vec:
        if store_kind(settings) != "sqlite":
            raise ConfigError("--sqlite-vec compares with the SQLite index: unset database_url or set knowledge.store: sqlite")
        _open_sqlite_vec(":memory:")  # its one-line error before anything is indexed
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        embed(["warm-up: load the embedding model before anything is timed"])
        report: dict[str, Any] = {"cpu": cpu_line(), "store": _store(settings), "torch_threads": torch.get_num_threads(), "chunk_tokens": chunk_tokens,
                                  "top_k": TOP_K, "random_vectors": random_vectors, "alone_every": alone_every,
                                  "target_p95_ms": TARGET_P95_MS, "target_ratio": TARGET_RATIO,
                                  "load_average": [os.getloadavg()[0]], "sizes": []}
        for size in sizes or SIZES:
            with tempfile.TemporaryDirectory(prefix="forja-bench-knowledge-") as tmp:
                report["sizes"].append(_one_size(settings, Path(tmp), size, chunk_tokens, queries, random_vectors,
                                                 alone_every, sqlite_vec, log))
            report["load_average"].append(os.getloadavg()[0])
    finally:
        torch.set_num_threads(before)  # the caller's setting, as it was
    return report


def _one_size(settings: Settings, tmp: Path, size: int, chunk_tokens: int, queries: int, random_vectors: bool,
              alone_every: int, sqlite_vec: bool, log: Callable[[str], Any]) -> dict[str, Any]:
    import numpy as np

    from forja.embeddings import embed
    from forja.knowledge import add, collections, remove, search
    from forja.knowledge.chunks import embedding_text
    from forja.knowledge.index import file_chunks, index_bytes, open_index, store_kind

    home = tmp / "home"
    local = settings.model_copy(update={"home": home, "knowledge": settings.knowledge.model_copy(
        update={"chunk_tokens": chunk_tokens, "overlap_tokens": min(settings.knowledge.overlap_tokens, chunk_tokens // 4)})})
    if any(c.name == COLLECTION for c in collections(local)):  # in PostgreSQL, left by a run stopped midway
        remove(local, COLLECTION)
    answers = write_catalogues(tmp / "docs", size)
    files = sorted((tmp / "docs").iterdir())
    log(f"{size} chunks: indexing {len(files)} catalogues"
        + (", random vectors ..." if random_vectors else ", each then embedded alone ..." if alone_every == 1
           else f", every {alone_every}th then embedded alone ..."))
    # File by file, each indexed and then its chunks embedded alone, so that both see the same load from
    # whatever else runs on the machine; the sums are compared.
    _reset_peak_rss()
    index_seconds = embed_seconds = compared_seconds = 0.0
    texts: list[str] = []
    compared = 0  # chunks of the files also embedded alone
    for number, path in enumerate(files, 1):
        started = time.perf_counter()
        with _random_chunk_vectors(random_vectors, seed=number):
            add(local, COLLECTION, [path])
        took = time.perf_counter() - started
        index_seconds += took
        alone = [embedding_text(c) for c in file_chunks(local, COLLECTION, path)]  # what `add` embedded
        if not random_vectors and (number - 1) % alone_every == 0:
            started = time.perf_counter()
            embed(alone)
            embed_seconds += time.perf_counter() - started
            compared_seconds += took
            compared += len(alone)
        texts += alone
        if number % 50 == 0:
            log(f"{size} chunks: {number}/{len(files)} files, {len(texts)} chunks; indexing {index_seconds:.0f}s"
                + ("" if random_vectors else f", embedding alone {embed_seconds:.0f}s"))
    index_peak = _peak_rss()
    disk = index_bytes(local)

    asked = random.Random(1).sample(answers, min(queries, len(answers)))
    log(f"{size} chunks: {len(asked)} known-answer questions, top {TOP_K} ...")
    started = time.perf_counter()
    search(local, COLLECTION, asked[0].question, TOP_K)  # on SQLite the first reads the vectors into memory
    cold_ms = (time.perf_counter() - started) * 1000
    latencies, parts, ranks = [], {"embed_ms": [], "vectors_ms": [], "keywords_ms": []}, []
    if local.knowledge.reranker:  # knowledge.reranker re-scores the best rerank_candidates of every search
        parts["rerank_ms"] = []
    for answer in asked:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        hits = search(local, COLLECTION, answer.question, TOP_K, timings=timings)
        latencies.append((time.perf_counter() - started) * 1000)
        for name in parts:
            parts[name].append(timings[name])
        ranks.append(next((rank for rank, hit in enumerate(hits, 1) if answer.fact in hit.text), None))
    compared_with: dict[str, Any] = {}
    postgresql = store_kind(local) == "postgresql"
    if sqlite_vec or postgresql:  # the questions' vectors once, for the comparisons below
        with open_index(local) as index:
            model = index.collection(COLLECTION)[1]
        vectors = embed([a.question for a in asked], model=model, kind="query").numpy().astype(np.float32)
        if sqlite_vec:
            compared_with["sqlite_vec"] = _sqlite_vec_side(local, tmp, vectors, log)
        if postgresql:  # HNSW is approximate: how many of the exact nearest candidates it returns
            compared_with["hnsw_recall"] = _hnsw_recall(local, vectors)
    remove(local, COLLECTION)  # the temp home goes with the size; a PostgreSQL database stays
    return {
        "size": size, "chunks": len(texts), "files": len(files),
        "mean_chunk_tokens": round(statistics.mean(_tokens(texts[:2000])), 1),
        "index_seconds": round(index_seconds, 2), "index_chunks_per_s": round(len(texts) / index_seconds, 1),
        "embedded_alone_chunks": compared, "embed_seconds": round(embed_seconds, 2) if embed_seconds else None,
        "embed_chunks_per_s": round(compared / embed_seconds, 1) if embed_seconds else None,
        # over the files also embedded alone (all of them unless alone_every > 1)
        "index_over_embed": round(compared_seconds / embed_seconds, 3) if embed_seconds else None,
        "index_bytes": disk, "peak_rss_bytes": max(index_peak, _peak_rss()), "index_peak_rss_bytes": index_peak,
        "queries": len(asked), "cold_query_ms": round(cold_ms, 1),
        "query_ms_p50": round(_pct(latencies, 50), 1), "query_ms_p95": round(_pct(latencies, 95), 1),
        **{f"{name}_p50": round(_pct(values, 50), 2) for name, values in parts.items()},
        **{f"{name}_p95": round(_pct(values, 95), 2) for name, values in parts.items()},
        "hit_at_1": sum(r == 1 for r in ranks) / len(ranks),
        "hit_at_5": sum(r is not None for r in ranks) / len(ranks),
        "missed": [a.question for a, r in zip(asked, ranks) if r is None][:5],
        **compared_with,
    }


def _hnsw_recall(settings: Settings, vectors: Any) -> float:
    """On PostgreSQL: the share of the exact nearest `knowledge.candidates` (every row compared) that the HNSW
    index returned for the same query vectors, averaged over the questions."""
    from forja.knowledge.index import open_index

    limit = settings.knowledge.candidates
    with open_index(settings) as index:
        collection_id = index.collection(COLLECTION)[0]
        found = []
        for vector in vectors:
            approximate = {c for c, _ in index.vector_ranking(collection_id, vector, limit)}
            exact = {c for c, _ in index.vector_ranking(collection_id, vector, limit, exact=True)}
            found.append(len(approximate & exact) / max(1, len(exact)))
    return round(statistics.mean(found), 4)


def _open_sqlite_vec(path: str) -> Any:
    """An apsw connection with sqlite-vec loaded (Python's own sqlite3 is often built without extension loading,
    as on this machine's), or the one-line error naming what to install."""
    try:
        import apsw
        import sqlite_vec
    except ImportError:
        raise ConfigError("--sqlite-vec needs the bench extra: pip install -e '.[bench]' (apsw, sqlite-vec)") from None
    db = apsw.Connection(path)
    db.enable_load_extension(True)
    db.load_extension(sqlite_vec.loadable_path())
    db.enable_load_extension(False)
    return db


def _sqlite_vec_side(settings: Settings, tmp: Path, vectors: Any, log: Callable[[str], Any]) -> dict[str, Any]:
    """The collection's vectors copied into a sqlite-vec `vec0` table in a file of its own, and the same query
    vectors ranked by it and by forja's index (numpy over the vectors it keeps in memory), alternated, for the
    same number of candidates: time to insert, size on disk, first query on a fresh connection, p50/p95,
    and how many of each ranking's candidates the other also returned (both are exact: 100% unless ties)."""
    from forja.knowledge.index import db_path
    from forja.knowledge.sqlite_index import SQLiteIndex

    limit = settings.knowledge.candidates
    with SQLiteIndex(db_path(settings)) as index:
        collection_id, _, dimensions, _ = index.collection(COLLECTION)
        ids, matrix = index.vectors(collection_id)
        log(f"{len(ids)} chunks: the same vectors into sqlite-vec ...")
        path = tmp / "sqlite-vec.db"
        db = _open_sqlite_vec(str(path))
        db.execute(f"CREATE VIRTUAL TABLE chunks USING vec0(embedding float[{dimensions}] distance_metric=cosine)")
        started = time.perf_counter()
        with db:  # one transaction
            db.executemany("INSERT INTO chunks (rowid, embedding) VALUES (?, ?)",
                           ((int(i), matrix[n].tobytes()) for n, i in enumerate(ids)))
        insert_seconds = time.perf_counter() - started
        db.close()
        query = "SELECT rowid FROM chunks WHERE embedding MATCH ? AND k = ? ORDER BY distance"
        db = _open_sqlite_vec(str(path))  # a fresh connection: its first query reads the table
        started = time.perf_counter()
        db.execute(query, (vectors[0].tobytes(), limit)).fetchall()
        cold_ms = (time.perf_counter() - started) * 1000
        ours, theirs, agree = [], [], []
        for vector in vectors:
            started = time.perf_counter()
            mine = [c for c, _ in index.vector_ranking(collection_id, vector, limit)]
            ours.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            other = [r[0] for r in db.execute(query, (vector.tobytes(), limit))]
            theirs.append((time.perf_counter() - started) * 1000)
            agree.append(len(set(mine) & set(other)) / max(1, len(mine)))
        db.close()
    return {
        "candidates": limit, "insert_seconds": round(insert_seconds, 2),
        "insert_per_s": round(len(ids) / insert_seconds, 1) if insert_seconds else None,
        "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith(path.name)),
        "cold_query_ms": round(cold_ms, 1),
        "query_ms_p50": round(_pct(theirs, 50), 2), "query_ms_p95": round(_pct(theirs, 95), 2),
        "numpy_ms_p50": round(_pct(ours, 50), 2), "numpy_ms_p95": round(_pct(ours, 95), 2),
        "numpy_matrix_bytes": int(matrix.nbytes), "agreement": round(statistics.mean(agree), 4),
    }


@contextmanager
def _random_chunk_vectors(on: bool, seed: int) -> Iterator[None]:
    """While `add` runs: random unit vectors for its chunks instead of MiniLM's (`add` looks up
    forja.embeddings.embed when called); the query's embedding, after, is the real one."""
    if not on:
        yield
        return
    import numpy as np
    import torch

    from forja import embeddings

    real, rng = embeddings.embed, np.random.default_rng(seed)

    def random_embed(texts: list[str], batch_size: int = 32, **_: Any) -> Any:
        vectors = rng.standard_normal((len(texts), embeddings.EMBEDDING_DIMENSIONS)).astype(np.float32)
        return torch.from_numpy(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))

    embeddings.embed = random_embed
    try:
        yield
    finally:
        embeddings.embed = real


def _store(settings: Settings) -> str:
    """Where the bench's collection lives: SQLite in its temp home, or the configured PostgreSQL (database_url)."""
    from forja.knowledge.index import store_kind
    from forja.store import safe_url

    return f"PostgreSQL {safe_url(settings.database)}" if store_kind(settings) == "postgresql" else "SQLite"


def _tokens(texts: list[str]) -> list[int]:
    from forja.embeddings import count_tokens

    return count_tokens(texts)


def _reset_peak_rss() -> None:
    """Linux forgets the process's peak RSS (VmHWM) when told 5 in clear_refs, so each size has its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's since it started


def _peak_rss() -> int:
    from forja.train import peak_rss_mb

    return int(peak_rss_mb() * 2**20)


def parse_sizes(text: str) -> list[int]:
    """'1k,10k,100k' or '1000,10000' → [1000, 10000]."""
    sizes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            sizes.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
        except ValueError:
            raise ConfigError(f"--sizes {text!r}: {part!r} is not a chunk count (write e.g. 1k,10k,100k)") from None
        if sizes[-1] < 3:
            raise ConfigError(f"--sizes {text!r}: {part!r} is too small (at least 3 chunks)")
    if not sizes:
        raise ConfigError("--sizes is empty (write e.g. 1k,10k,100k)")
    return sizes


# ------------------------------------------------------------------------------------------------ report


def render_knowledge(report: dict[str, Any]) -> str:
    sizes = report["sizes"]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(s) for s in sizes) + " |"

    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    def p95(s: dict[str, Any]) -> str:
        verdict = "" if s["chunks"] < 50_000 else " yes" if s["query_ms_p95"] < TARGET_P95_MS else " NO"
        return f"{s['query_ms_p50']:.1f} / {s['query_ms_p95']:.1f} ms{verdict}"

    load = ", ".join(f"{x:.2f}" for x in report["load_average"])
    return "\n".join([
        f"forja bench knowledge: generated Spanish and English catalogues, chunks of at most {report['chunk_tokens']} "
        f"tokens, top {report['top_k']}, torch threads {report['torch_threads']}, index in {report['store']}"
        + ("; RANDOM chunk vectors (the index and search without MiniLM's; hits from keywords)"
           if report["random_vectors"] else "") + f"; CPU: {report['cpu']}; "
        f"load average (1 min) before and after each size: {load}",
        "| what | " + " | ".join(f"{s['size']:,}" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
        row("chunks (files; mean tokens)", lambda s: f"{s['chunks']:,} ({s['files']}; {s['mean_chunk_tokens']})"),
        row("indexing, chunks/s", lambda s: f"{s['index_chunks_per_s']:.1f} ({s['index_seconds']:.1f} s)"),
        row("the same chunks embedded alone, chunks/s" + (f" (every {report['alone_every']}th file's)"
                                                           if report["alone_every"] > 1 else ""),
            lambda s: f"{s['embed_chunks_per_s']:.1f} ({s['embedded_alone_chunks']:,} in {s['embed_seconds']:.1f} s)"
            if s["embed_seconds"] else "–"),
        row(f"indexing time / embedding alone (target ≤ {TARGET_RATIO:.2f})",
            lambda s: "–" if s["index_over_embed"] is None else
            f"{s['index_over_embed']:.2f} {'yes' if s['index_over_embed'] <= TARGET_RATIO else 'NO'}"),
        row("index on disk", lambda s: mib(s["index_bytes"])),
        row("peak RSS (indexing; with the searches)", lambda s: f"{mib(s['index_peak_rss_bytes'])}; {mib(s['peak_rss_bytes'])}"),
        row("first query (on SQLite it reads the vectors)", lambda s: f"{s['cold_query_ms']:.1f} ms"),
        row(f"hybrid query p50 / p95 (target p95 < {TARGET_P95_MS:.0f} ms at 100k)", p95),
        row("  embedding the query p50 / p95", lambda s: f"{s['embed_ms_p50']:.1f} / {s['embed_ms_p95']:.1f} ms"),
        row("  vector ranking p50 / p95", lambda s: f"{s['vectors_ms_p50']:.1f} / {s['vectors_ms_p95']:.1f} ms"),
        row("  keyword ranking p50 / p95", lambda s: f"{s['keywords_ms_p50']:.1f} / {s['keywords_ms_p95']:.1f} ms"),
        *([row("  re-ranking p50 / p95", lambda s: f"{s['rerank_ms_p50']:.1f} / {s['rerank_ms_p95']:.1f} ms")]
          if "rerank_ms_p50" in sizes[0] else []),
        row("known answers: hit@1 / hit@5", lambda s: f"{s['hit_at_1']:.0%} / {s['hit_at_5']:.0%} of {s['queries']}"),
        *([row("HNSW recall: the exact nearest candidates it returned", lambda s: f"{s['hnsw_recall']:.1%}")]
          if "hnsw_recall" in sizes[0] else []),
        *(_sqlite_vec_rows(row, mib) if "sqlite_vec" in sizes[0] else []),
    ])


def _sqlite_vec_rows(row: Callable[..., str], mib: Callable[[int], str]) -> list[str]:
    def v(s: dict[str, Any]) -> dict[str, Any]:
        return s["sqlite_vec"]

    return [
        row("sqlite-vec beside it: the vectors inserted, vectors/s", lambda s: f"{v(s)['insert_per_s']:,.0f} ({v(s)['insert_seconds']:.1f} s)"),
        row("  its table on disk; forja's matrix in memory", lambda s: f"{mib(v(s)['bytes'])}; {mib(v(s)['numpy_matrix_bytes'])}"),
        row("  its first query (a fresh connection)", lambda s: f"{v(s)['cold_query_ms']:.1f} ms"),
        row("  nearest candidates p50 / p95: sqlite-vec; forja's numpy", lambda s: f"{v(s)['query_ms_p50']:.1f} / "
            f"{v(s)['query_ms_p95']:.1f} ms; {v(s)['numpy_ms_p50']:.1f} / {v(s)['numpy_ms_p95']:.1f} ms"),
        row("  the same candidates (both exact)", lambda s: f"{v(s)['agreement']:.1%} of {v(s)['candidates']}"),
    ]
