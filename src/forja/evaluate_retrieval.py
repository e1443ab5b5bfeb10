"""Retrieval evaluation: does a knowledge collection find the chunk that answers each question?

`forja eval --testset FILE --knowledge NAME` (or a test set whose rows name their `collection`) searches every
question and scores where the expected chunk ranks: hit@1, hit@3, hit@5 and MRR, with 95% bootstrap intervals,
written as rows.csv, rows.jsonl, summary.md, summary.json and report.html like `forja eval`'s answers.
A row names the expected `source` (a file name, or the end of its path) and, to pin one chunk of it, any of
`page`, `heading` (in the chunk's heading path) and `fact` (text the chunk must contain).
"""

from __future__ import annotations

import csv
import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forja.config import Settings
from forja.evaluate import HTML_STYLE, EvalError, mean_interval, read_testset_table
from forja.knowledge import Hit, KnowledgeError, search, show

K_VALUES = (1, 3, 5)
DEPTH = 10  # chunks searched per question: MRR counts a find down to rank 10 (1/rank, 0 below)
RETRIEVAL_METRICS = [*(f"hit@{k}" for k in K_VALUES), "mrr"]
METRIC_LABELS = {**{f"hit@{k}": f"hit@{k}" for k in K_VALUES}, "mrr": f"MRR (to rank {DEPTH})"}
ROW_FIELDS = ["case", "question", "collection", "expected", "rank", *RETRIEVAL_METRICS, "found_source",
              "found_headings", "found_text"]


@dataclass
class RetrievalCase:
    """A question and what the chunk that answers it must be: from `source`, and on `page`, under `heading`
    and containing `fact` when those are given."""

    question: str
    collection: str
    source: str
    page: int | None = None
    heading: str | None = None
    fact: str | None = None

    def matches(self, hit: Hit) -> bool:
        source = Path(hit.source).as_posix()
        wanted = self.source.strip().lstrip("./")
        if not (source == self.source or source.endswith("/" + wanted)):
            return False
        if self.page is not None and hit.page != self.page:
            return False
        if self.heading and _folded(self.heading) not in _folded(" > ".join(hit.headings)):
            return False
        return not self.fact or _folded(self.fact) in _folded(hit.text)

    @property
    def expected(self) -> str:
        """The row's expectation in a few words, for the reports."""
        return self.source + (f" p.{self.page}" if self.page is not None else "") + (
            f" › {self.heading}" if self.heading else "") + (f' «{self.fact}»' if self.fact else "")


@dataclass
class RetrievalResult:
    """One row per question (its rank and the chunks found, best first) and the means over the rows."""

    rows: list[dict[str, Any]]
    means: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    depth: int = DEPTH
    testset: str | None = None
    created_at: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def _folded(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


# ---------------------------------------------------------------------------------------------
# Test sets


def is_retrieval_testset(path: str | Path) -> bool:
    """True when the test set's rows name a `source`: they test retrieval, not answers."""
    table = read_testset_table(path)
    if table.columns is not None:
        return "source" in table.columns
    return any("source" in row.values for row in table.rows if hasattr(row, "values"))


def load_retrieval_testset(path: str | Path, collection: str | None = None,
                           question_col: str = "question") -> list[RetrievalCase]:
    """Read a CSV, JSONL or Excel test set of question, source and optional collection, page, heading and
    fact; `collection` (--knowledge) is used for rows that name none. A bad row stops it naming file and row."""
    from forja.data import BadRow

    path = Path(path)
    question_col = question_col.strip().lower()
    cases = []
    for row in read_testset_table(path).rows:
        if isinstance(row, BadRow):
            raise EvalError(row.message)
        where, values = f"{path} {row.label}", row.values
        name = _field(values, "collection", where) or collection
        if not name:
            raise EvalError(f'{where}: no "collection" field and no --knowledge NAME to search')
        page = _field(values, "page", where)
        if page and not page.isdigit():
            raise EvalError(f'{where}: field "page" must be a page number, found {page!r}')
        cases.append(RetrievalCase(
            question=_field(values, question_col, where, required=True), collection=name,
            source=_field(values, "source", where, required=True), page=int(page) if page else None,
            heading=_field(values, "heading", where) or None, fact=_field(values, "fact", where) or None))
    if not cases:
        raise EvalError(f"{path}: the test set has no rows")
    return cases


def _field(values: dict[str, Any], column: str, where: str, required: bool = False) -> str:
    value = values.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise EvalError(f'{where}: field "{column}" is {"empty" if column in values else "missing"}')
        return ""
    if isinstance(value, (dict, list, bool)):
        raise EvalError(f'{where}: field "{column}" must be text, found {type(value).__name__}')
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Excel stores page 3 as 3.0
    return str(value).strip()


def _check_sources(cases: list[RetrievalCase], settings: Settings) -> None:
    """Every expected source is a file of its collection: a misspelt name would otherwise just score 0."""
    files: dict[str, list[str]] = {}
    for number, case in enumerate(cases, 1):
        if case.collection not in files:
            try:
                files[case.collection] = [Path(f.path).as_posix() for f in show(settings, case.collection).files]
            except KnowledgeError as exc:
                raise EvalError(f"test set row {number}: {exc}") from None
        wanted = case.source.strip().lstrip("./")
        if not any(p == case.source or p.endswith("/" + wanted) for p in files[case.collection]):
            names = ", ".join(sorted(Path(p).name for p in files[case.collection])[:10])
            raise EvalError(f"test set row {number}: collection {case.collection!r} has no file named "
                            f"{case.source!r} (its files: {names or 'none'}); forja knowledge show "
                            f"{case.collection} lists them")


# ---------------------------------------------------------------------------------------------
# Running


def evaluate_retrieval(cases: list[RetrievalCase], settings: Settings, depth: int = DEPTH) -> RetrievalResult:
    """Search every question (top `depth`) and score the rank of the first chunk that matches its row."""
    _check_sources(cases, settings)
    started = time.perf_counter()
    rows = []
    for number, case in enumerate(cases, 1):
        hits = search(settings, case.collection, case.question, depth)
        found = [{"rank": rank, "score": hit.score, "source": hit.source, "page": hit.page,
                  "headings": list(hit.headings), "start": hit.start, "end": hit.end, "text": hit.text,
                  "match": case.matches(hit)} for rank, hit in enumerate(hits, 1)]
        rank = next((f["rank"] for f in found if f["match"]), None)
        rows.append({"case": number, "question": case.question, "collection": case.collection,
                     "expected": case.expected, "rank": rank,
                     **{f"hit@{k}": float(rank is not None and rank <= k) for k in K_VALUES},
                     "mrr": 1.0 / rank if rank else 0.0, "hits": found})
    # A grounded-answer score (the model answers from these chunks, a judge checks the answer against them)
    # belongs here: each row's "hits" are the context it would be given.
    means = {m: sum(r[m] for r in rows) / len(rows) for m in RETRIEVAL_METRICS}
    intervals = {m: mean_interval([r[m] for r in rows]) for m in RETRIEVAL_METRICS}
    return RetrievalResult(rows, means, intervals, depth, created_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                           stats={"questions": len(rows), "seconds": round(time.perf_counter() - started, 2)})


def parse_retrieval_thresholds(specs: list[str]) -> dict[str, float]:
    """'hit@5=0.8', 'mrr=0.5' → {"hit@5": 0.8, "mrr": 0.5}; others are refused at once."""
    thresholds = {}
    for spec in specs:
        metric, sep, value = spec.partition("=")
        metric = metric.strip().lower().replace("_at_", "@")
        if not sep or metric not in RETRIEVAL_METRICS:
            raise EvalError(f"--fail-under {spec!r}: a retrieval test set takes METRIC=VALUE with METRIC one of "
                            f"{', '.join(RETRIEVAL_METRICS)}")
        try:
            thresholds[metric] = float(value)
        except ValueError:
            raise EvalError(f"--fail-under {spec!r}: {value.strip()!r} is not a number") from None
    return thresholds


def check_retrieval_thresholds(result: RetrievalResult, thresholds: dict[str, float]) -> list[str]:
    return [f"{metric} mean {result.means[metric]:.3f} < {minimum:g}"
            for metric, minimum in thresholds.items() if result.means[metric] < minimum]


# ---------------------------------------------------------------------------------------------
# Reports


def write_retrieval_reports(result: RetrievalResult, out_dir: Path) -> dict[str, Path]:
    """rows.csv, rows.jsonl (with every chunk found), summary.md, summary.json and report.html in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "rows.csv", "jsonl": out_dir / "rows.jsonl", "markdown": out_dir / "summary.md",
             "json": out_dir / "summary.json", "html": out_dir / "report.html"}
    with paths["jsonl"].open("w", encoding="utf-8") as fh:
        for row in result.rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    with paths["csv"].open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for row in result.rows:
            top = row["hits"][0] if row["hits"] else {}
            writer.writerow({**{k: row[k] for k in ROW_FIELDS if k in row}, "found_source": top.get("source"),
                             "found_headings": " > ".join(top.get("headings", [])), "found_text": top.get("text")})
    summary = {"testset": result.testset, "created_at": result.created_at, "depth": result.depth,
               "means": result.means, "intervals": {m: list(v) for m, v in result.intervals.items()},
               "stats": result.stats}
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_retrieval_markdown(result), encoding="utf-8")
    paths["html"].write_text(render_retrieval_html(result), encoding="utf-8")
    return paths


def _cell(result: RetrievalResult, metric: str) -> str:
    low, high = result.intervals[metric]
    return f"{result.means[metric]:.3f} [{low:.3f}, {high:.3f}]"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _where(hit: dict[str, Any]) -> str:
    return (Path(hit["source"]).name + (f" p.{hit['page']}" if hit["page"] else "")
            + (f" › {' > '.join(hit['headings'])}" if hit["headings"] else "") + f" [{hit['start']}:{hit['end']}]")


def render_retrieval_markdown(result: RetrievalResult) -> str:
    def md(text: Any, limit: int = 90) -> str:
        text = re.sub(r"\s+", " ", "" if text is None else str(text)).strip().replace("|", "\\|")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    collections = sorted({r["collection"] for r in result.rows})
    lines = [f"# Retrieval: {', '.join(collections)}", "",
             f"{len(result.rows)} questions{f' from {result.testset}' if result.testset else ''}, top {result.depth} "
             f"searched (vectors and keywords fused); {result.created_at}.", "",
             "Means with 95% bootstrap confidence intervals:", "", "| metric | mean |", "|---|---|"]
    lines += [f"| {METRIC_LABELS[m]} | {_cell(result, m)} |" for m in RETRIEVAL_METRICS]
    lines += ["", "| # | question | expected | rank | first chunk found |", "|---|---|---|---|---|"]
    for row in result.rows:
        top = row["hits"][0] if row["hits"] else None
        lines.append(f"| {row['case']} | {md(row['question'])} | {md(row['expected'], 60)} | "
                     f"{row['rank'] or f'not in top {result.depth}'} | {md(_where(top), 60) if top else '–'} |")
    lines += ["", f"Stats: {json.dumps(result.stats)}", ""]
    return "\n".join(lines)


def render_retrieval_html(result: RetrievalResult) -> str:
    collections = ", ".join(sorted({r["collection"] for r in result.rows}))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
           f"<title>Forja retrieval evaluation: {_e(collections)}</title><style>{HTML_STYLE}</style></head><body>",
           f"<h1>Retrieval: {_e(collections)}</h1>",
           f'<p class="meta">{len(result.rows)} questions{f" from <code>{_e(result.testset)}</code>" if result.testset else ""}; '
           f"top {result.depth} searched, vectors and keywords fused; {_e(result.created_at)}.</p>",
           '<h2>Means</h2><table id="means"><thead><tr><th>metric</th><th>mean [95% interval]</th></tr></thead><tbody>']
    out += [f'<tr><td>{_e(METRIC_LABELS[m])}</td><td class="num">{_e(_cell(result, m))}</td></tr>' for m in RETRIEVAL_METRICS]
    out.append("</tbody></table>")
    out.append('<h2>Every question</h2><table id="rows"><thead><tr><th>#</th><th>question</th><th>expected</th>'
               "<th>rank</th><th>MRR</th><th>chunks found, best first (✓ matches the row)</th></tr></thead><tbody>")
    for row in result.rows:
        found = "".join(f'<div class="{"high" if h["match"] else ""}">{h["rank"]}. {"✓ " if h["match"] else ""}'
                        f'<b>{_e(_where(h))}</b> <span class="note">{h["score"]:.4f}</span><br>'
                        f'<span class="note">{_e(" ".join(h["text"].split())[:200])}</span></div>'
                        for h in row["hits"][:5])
        rank = row["rank"] or f"not in top {result.depth}"
        out.append(f'<tr class="first"><td>{row["case"]}</td><td class="text">{_e(row["question"])}</td>'
                   f'<td class="text">{_e(row["expected"])}</td><td class="num">{_e(rank)}</td>'
                   f'<td class="num" style="background:hsl({round(120 * row["mrr"])},65%,90%)">{row["mrr"]:.3f}</td><td class="text">{found}</td></tr>')
    out.append("</tbody></table>")
    out.append(f'<p class="note">forja eval --knowledge · {_e(json.dumps(result.stats))}</p></body></html>')
    return "\n".join(out)
