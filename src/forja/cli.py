"""The `forja` command: each verb is a small function whose docstring is its --help.

`forja --help` lists the verbs. Errors a user can fix print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from forja.config import ConfigError, ForjaError, Settings, jemalloc_env, load_settings, wants_jemalloc


class _Group(TyperGroup):
    """Turns the errors a user can fix into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ForjaError as exc:
            typer.echo(f"forja: error: {exc}", err=True)
            raise typer.Exit(1) from None


def _typer(help_text: str, **kwargs) -> typer.Typer:
    return typer.Typer(
        cls=_Group, help=help_text, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, **kwargs
    )


app = _typer("Forja: fine-tune a small language model on your own data, serve it, learn from feedback.")
models_app = _typer("List models; promote, roll back and merge versions.", invoke_without_command=True)
models_app.info.no_args_is_help = False
app.add_typer(models_app, name="models")
data_app = _typer("Inspect your files, prepare them as training data, or write training data from your documents.")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML settings file (default: ./forja.yaml if present).")
]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model name, version, directory, .gguf or hub id.")]
BackendOpt = Annotated[Optional[str], typer.Option(help="auto, llamacpp, pytorch or openai (serve.upstream_url) (default from serve.backend: auto, as forja serve).")]


def read_prompt(text: str | None, what: str) -> str:
    """The argument, or stdin when it is omitted or '-'; an empty one is refused."""
    if text is None or text == "-":
        if sys.stdin.isatty():
            raise ConfigError(f"no {what}: pass it as an argument or pipe it on stdin")
        text = sys.stdin.read()
    if not text.strip():
        raise ConfigError(f"the {what} is empty")
    return text.strip()


def settings_from(config: Path | None, **flags) -> Settings:
    if config is not None:
        os.environ["FORJA_CONFIG"] = str(config)
    return load_settings(**flags)


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; read from stdin when omitted or '-'.")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Most tokens to generate.", min=1)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy; higher = more varied.", min=0.0, max=2.0)] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.", min=0.0, max=1.0)] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens; 0 = off.", min=0)] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens less likely than this times the top one; 0 = off.", min=0.0, max=1.0)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="> 1 makes tokens of the prompt and answer less likely (greedy too); 1 = off.", max=2.0)] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option(help="Minus this per earlier use of a token in the answer.", min=-2.0, max=2.0)] = None,
    presence_penalty: Annotated[Optional[float], typer.Option(help="Minus this once a token is in the answer.", min=-2.0, max=2.0)] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the one the version was trained with, else generate.system).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    backend: BackendOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    input_path: Annotated[Optional[Path], typer.Option("--input", "-i", help="Answer every request of an OpenAI batch file (.jsonl), or every row of a table (csv, xlsx, json, jsonl), instead of one prompt.")] = None,
    output_path: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --input: where the answers go, one JSON line each; run again to continue an interrupted run.")] = None,
    column: Annotated[Optional[str], typer.Option(help="With a table: the column holding the prompts (default: the only one, or one named prompt, question, pregunta, input, consulta or text).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="With --input: no progress bar.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Answer a prompt with a local model, streaming tokens to the terminal (sampling defaults: generate:); with --input, a whole file of them."""
    from forja import models
    from forja.config import SAMPLERS
    from forja.engine import Answer, SamplingParams, Usage, answer, make_engine, pick_backend
    from forja.engine.text import chat_messages
    from forja.knowledge.grounding import prompt_for
    import asyncio

    settings = settings_from(config, model=model)
    if backend is not None:
        settings = _with_serve(settings, backend=backend)
    flags = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "repetition_penalty": repetition_penalty, "frequency_penalty": frequency_penalty,
             "presence_penalty": presence_penalty, "max_new_tokens": max_new_tokens, "seed": seed}
    if input_path is not None or output_path is not None:
        if prompt is not None:
            raise ConfigError("a prompt argument and --input exclude each other: with --input the prompts come from the file")
        if as_json:
            raise ConfigError("--json is for one prompt: with --input the answers go to --output as JSON lines")
        return _generate_file(settings, input_path, output_path, column, flags, model, system, quiet)
    if column is not None or quiet:
        raise ConfigError(f"--{'column' if column is not None else 'quiet'} goes with --input and --output")
    prompt = read_prompt(prompt, "prompt")
    defaults = with_flags(settings.generate, flags)  # generate:'s own rules: a flag takes what the config file does
    params = SamplingParams(max_new_tokens=defaults.max_new_tokens, seed=defaults.seed,
                            **{name: getattr(defaults, name) for name in SAMPLERS})
    if pick_backend(settings) != "openai":  # an upstream knows its own models
        models.resolve(settings.model, settings)  # a wrong name fails before anything loads
    system = system or models.trained_system(settings, settings.model) or defaults.system  # as eval and export
    started = time.perf_counter()
    engine = make_engine(settings.model, settings, max_queue=1, max_batch_size=1)
    loaded_in = time.perf_counter() - started

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        started = time.perf_counter()
        # as served: a version trained on a small FAQ reads its nearest row (train.faq_retrieval)
        messages, _, fixed = prompt_for(settings, None, settings.model, chat_messages(prompt, system))
        reply = (Answer(fixed, "stop", Usage()) if fixed is not None else
                 asyncio.run(answer(engine, messages, params, None if as_json else show)))
        if fixed is not None and not as_json:
            show(fixed)
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    if reply.finish_reason == "error":
        raise ConfigError(f"{settings.model}: {reply.error}")
    runs = engine.backend + (f" {engine.loaded.info['dtype']}" if hasattr(engine, "loaded") else "")
    if as_json:
        typer.echo(json.dumps({"text": reply.text, "model": settings.model, "backend": engine.backend,
                               "finish_reason": reply.finish_reason, "usage": reply.usage.as_dict(),
                               "timing": {"load_seconds": round(loaded_in, 3), "generate_seconds": round(seconds, 3)}},
                              ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        rate = reply.usage.completion_tokens / seconds if seconds > 0 else 0.0
        typer.echo(f"[{settings.model}, {runs}: loaded in {loaded_in:.1f}s, "
                   f"{reply.usage.completion_tokens} tokens at {rate:.1f} tokens/s]", err=True)


def _generate_file(settings: Settings, input_path: Path | None, output_path: Path | None, column: str | None,
                   flags: dict, model: str | None, system: str | None, quiet: bool) -> None:
    """`forja generate --input --output`: a batch file or a table answered through the server's request path."""
    from tqdm.auto import tqdm

    from forja import models
    from forja.engine import pick_backend
    from forja.jobs.batch import BatchError, is_batch_file, run_batch, run_table

    if input_path is None or output_path is None:
        raise ConfigError(f"--{'output' if output_path is None else 'input'} is missing: --input FILE and --output FILE go together")
    if not input_path.is_file():
        raise ConfigError(f"--input {input_path}: no such file")
    if output_path.resolve() == input_path.resolve():
        raise ConfigError("--output is the --input file: give another path for the answers")
    if pick_backend(settings) != "openai":
        models.resolve(settings.model, settings)  # a wrong name fails before anything loads
    batch = is_batch_file(input_path)
    given = [name for name, value in {**flags, "system": system, "column": column}.items() if value is not None]
    if batch and given:
        raise ConfigError(f"--{given[0].replace('_', '-')} is for a table of prompts; {input_path} is a batch file, "
                          "whose requests carry their own settings")
    errors_path = output_path.with_name(output_path.stem + ".errors.jsonl")
    bar, last = None, None

    def progress(counts) -> None:
        nonlocal bar, last
        last = counts
        if bar is None:
            bar = tqdm(total=counts.total, initial=counts.done - 1, unit="answer", file=sys.stderr, dynamic_ncols=True,
                       disable=quiet or not sys.stderr.isatty())
        bar.update(counts.done - bar.n)

    try:
        if batch:
            counts = run_batch(settings, input_path, output_path, errors_path, progress=progress, model=settings.model)
        else:
            body = {key: value for key, value in flags.items() if value is not None and key != "max_new_tokens"}
            if flags["max_new_tokens"] is not None:
                body["max_tokens"] = flags["max_new_tokens"]
            if model is not None:
                body["model"] = model
            system = system or models.trained_system(settings, settings.model) or settings.generate.system
            if system:
                body["messages"] = [{"role": "system", "content": system}]
            counts = run_table(settings, input_path, output_path, column=column, body=body, progress=progress,
                               model=settings.model)
    except KeyboardInterrupt:
        done = f"{last.done} of {last.total} answered and written to {output_path}" if last else "nothing answered yet"
        typer.echo(f"\nforja: interrupted: {done}; run the same command again to continue", err=True)
        raise typer.Exit(130) from None
    except BatchError as exc:
        raise ConfigError(f"--input {input_path}: {str(exc).replace('file line', 'line', 1)}" if batch else str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    if last is None:
        typer.echo(f"nothing left to answer: {output_path} has all {counts.total} answers", err=True)
        return
    failed = f", {counts.failed} error{'s' if counts.failed > 1 else ''}" + (f" (in {errors_path})" if batch else "") if counts.failed else ""
    typer.echo(f"wrote {output_path}: {counts.completed} of {counts.total} answered{failed}", err=True)


@models_app.callback()
def models_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                config: ConfigOpt = None) -> None:
    """List the models forja can use: bundled, trained versions and converted files."""
    if ctx.invoked_subcommand is not None:
        return
    from forja.models import list_models

    rows = list_models(settings_from(config))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "detail", "location")
    for row in rows:
        table.add_row(row["name"], row["kind"], row["detail"], row["location"])
    Console().print(table)


PathsArg = Annotated[Optional[list[str]], typer.Argument(
    help="Files, folders (read whole) or hf:owner/name datasets (default: data.sources of the config).", show_default=False)]
MapOpt = Annotated[Optional[str], typer.Option(
    "--map", help="Which column is which: question=Consulta,answer=Contestación (also system=, context=, text=; "
    "multi-turn conversation=, role=, content=).")]
GuessOpt = Annotated[bool, typer.Option("--guess", help="Where no known format matches, guess the mapping from the columns' names and values (and say it).")]
EncodingOpt = Annotated[Optional[str], typer.Option(help="Read text files in this encoding (e.g. cp1252, utf-16) instead of detecting it.")]
AssistantOpt = Annotated[Optional[str], typer.Option(help="Chat exports (WhatsApp, Telegram): the participant who is the assistant.")]
GapOpt = Annotated[Optional[float], typer.Option("--gap-hours", help="Chat exports: a pause this long starts a new conversation (default 6).", min=0.01)]
SplitOpt = Annotated[Optional[str], typer.Option(help="hf: datasets: the split (default: train).")]
SubsetOpt = Annotated[Optional[str], typer.Option(help="hf: datasets: the subset (configuration).")]


def data_sources(settings: Settings, paths: list[str] | None, map_: str | None, guess: bool, encoding: str | None,
                 assistant: str | None, gap_hours: float | None, split: str | None, subset: str | None):
    """The paths with their reading options: the config's data.sources, overridden by the flags."""
    from forja.data import sources
    from forja.data.mapping import parse_map

    return sources(paths or [], settings.data.sources, map=parse_map(map_) if map_ else None, guess=guess,
                   encoding=encoding, assistant=assistant, gap_hours=gap_hours, split=split, subset=subset)
TokenizerOpt = Annotated[
    Optional[str], typer.Option("--tokenizer", help="Count tokens with this model's tokenizer (default: the configured model).")
]
EstimateOpt = Annotated[bool, typer.Option("--estimate", help="Estimate tokens from words instead of loading a tokenizer.")]


def data_tokenizer(settings: Settings, name: str | None, estimate: bool):
    if estimate:
        return None
    from forja.models import load_tokenizer, quiet_transformers

    quiet_transformers()
    return load_tokenizer(name or settings.model, settings)


@data_app.command("inspect")
def data_inspect(paths: PathsArg = None, map_: MapOpt = None, guess: GuessOpt = False, encoding: EncodingOpt = None,
                 assistant: AssistantOpt = None, gap_hours: GapOpt = None, split: SplitOpt = None,
                 subset: SubsetOpt = None, tokenizer: TokenizerOpt = None, estimate: EstimateOpt = False,
                 chunk_tokens: Annotated[int, typer.Option(help="Knowledge chunk size in tokens.", min=16)] = 512,
                 context: Annotated[Optional[int], typer.Option(help="Report conversations longer than this many tokens (default: train.max_seq_length).", min=16)] = None,
                 html: Annotated[Optional[Path], typer.Option("--html", help="Also write the report as a self-contained page with the token-length histogram.")] = None,
                 config: ConfigOpt = None) -> None:
    """Say what is in your files: format, encoding, rows, tokens, histogram, duplicates, bad rows, and a quality report."""
    from forja.data import inspect

    settings = settings_from(config)
    chosen = data_sources(settings, paths, map_, guess, encoding, assistant, gap_hours, split, subset)
    report = inspect(chosen, tokenizer=data_tokenizer(settings, tokenizer, estimate), chunk_tokens=chunk_tokens,
                     context=context or settings.train.max_seq_length, allow=settings.guard.pii.allow)
    typer.echo(report.render())
    if html is not None:
        from forja.data.quality import write_html

        write_html(html, report)
        typer.echo(f"wrote {html}")
    unreadable = [f.error for f in report.files if f.error]
    if unreadable:  # the report says why each failed; the exit code lets a script stop here
        from forja.data import DataError

        more = f" ({len(unreadable) - 1} more unreadable files above)" if len(unreadable) > 1 else ""
        raise DataError(unreadable[0] + more)


@data_app.command("prepare")
def data_prepare(
    out: Annotated[Path, typer.Option("--out", "-o", help="Training JSONL to write (.val.jsonl and .meta.json beside it).")],
    paths: PathsArg = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of rows kept for validation (default: none of small data, up to 300 rows; else 0.1).", min=0.0, max=0.9)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report and skip bad rows instead of stopping.")] = False,
    chunk_tokens: Annotated[int, typer.Option(help="Knowledge chunk size in tokens.", min=16)] = 512,
    tokenizer: TokenizerOpt = None,
    estimate: EstimateOpt = False,
    system: Annotated[Optional[str], typer.Option(help="System prompt put first in every conversation that has none.")] = None,
    map_: MapOpt = None,
    guess: GuessOpt = False,
    encoding: EncodingOpt = None,
    assistant: AssistantOpt = None,
    gap_hours: GapOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    redact: Annotated[bool, typer.Option("--redact", help="Replace the personal data the guard finds (emails, phones, IDs, cards, IBANs) with [EMAIL], [PHONE], ... (guard.pii.allow values are kept).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Write one normalised JSONL ({"messages"} / {"text"} rows) with a reproducible split and a content hash."""
    from forja.data import prepare

    settings = settings_from(config)
    chosen = data_sources(settings, paths, map_, guess, encoding, assistant, gap_hours, split, subset)
    summary = prepare(
        chosen, out, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad, chunk_tokens=chunk_tokens,
        tokenizer=data_tokenizer(settings, tokenizer, estimate), system=system, redact=redact,
        allow=settings.guard.pii.allow,
    )
    typer.echo(summary.render())


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL of question–answer conversations to write (.synth.json beside it).")],
    paths: PathsArg = None,
    model: Annotated[Optional[str], typer.Option(help="Model that writes the pairs (default: the configured model).")] = None,
    questions: Annotated[int, typer.Option(help="Questions asked of each chunk, at most.", min=1, max=10)] = 3,
    paraphrase: Annotated[int, typer.Option(help="Also reword each question of the dialogue files given this many times.", min=0, max=10)] = 0,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (default: generate.temperature, 0: greedy).", min=0.0)] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Most tokens of each answer (default: what the JSON's longest strings take).", min=8)] = None,
    backend: Annotated[Optional[str], typer.Option(help="Engine backend: auto, llamacpp or pytorch (default: serve.backend).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write question–answer pairs from your documents (answers the chunk does not support are dropped), and paraphrases."""
    from forja.synth import synth

    settings = settings_from(config)
    if not paths:
        from forja.data import DataError

        raise DataError("no files given: name the documents (and, with --paraphrase, dialogue files) to write pairs from")
    report = synth(settings, paths, out, model=model, questions=questions, paraphrase=paraphrase,
                   temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, backend=backend,
                   progress=lambda done, total: typer.echo(f"\r  {done}/{total} prompts answered", nl=done == total, err=True))
    typer.echo(report.render())


@app.command()
def train(
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="Prepared JSONL, or files/folders to prepare.")] = None,
    validation: Annotated[Optional[Path], typer.Option(help="A file of validation rows (read as --data is); nothing is then held out of --data.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Model to start from (default: the configured model).")] = None,
    method: Annotated[Optional[list[str]], typer.Option(metavar="METHOD", help="lora or full (the weights trained); dpo, kto or orpo (preference training, train.objective); both with --method dpo --method full.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="dpo/kto: how far from the starting model the preferences may move it (train.beta).")] = None,
    goal: Annotated[Optional[str], typer.Option(help="memorise (answers word for word: a FAQ), adapt (tone and style of a larger corpus) or auto (by the data's size).")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt for every dialogue without one; the version keeps it for serving, eval and export.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the model version to create.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per micro-batch.")] = None,
    gradient_accumulation: Annotated[Optional[int], typer.Option(help="Micro-batches per step.")] = None,
    max_seq_length: Annotated[Optional[int], typer.Option(help="Longest sequence in tokens.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for data order and initial weights.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Validation loss every N steps.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run of this name from its last checkpoint.")] = None,
    from_feedback: Annotated[bool, typer.Option("--from-feedback", help="Learn from the unused feedback, starting from the active version (or --base); promote the result only if it does not regress.")] = False,
    promote: Annotated[bool, typer.Option("--promote/--no-promote", help="With --from-feedback (or --resume of such a run): promote the new version when it passes the gate.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    processes: Annotated[int, typer.Option("--processes", min=1, max=64, help="Train with this many processes, each with the whole model and a share of every batch (data parallel: gloo on a CPU, NCCL on GPUs); the same losses as one.")] = 1,
    map_: MapOpt = None,
    guess: GuessOpt = False,
    encoding: EncodingOpt = None,
    assistant: AssistantOpt = None,
    gap_hours: GapOpt = None,
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune a model on your data (LoRA or full) and publish it as a model version; files are read as `forja data prepare` reads them (--map, --encoding, --assistant, data.sources)."""
    from forja import train as training

    settings = settings_from(config)
    if from_feedback and (data or resume or validation):
        raise ConfigError("--from-feedback takes its data from the feedback store; leave out --data, --validation and "
                          "--resume")
    if resume and validation:
        raise ConfigError("--resume continues a run with the data it started with; leave out --validation")
    if from_feedback and processes > 1:
        raise ConfigError("--processes: a retrain from feedback runs in one process (its runs are small); "
                          "leave out --processes")
    if resume:
        run = training.open_run(settings, resume)
    else:
        if not data and not from_feedback and not settings.data.sources:
            raise ConfigError("give the training data with --data PATH, or list it under data.sources in forja.yaml "
                              "(or continue a run with --resume NAME)")
        adapter, objective = _train_methods(method or [])
        flags = {
            "method": adapter, "objective": objective, "beta": beta, "goal": goal, "system": system, "epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate,
            "batch_size": batch_size, "gradient_accumulation": gradient_accumulation,
            "max_seq_length": max_seq_length, "lora_r": lora_r, "seed": seed, "eval_every": eval_every,
            "checkpoint_every": checkpoint_every,
        }
        hyper = with_flags(settings.train, flags)
        if from_feedback:
            return _retrain_from_feedback(settings, hyper, base, name, promote, quiet)
        paths = data_sources(settings, [str(p) for p in data or []], map_, guess, encoding, assistant, gap_hours,
                             split, subset)
        held = data_sources(settings, [str(validation)], map_, guess, encoding, assistant, gap_hours, None,
                            subset)[0] if validation else None
        run = training.new_run(settings, paths, name, base or settings.model, hyper, validation=held)
    version = training.train(settings, run, progress=not quiet, processes=processes)
    if resume:  # a resumed feedback run still records which feedback it learned from, and is gated
        from forja.feedback import conclude, record_version
        from forja.store import Store

        store = Store.open(settings)
        try:
            record_version(settings, store, run.directory, version)
        finally:
            store.close()
        result = conclude(settings, run.directory, version, promote=promote, progress=not quiet)
        if result is not None:
            return _report_retrain(result)
    from forja.train import render_answers

    metrics = json.loads((version / "version.json").read_text())["metrics"]
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                      if not isinstance(v, (dict, list)))
    typer.echo(f"model version {version.name} written to {version} ({shown})")
    if "answers" in metrics:
        typer.echo("\n".join(render_answers(metrics["answers"])))
    typer.echo(f"try it: forja generate --model {version.name} \"your question\"")


GATE_FAILED_EXIT = 2


def _train_methods(values: list[str]) -> tuple[str | None, str | None]:
    """--method values as (train.method, train.objective): lora/full say which weights, sft/dpo/kto/orpo what
    the rows teach."""
    adapter = objective = None
    for value in values:
        if value in ("lora", "full"):
            adapter = value
        elif value in ("sft", "dpo", "kto", "orpo"):
            objective = value
        else:
            raise ConfigError(f"--method {value!r}: expected lora or full (the weights trained), or sft, dpo, kto or orpo "
                              "(what the rows teach)")
    return adapter, objective


def _retrain_from_feedback(settings: Settings, hyper, base: str | None, name: str | None, promote: bool,
                           quiet: bool) -> None:
    from forja.feedback import retrain

    result = retrain(settings, hyper, base=base, name=name, promote=promote, progress=not quiet)
    _report_retrain(result)


def _report_retrain(result) -> None:
    """What a feedback run learned and what its gate decided; exit 2 when the gate did not pass."""
    from forja.train import render_answers

    gate = result.gate
    typer.echo(f"model version {result.version.name} trained from {result.started_from} on {result.trained_pairs} "
               f"feedback pairs + {result.replayed_rows} replayed rows ({result.held_out_pairs} pairs held out, "
               f"{result.replaced_rows} old rows not replayed: their question was corrected)")
    made = result.contributed
    if made.get("tool_calls"):
        typer.echo(f"  of them {made['tool_calls']} corrected tool calls (learned as calls; the gate checks answers only)")
    if made.get("dpo_pairs") or made.get("kto_up") or made.get("kto_down"):
        typer.echo(f"  and ratings: {made.get('dpo_pairs', 0)} DPO pairs (an answer and its correction), "
                   f"{made.get('kto_up', 0) + made.get('kto_down', 0)} KTO rows ({made.get('kto_up', 0)} thumbs-up, "
                   f"{made.get('kto_down', 0)} thumbs-down without a correction)")
    if result.answers:
        typer.echo("\n".join(render_answers(result.answers)).replace("of your answers", "of the feedback answers"))
    typer.echo(f"gate ({gate['backend']}, regression set: {gate['regression_set']}):")
    mark = lambda ok: "ok" if ok else "--"  # noqa: E731
    for check, entry in gate["checks"].items():
        typer.echo(f"  {check}: {'passed' if entry['passed'] else 'FAILED'} on {entry['cases']} questions: {entry['reason']}")
        for q in entry["questions"][: 12 if check != "regression" else 6]:
            typer.echo(f"    {q['question'][:50]!r}: [{mark(q['before_ok'])}] {(q['before'] or '(no answer)')[:40]!r} -> "
                       f"[{mark(q['after_ok'])}] {(q['after'] or '(no answer)')[:40]!r}")
    verdict = ("passed" if gate["passed"] else f"not passed, decided by the {gate['decided_by']} check"
               if gate["checks"] else "not passed")
    typer.echo(f"gate {verdict}: {gate['reason']}")
    if result.promoted:
        typer.echo(f"{result.version.name} is now the active version (undo: forja models rollback)")
    else:
        typer.echo(f"not promoted; to use it anyway: forja models promote {result.version.name}")
    if not gate["passed"]:
        raise typer.Exit(GATE_FAILED_EXIT)


@models_app.command("merge")
def models_merge(
    name: Annotated[str, typer.Argument(help="A LoRA model version.")],
    out: Annotated[Optional[str], typer.Option("--out", help="Name of the merged version (default NAME-merged).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Merge a LoRA version into full weights, as a new model version."""
    from forja.train import merge_version

    target = merge_version(settings_from(config), name, out)
    typer.echo(f"merged {name} into {target}")


@models_app.command("promote")
def models_promote(name: Annotated[str, typer.Argument(help="The version to make active.")], config: ConfigOpt = None) -> None:
    """Make a version the active one (what `forja serve` answers with and the next retrain starts from)."""
    from forja import models

    previous = models.promote(settings_from(config), name)
    typer.echo(f"{name} is now active (was {previous}); a running server without --model switches at its next request")


@models_app.command("rollback")
def models_rollback(config: ConfigOpt = None) -> None:
    """Go back to the model that was active before the current one."""
    from forja import models

    settings = settings_from(config)
    current = models.active_model(settings)
    now = models.rollback(settings)
    typer.echo(f"rolled back from {current}; {now} is active again")


@models_app.command("delete")
def models_delete(name: Annotated[str, typer.Argument(help="The trained version to delete.")],
                  config: ConfigOpt = None) -> None:
    """Delete a trained version (its directory, run and cached exports); refused for the active version."""
    from forja.models import delete_version

    freed = delete_version(settings_from(config), name)
    typer.echo(f"deleted {name} ({freed / 2**20:.1f} MiB freed)")


jobs_app = _typer("Fine-tuning and batch jobs (the /v1/fine_tuning/jobs and /v1/batches API): list, show, cancel.",
                  invoke_without_command=True)
jobs_app.info.no_args_is_help = False
app.add_typer(jobs_app, name="jobs")


@app.command()
def worker(once: Annotated[bool, typer.Option("--once", help="Run the waiting jobs, then exit.")] = False,
           config: ConfigOpt = None) -> None:
    """Run fine-tuning and batch jobs from the store (on this or another machine sharing the store and FORJA_HOME)."""
    from forja.jobs.worker import Worker

    settings = settings_from(config)
    runner = Worker(settings)
    typer.echo(f"forja worker {runner.id}: running jobs from {settings.home} (Ctrl-C stops; a running job keeps "
               "its checkpoint and resumes on the next start)", err=True)
    try:
        runner.drain(timeout=float("inf")) if once else runner.run()
    except KeyboardInterrupt:
        typer.echo("stopping: running jobs save a checkpoint and go back to the queue", err=True)
    finally:
        runner.stop(settings.jobs.cancel_seconds + 5)


@jobs_app.callback()
def jobs_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
              config: ConfigOpt = None) -> None:
    """List the jobs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from forja import jobs

    def read(store):
        return [job for kind in (jobs.FINE_TUNE, jobs.BATCH) for job in jobs.listing(store, kind, limit=10_000)[0]]

    found = sorted(_read_store(config, read), key=lambda job: -job.created_at)
    if as_json:
        return _json_lines([{"id": j.id, "kind": j.kind, "status": j.status, "created_at": j.created_at,
                             "owner": j.api_key_name, "result": j.result, "error": j.error} for j in found])
    if not found:
        typer.echo("no jobs (POST /v1/fine_tuning/jobs or /v1/batches create them)")
    for job in found:
        made = job.result.get("fine_tuned_model") or job.result.get("output_file_id") or ""
        typer.echo(f"{job.id}  {job.kind:9}  {job.status:16} {_when(job.created_at)}  {made}")


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="The job's id.")], config: ConfigOpt = None) -> None:
    """A job's status and its events, oldest first."""
    from forja import jobs

    job, events = _read_store(config, lambda store: (jobs.get(store, job_id),
                                                     jobs.events(store, job_id, limit=100_000, oldest_first=True)[0]))
    typer.echo(f"{job.id} ({job.kind}): {job.status}" + (f": {job.error['message']}" if job.error else ""))
    for event in events:
        typer.echo(f"  {time.strftime('%H:%M:%S', time.localtime(event.created_at))} {event.message}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="The job's id.")], config: ConfigOpt = None) -> None:
    """Cancel a job: at once when it waits; a running one is stopped by its worker, keeping its checkpoints."""
    from forja import jobs

    job = _read_store(config, lambda store: jobs.cancel(store, job_id, jobs.get(store, job_id).kind))
    typer.echo(f"{job.id} is {job.status}")


keys_app = _typer("API keys kept in the database (beside serve.api_keys): create, list, revoke, usage.",
                  invoke_without_command=True)
keys_app.info.no_args_is_help = False
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who holds the key (shown in usage and logs).")],
    scope: Annotated[Optional[list[str]], typer.Option("--scope", help="chat (default) and/or train; repeat it.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May do everything, /admin included.")] = False,
    rpm: Annotated[Optional[int], typer.Option("--rpm", help="Requests per minute at most.", min=1)] = None,
    tokens_per_day: Annotated[Optional[int], typer.Option("--tokens-per-day", help="Tokens per UTC day at most.", min=1)] = None,
    config: ConfigOpt = None,
) -> None:
    """Make a key; it is printed once (only its SHA-256 is kept). The first key turns keys on for the server."""
    from forja import keys
    from forja.config import KeyLimits

    settings = settings_from(config)
    limits = KeyLimits(requests_per_minute=rpm, tokens_per_day=tokens_per_day)

    def make(store):
        first = not settings.serve.api_keys and not keys.listing(store, revoked=True)
        return keys.create(settings, store, name, scope or ["chat"], admin, limits), first

    (stored, secret), first = _read_store(config, make)
    typer.echo(secret)
    typer.echo(f"key {stored.name} ({stored.id}): scopes {', '.join(stored.scopes) or '-'}"
               f"{', admin' if stored.admin else ''}; shown only now, keep it", err=True)
    if first:
        typer.echo("this is the server's first key: from now on every route but /health and the page needs one",
                   err=True)


@keys_app.callback()
def keys_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
              config: ConfigOpt = None) -> None:
    """List the keys (the config's and the database's)."""
    if ctx.invoked_subcommand is not None:
        return
    from forja import keys

    settings = settings_from(config)
    stored = _read_store(config, keys.listing)
    rows = [{"name": k.name, "id": f"config:{k.name}", "scopes": sorted(k.scopes), "admin": k.admin,
             "limits": k.limits.model_dump(), "source": "config"} for k in settings.serve.api_keys]
    rows += [{"name": k.name, "id": k.id, "scopes": k.scopes, "admin": k.admin, "limits": k.limits.model_dump(),
              "source": "database", "created_at": k.created_at} for k in stored]
    if as_json:
        return _json_lines(rows)
    if not rows:
        typer.echo("no keys: the server is open to anyone who can reach it (forja keys create NAME makes one)")
    for row in rows:
        limits = ", ".join(f"{k}={v}" for k, v in row["limits"].items() if v) or "no limits"
        typer.echo(f"{row['name']:20} {row['id']:28} {','.join(row['scopes']) or '-':11} "
                   f"{'admin ' if row['admin'] else ''}{limits} ({row['source']})")


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name or id.")], config: ConfigOpt = None) -> None:
    """Revoke a key made with forja keys create or the API: the next request with it is refused."""
    from forja import keys

    stored = _read_store(config, lambda store: keys.revoke(store, name))
    typer.echo(f"key {stored.name} ({stored.id}) revoked")


@keys_app.command("usage")
def keys_usage(days: Annotated[int, typer.Option(help="The last N UTC days.", min=1, max=366)] = 7,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
               config: ConfigOpt = None) -> None:
    """Requests and tokens per key per day, and the estimated cost at serve.price_per_1k_tokens."""
    from forja import keys

    settings = settings_from(config)
    rows = _read_store(config, lambda store: keys.usage_rows(settings, store, days))
    if as_json:
        return _json_lines(rows)
    if not rows:
        typer.echo(f"no requests in the last {days} days")
    for row in rows:
        cost = f"  ~{row['estimated_cost']:.4f}" if settings.serve.price_per_1k_tokens else ""
        typer.echo(f"{row['day']}  {row['key']:20} {row['requests']:7} requests  {row['prompt_tokens']:9} prompt + "
                   f"{row['completion_tokens']:9} completion tokens{cost}")


@jobs_app.command("run-batch", hidden=True)
def jobs_run_batch(job_id: str, worker_name: Annotated[str, typer.Option("--worker")], config: ConfigOpt = None) -> None:
    """(The worker runs this) answer a batch job's requests, counting them in the job."""
    from forja.jobs.worker import run_batch_job

    run_batch_job(settings_from(config), job_id, worker_name)


UrlOpt = Annotated[str, typer.Option("--url", help="The forja server.", envvar="FORJA_URL")]
ApiKeyOpt = Annotated[
    Optional[str], typer.Option("--api-key", help="API key, when the server wants one (or FORJA_API_KEY).", envvar="FORJA_API_KEY",
                                show_envvar=False)
]


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default from serve.host: 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port (default from serve.port: 8000).")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve a model: OpenAI-compatible API at /v1, /predict, /health and a chat page at /."""
    from forja import models
    from forja.serve.app import serve as run_server
    from forja.engine import pick_backend

    settings = settings_from(config)
    if backend is not None:
        settings = _with_serve(settings, backend=backend)
    shown = model or models.active_model(settings)  # without --model: the active version, following promotions
    if pick_backend(settings) != "openai":  # an upstream knows its own models
        models.resolve(shown, settings)  # a wrong name fails here, before the server starts
    host, port = host or settings.serve.host, port or settings.serve.port
    keys = len(settings.serve.api_keys) + _database_keys(settings)
    typer.echo(f"forja serve: {shown} ({pick_backend(settings)}) on http://{host}:{port}  (chat page /, OpenAI API /v1, "
               f"{keys} API key{'s' if keys != 1 else ''}{'' if keys else ': open to anyone who can reach it'}); Ctrl-C stops",
               err=True)
    run_server(settings, model, host=host, port=port)


def _database_keys(settings: Settings) -> int:
    """How many keys `forja keys create` made (0 when the database cannot be read: serve says why later)."""
    from forja import keys
    from forja.store import Store, StoreError

    try:
        store = Store.open(settings)
    except StoreError:
        return 0
    try:
        return len(keys.listing(store))
    finally:
        store.close()


def _with_serve(settings: Settings, **values) -> Settings:
    """The settings with some serve.* values replaced (from flags), validated like the config file."""
    return settings.model_copy(update={"serve": with_flags(settings.serve, values)})


def with_flags(section, flags: dict):
    """A settings section with the flags given (None: not given) laid over it, checked by the section's own
    rules; a value they refuse is one line naming its flag."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return section.model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a check of several fields (backend openai without serve.upstream_url)
            raise ConfigError(f"--{'/--'.join(given).replace('_', '-')}: {err['msg'].removeprefix('Value error, ')}") from None
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None


@app.command("export")
def export_model(
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="gguf, ollama (GGUF plus a Modelfile), hf (a merged Hugging Face directory with a model card, for vLLM and the hub), cog (Replicate), docker, systemd, or all.")] = "gguf",
    quant: Annotated[str, typer.Option("--quant", help="f32, f16, q8_0 or q4_k_m.")] = "q8_0",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")] = Path("export"),
    persona: Annotated[Optional[str], typer.Option(help="ollama, cog, docker: the persona whose system prompt and sampling go in.")] = None,
    engine: Annotated[str, typer.Option(help="cog: pytorch (merged safetensors) or llamacpp (a GGUF at --quant).")] = "pytorch",
    config: ConfigOpt = None,
) -> None:
    """Export a model or trained version (LoRA merged): GGUF (llama.cpp, Ollama), a Hugging Face directory, or a deployment package (cog, docker, systemd)."""
    from forja.export import export

    settings = settings_from(config)
    if engine != "pytorch" and fmt not in ("cog", "all"):
        raise ConfigError(f"--engine chooses what runs a cog package; --format {fmt} has none (use --format cog)")
    written = export(settings, model or settings.model, fmt, quant, out, persona, engine=engine)
    for path in written:
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)" if path.suffix == ".gguf" else f"wrote {path}")
    if fmt in ("ollama", "all"):
        typer.echo(f"then: cd {out} && ollama create NAME -f Modelfile")
    if fmt in ("hf", "all"):
        hf = next(p for p in written if p.is_dir() and (p / "config.json").is_file() and p.parent == out)
        typer.echo(f"then: vllm serve {hf} --served-model-name NAME, and forja serve --backend openai with "
                   "serve.upstream_url http://HOST:8000/v1; or forja push MODEL --to hub:ORG/REPO")
    if fmt in ("cog", "all"):
        typer.echo(f"then: cd {out / 'cog'} && cog predict -i prompt=Hola; cog push r8.im/USER/NAME (see its README.md)")
    if fmt in ("docker", "all"):
        typer.echo(f"then: cd {out / 'docker'} && docker compose up")
    if fmt in ("systemd", "all"):
        typer.echo(f"then: sudo cp {out / 'systemd'}/* /etc/systemd/system/ && sudo systemctl enable --now forja "
                   "forja-retrain.timer")


@app.command("push")
def push(
    name: Annotated[str, typer.Argument(help="The model or version to upload (LoRA merged).")],
    to: Annotated[str, typer.Option("--to", help="hub:ORG/REPO on the Hugging Face hub (token: HF_TOKEN or `hf auth login`).")],
    private: Annotated[bool, typer.Option("--private/--public", help="Create the repository private.")] = True,
    config: ConfigOpt = None,
) -> None:
    """Upload a version to the Hugging Face hub as a model repository (merged safetensors, tokenizer, model card)."""
    from forja.export import push_to_hub

    url = push_to_hub(settings_from(config), name, to, private=private, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"pushed {name} to {url}")


@app.command("gc")
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Remove the caches and exports no version needs (GGUFs of deleted or changed versions, stale conversions, finished runs); say what was freed."""
    from forja.models import collect_garbage

    removed = collect_garbage(settings_from(config), dry_run=dry_run)
    for item in removed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {item['path']} ({item['bytes'] / 2**20:.1f} MiB): {item['why']}")
    total = sum(item["bytes"] for item in removed) / 2**20
    typer.echo(f"{'would free' if dry_run else 'freed'} {total:.1f} MiB in {len(removed)} item{'s' if len(removed) != 1 else ''}")


StepOpt = Annotated[Optional[list[str]], typer.Option(help="Run only this step (repeatable), on what the others recorded: prepare, train, eval, gate, promote, export or package.")]


@app.command("run")
def run_pipeline(
    assistants: Annotated[Optional[list[str]], typer.Argument(help="Assistants to run (default: all, in the pipeline's order).", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="A YAML file with a pipeline: section (or its contents) instead of forja.yaml's.")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Run this step even if its inputs have not changed (repeatable).")] = None,
    start: Annotated[Optional[str], typer.Option("--from", help="Run this step and every one after it; the earlier ones as recorded.")] = None,
    only: StepOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would run and why; run nothing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Run each assistant's pipeline (prepare, train, eval, gate, promote, export, package), skipping the steps whose inputs have not changed; exit 2 when a gate fails."""
    from rich.console import Console
    from rich.table import Table

    from forja import pipeline
    from forja.config import read_yaml

    if file is not None and not file.is_file():
        raise ConfigError(f"--file {file}: no such file")
    if config is None and file is not None and "pipeline" in read_yaml(file):
        config = file  # a whole forja.yaml: its other settings apply too
    settings = settings_from(config)
    outcome = pipeline.run(settings, assistants or [], file=file, force=force or [], start=start, only=only or [],
                           dry_run=dry_run, progress=not quiet, log=lambda line: typer.echo(line, err=True))
    table = Table("assistant", *pipeline.STEPS, "version", "gate", title="forja run" + (" --dry-run" if dry_run else ""))
    marks = {"ran": "ran", "skipped": "-", "would run": "would run", "failed": "FAILED", "not run": "not run"}
    for result in outcome.assistants:
        table.add_row(result.name, *(marks[s.status] for s in result.steps), result.outputs("train").get("version", "-"),
                      "-" if dry_run else pipeline.gate_line(result).split(" (")[0])
    Console(width=160).print(table)
    for result in outcome.assistants:
        for step in result.steps:
            if step.status in ("would run", "failed"):
                typer.echo(f"{result.name} {step.step}: {step.status}: {step.reason}")
    if outcome.directory is not None:
        typer.echo(f"report: {outcome.directory / 'report.html'} (and report.md, reproduce/)")
    if outcome.gate_failed:
        raise typer.Exit(pipeline.GATE_FAILED_EXIT)
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def ask(
    question: Annotated[Optional[str], typer.Argument(help="The question; read from stdin when omitted or '-'.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model or persona on the server.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens in the answer.", min=1)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy.", min=0.0, max=2.0)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, id, usage) instead of streaming.")] = False,
    feedback: Annotated[bool, typer.Option("--feedback", help="Afterwards, ask whether the answer was right and send it.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """Ask a running forja server one question and print the answer as it streams."""
    from forja.client import Client, ask_feedback
    from forja.client import ask as ask_server

    question = read_prompt(question, "question")
    client = Client(url, api_key)
    answer = ask_server(client, question, model=model, system=system,
                        stream=not as_json, out=sys.stdout, max_tokens=max_tokens, temperature=temperature, seed=seed)
    if as_json:
        typer.echo(json.dumps(answer.as_dict(), ensure_ascii=False))
    if feedback:
        ask_feedback(client, answer, sys.stdin, sys.stderr if as_json else sys.stdout)


@app.command()
def chat(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model or persona to start with.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Most tokens per answer.", min=1)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy.", min=0.0, max=2.0)] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """Chat with a running forja server: /persona NAME, /reset, /good, /bad, /fix TEXT, /exit."""
    from forja.client import Client
    from forja.client import chat as chat_loop

    try:
        chat_loop(Client(url, api_key), model=model, inp=sys.stdin, out=sys.stdout, max_tokens=max_tokens,
                  temperature=temperature)
    except KeyboardInterrupt:
        typer.echo("")


def _read_store(config: Path | None, read):
    """`read(store)` on the database of the resolved settings, closed afterwards."""
    from forja.store import Store

    store = Store.open(settings_from(config))
    try:
        return read(store)
    finally:
        store.close()


def _json_lines(rows: list[dict]) -> None:
    for row in rows:
        typer.echo(json.dumps(row, ensure_ascii=False))


db_app = _typer("The database: its schema revision, upgrades, and moving an installation to another database.")
app.add_typer(db_app, name="db")


@db_app.command("migrate")
def db_migrate(config: ConfigOpt = None) -> None:
    """Bring the database to the newest schema (forja serve and every command do it when they open it)."""
    from forja import migrations
    from forja.store import Store, safe_url

    settings = settings_from(config)
    store = Store.open(settings)
    store.close()
    done = ", ".join(store.applied) if store.applied else "nothing to do"
    typer.echo(f"{safe_url(settings.database)}: at revision {migrations.head()} ({done})")


@db_app.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """The schema revision the database is at, and the newest this forja knows (changes nothing)."""
    from forja import migrations
    from forja.store import Store, safe_url

    settings = settings_from(config)
    if settings.database_url is None and not (settings.home / "forja.db").exists():
        typer.echo(f"{safe_url(settings.database)}: no database yet (newest revision: {migrations.head()})")
        return
    store = Store(settings.database, migrate=False)
    try:
        revision = store.revision()
    finally:
        store.close()
    known = {s.revision for s in migrations.scripts().walk_revisions()}
    state = ("up to date" if revision == migrations.head() else
             f"newer than this forja knows (its newest is {migrations.head()})" if revision and revision not in known
             else f"forja db migrate brings it to {migrations.head()}")
    typer.echo(f"{safe_url(settings.database)}: revision {revision or '(none)'}, {state}")


@db_app.command("copy")
def db_copy(source: Annotated[str, typer.Argument(help="The database to copy, e.g. sqlite:///home/forja/forja.db")],
            target: Annotated[str, typer.Argument(help="An empty database, e.g. postgresql+psycopg://forja@db/forja")]) -> None:
    """Copy every row to another, empty database (ids kept), to move an installation; then set database_url."""
    from forja.store import copy, safe_url

    copied = copy(source, target)
    typer.echo(f"copied {sum(copied.values())} rows to {safe_url(target)}: "
               + ", ".join(f"{name} {n}" for name, n in copied.items() if n))


feedback_app = _typer("What users said about the answers: list, stats, export as training data.")
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("list")
def feedback_list(
    rating: Annotated[Optional[str], typer.Option(help="Only 'up' or 'down'.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N rows.", min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """The newest feedback with its question and answer (reads the database; no server needed)."""
    if rating not in (None, "up", "down"):
        raise ConfigError(f"--rating is 'up' or 'down', not {rating!r}")
    rows = _read_store(config, lambda store: store.feedback_rows(rating=rating, limit=limit))
    if as_json:
        return _json_lines(rows)
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "when", "model", "rating", "question", "answer", "correction / comment", "review", "used in")
    for row in rows:
        messages = row["messages"]
        question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "") \
            if isinstance(messages, list) and messages and isinstance(messages[0], dict) else str(messages)
        table.add_row(str(row["id"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created_at"])), row["model"],
                      row["rating"] or "", question[:60], row["answer"][:60],
                      (row["correction"] or _call_text(row.get("tool_call")) or row["comment"] or "")[:60],
                      row["review"] or "", ", ".join(row["used_in"]))
    Console().print(table)


def _call_text(call: dict | None) -> str:
    """A corrected tool call as the list shows it: step 2: calculator({"expression": "1 + 2"})."""
    return f"step {call['step']}: {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})" if call else ""


@feedback_app.command("review")
def feedback_review(
    ids: Annotated[list[int], typer.Argument(help="Feedback ids (forja feedback list).")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve: the rows never train.")] = False,
    reviewer: Annotated[Optional[str], typer.Option(help="Who decided (kept with the review).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Approve (or --reject) feedback before it trains: rejected rows never train; with feedback.trust
    'reviewed' only approved thumbs-up do."""
    decision = "rejected" if reject else "approved"
    count = _read_store(config, lambda store: store.review(ids, decision, reviewer))
    typer.echo(f"{count} feedback rows {decision}")


@feedback_app.command("stats")
def feedback_stats(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                   config: ConfigOpt = None) -> None:
    """Exchanges, ratings, corrections and approval per model."""
    stats = _read_store(config, lambda store: store.stats())
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    typer.echo(f"{stats['exchanges']} exchanges, {stats['feedback']} feedback rows "
               f"({', '.join(f'{k}: {v}' for k, v in sorted(stats['ratings'].items())) or 'none'}), "
               f"{stats['corrections']} corrections, {stats['unused']} not yet used for training")
    for model, row in stats["models"].items():
        approval = "-" if row["approval"] is None else f"{row['approval']:.0%}"
        typer.echo(f"  {model}: {row['exchanges']} exchanges, {row['up']} up, {row['down']} down, approval {approval}")


@feedback_app.command("export")
def feedback_export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Training JSONL to write.")],
    include_used: Annotated[bool, typer.Option("--all", help="Also rows already used by a retrain.")] = False,
    preferences: Annotated[bool, typer.Option("--preferences", help="Also write OUT.preferences.jsonl: chosen/rejected pairs.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Write the feedback as training pairs: corrections and approved answers, with their source ids."""
    from forja.feedback import export

    summary = export(settings_from(config), out, include_used=include_used, preferences=preferences)
    left_out = ", ".join(f"{k}={v}" for k, v in summary.skipped.items() if v) or "none"
    calls = f", {summary.tool_calls} corrected tool calls" if summary.tool_calls else ""
    typer.echo(f"{summary.pairs} pairs ({summary.corrections} corrections, {summary.approved} approved answers{calls}) "
               f"written to {out}; left out: {left_out}")
    if summary.preferences_path:
        typer.echo(f"preference pairs in {summary.preferences_path}")
    typer.echo(f"train on them: forja train --data {out}   (or forja train --from-feedback, which also replays old data)")


users_app = _typer("People who sign in to the operator's console (/console): add, list, remove.")
app.add_typer(users_app, name="users")


def _new_password(from_stdin: bool) -> str:
    """A new console password: a line of stdin, or asked twice; refused when too short."""
    from forja.console.accounts import check_password_rules

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    check_password_rules(password)
    return password


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user's name (what they type to sign in).")],
    admin: Annotated[bool, typer.Option("--admin", help="May promote versions, review feedback, manage keys "
                                        "(the first user is an admin anyway).")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Add a console user; asks for the password twice (the first user is an admin)."""
    from forja.console.accounts import add_user

    password = _new_password(password_stdin)
    user = _read_store(config, lambda store: add_user(store, name, password, True if admin else None))
    typer.echo(f"added {user.name}{' (admin)' if user.admin else ''}: sign in at /console/login")


@users_app.command("list")
def users_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
               config: ConfigOpt = None) -> None:
    """The console users, with when they last signed in."""
    from forja.console.accounts import list_users

    users = _read_store(config, list_users)
    if as_json:
        return _json_lines([{"name": u.name, "admin": u.admin, "created_at": u.created_at,
                             "last_login_at": u.last_login_at} for u in users])
    if not users:
        typer.echo("no console users yet: forja users add NAME")
    for u in users:
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(u.last_login_at)) if u.last_login_at else "never"
        typer.echo(f"{u.name}{'  admin' if u.admin else ''}  last login: {last}")


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="The user to remove.")], config: ConfigOpt = None) -> None:
    """Remove a console user and end their sessions."""
    from forja.console.accounts import remove_user

    _read_store(config, lambda store: remove_user(store, name))
    typer.echo(f"removed {name}")


@users_app.command("unlock")
def users_unlock(name: Annotated[str, typer.Argument(help="The user locked out by wrong passwords.")],
                 config: ConfigOpt = None) -> None:
    """Let a user locked out by repeated wrong passwords sign in again at once."""
    from forja.console.accounts import unlock

    was = _read_store(config, lambda store: unlock(store, name))
    typer.echo(f"unlocked {name}" if was else f"{name} was not locked out; the wrong passwords counted are forgotten")


@users_app.command("password")
def users_password(
    name: Annotated[str, typer.Argument(help="The user whose password is set.")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Set a user's password (asked twice); their sessions end and a lockout is lifted."""
    from forja.console.accounts import set_password

    password = _new_password(password_stdin)
    _read_store(config, lambda store: set_password(store, name, password))
    typer.echo(f"new password set for {name}; their sessions have ended")


guard_app = _typer("Run the guardrails from the command line: one text, or a labelled file.")
app.add_typer(guard_app, name="guard")
PersonaOpt = Annotated[Optional[str], typer.Option("--persona", "-p", help="Use this persona's guard settings.")]
BLOCKED_EXIT = 3


def _guard(config: Path | None, persona: str | None):
    from forja.guard import Guards

    settings = settings_from(config)
    personas = {p.name: p for p in settings.serve.personas}
    if persona is not None and persona not in personas:
        raise ConfigError(f"no persona {persona!r} in the config; there are: {', '.join(personas) or 'none'}")
    return Guards(settings).for_persona(personas.get(persona))


@guard_app.command("check")
def guard_check(
    text: Annotated[Optional[str], typer.Argument(help="The text to check; '-' or nothing reads stdin.")] = None,
    output: Annotated[bool, typer.Option("--output", help="Check it as a model's answer (output rails).")] = False,
    persona: PersonaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Run the rails on TEXT: each decision, the text as the model would get it, or the refusal. Exit code 3 when blocked."""
    guard = _guard(config, persona)
    text = read_prompt(text, "text")
    if output:
        verdict = guard.check_output(text, [{"role": "user", "content": text}])
    else:
        verdict = guard.check_input([{"role": "user", "content": text}])
    result = {"blocked": verdict.blocked, "categories": verdict.categories,
              "findings": [f.as_dict() for f in verdict.findings],
              "refusal": verdict.refusal, "text": None if verdict.blocked else verdict.text}
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
    else:
        for finding in verdict.findings:
            typer.echo(f"{finding.stage:6} {finding.action:6} {finding.category:10} {finding.rule}")
        if verdict.blocked:
            typer.echo(f"BLOCKED ({', '.join(verdict.categories)}): {verdict.refusal}")
        else:
            typer.echo(f"passed: {verdict.text}")
    if verdict.blocked:
        raise typer.Exit(BLOCKED_EXIT)


@guard_app.command("log")
def guard_log(
    request_id: Annotated[Optional[str], typer.Option("--id", help="Only the decisions on this exchange id.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N decisions.", min=1)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    config: ConfigOpt = None,
) -> None:
    """The audit log: the newest guardrail decisions of the server (reads the database; never holds the texts)."""
    rows = _read_store(config, lambda store: store.guard_log(request_id=request_id, limit=limit))
    if as_json:
        return _json_lines(rows)
    from rich.console import Console
    from rich.table import Table

    table = Table("when", "request", "stage", "rule", "category", "action", "model", "persona")
    for row in rows:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created_at"])), row["request_id"], row["stage"],
                      row["rule"], row["category"], row["action"], row["model"] or "", row["persona"] or "")
    Console().print(table)


@guard_app.command("test")
def guard_test(
    path: Annotated[Path, typer.Argument(help="JSONL or CSV rows: text, label (safe/unsafe), category, stage.")],
    persona: PersonaOpt = None,
    min_recall: Annotated[Optional[float], typer.Option(help="Fail unless at least this share of unsafe rows is blocked.")] = None,
    min_pass: Annotated[Optional[float], typer.Option(help="Fail unless at least this share of safe rows passes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a labelled file through the rails: block rate of the unsafe rows, pass rate of the safe ones,
    precision and recall per category, and the rows they got wrong."""
    from forja.guard import evaluate_labelled, read_labelled

    guard = _guard(config, persona)
    report = evaluate_labelled(guard, read_labelled(path))
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
    else:
        from rich.console import Console
        from rich.table import Table

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{value:.1%}"

        table = Table("category", "rows", "blocked for it", "wrongly", "missed", "precision", "recall", title=str(path))
        for category, c in report["categories"].items():
            table.add_row(category, str(c["support"]), str(c["tp"]), str(c["fp"]), str(c["fn"]), pct(c["precision"]), pct(c["recall"]))
        console = Console()
        console.print(table)
        console.print(f"unsafe rows blocked: {pct(report['unsafe_blocked'])} of {report['unsafe']}   "
                      f"safe rows passed: {pct(report['safe_passed'])} of {report['safe']}   "
                      f"precision of a block: {pct(report['precision'])}   redacted: {report['redacted']}")
        for mistake in report["mistakes"]:
            why = f"blocked for {', '.join(mistake['blocked_for'])}" if mistake["blocked_for"] else "passed"
            console.print(f"  line {mistake['line']}: {mistake['label']} ({mistake['category'] or '-'}) {why}: {mistake['text'][:80]!r}",
                          markup=False)
    failures = []
    if min_recall is not None and (report["unsafe_blocked"] or 0) < min_recall:
        failures.append(f"{report['unsafe_blocked']:.1%} of unsafe rows blocked, below --min-recall {min_recall:.1%}")
    if min_pass is not None and (report["safe_passed"] or 0) < min_pass:
        failures.append(f"{report['safe_passed']:.1%} of safe rows passed, below --min-pass {min_pass:.1%}")
    if failures:
        raise ForjaError("guard test: " + "; ".join(failures))


knowledge_app = _typer("Index your files into collections and search them, with sources.")
app.add_typer(knowledge_app, name="knowledge")
CollectionArg = Annotated[str, typer.Argument(help="Collection name (letters, digits, _ . -).")]


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _shown(path: str) -> str:
    """A stored absolute path, relative to the current folder where it lies under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


@knowledge_app.command("add")
def knowledge_add(name: CollectionArg, paths: PathsArg, config: ConfigOpt = None) -> None:
    """Index files and folders into a collection (created if new); changed files are re-indexed, unchanged skipped."""
    from forja.knowledge import add

    def report(result) -> None:
        detail = f" ({result.chunks} chunks, {result.tokens} tokens)" if result.status in ("added", "replaced") else ""
        detail += f": {result.note}" if result.note else ""
        typer.echo(f"{result.status:>9}  {_shown(result.path)}{detail}")

    from forja.embeddings import canonical
    from forja.knowledge import show

    settings = settings_from(config)
    results = add(settings, name, paths, progress=report)
    if (model := show(settings, name).embedding_model) != canonical(settings.knowledge.embedding_model):
        typer.echo(f"note: {name} is embedded with {model}, the model it was made with, not "
                   f"knowledge.embedding_model ({settings.knowledge.embedding_model}); to change it, "
                   f"forja knowledge remove {name} and add its files again", err=True)
    counts = {s: sum(r.status == s for r in results) for s in ("added", "replaced", "unchanged", "no text", "removed")}
    typer.echo(f"{name}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), err=True)


@knowledge_app.command("list")
def knowledge_list(config: ConfigOpt = None) -> None:
    """List collections: files, chunks, tokens, last indexed."""
    from forja.knowledge import collections

    found = collections(settings_from(config))
    if not found:
        typer.echo("no collections yet (forja knowledge add NAME PATH...)")
    for c in found:
        typer.echo(f"{c.name}  {len(c.files)} files  {c.chunks} chunks  {c.tokens} tokens  indexed {_when(c.indexed_at)}")


@knowledge_app.command("show")
def knowledge_show(name: CollectionArg, config: ConfigOpt = None) -> None:
    """Show a collection's files with their chunks, tokens and when each was indexed."""
    from forja.knowledge import show

    c = show(settings_from(config), name)
    typer.echo(f"{c.name}: {len(c.files)} files, {c.chunks} chunks, {c.tokens} tokens, "
               f"embedded with {c.embedding_model}, created {_when(c.created_at)}")
    for f in c.files:
        typer.echo(f"  {_shown(f.path)}  {f.chunks} chunks  {f.tokens} tokens  indexed {_when(f.indexed_at)}")


@knowledge_app.command("remove")
def knowledge_remove(name: CollectionArg,
                     paths: Annotated[Optional[list[Path]], typer.Argument(help="Files or folders to take out; none: the whole collection.")] = None,
                     config: ConfigOpt = None) -> None:
    """Remove a collection, or only the files at or under PATH."""
    from forja.knowledge import remove

    removed = remove(settings_from(config), name, paths or None)
    typer.echo(f"{name}: removed {removed} files" + ("" if paths else " and the collection"))


@knowledge_app.command("search")
def knowledge_search(name: CollectionArg, query: Annotated[str, typer.Argument(help="What to look for.")],
                     top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Chunks to show (default knowledge.top_k).", min=1)] = None,
                     as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                     config: ConfigOpt = None) -> None:
    """Rank a collection's chunks for a query (vectors and keywords fused), with scores and sources."""
    import dataclasses

    from forja.knowledge import search

    hits = search(settings_from(config), name, query, top_k)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(h) for h in hits], ensure_ascii=False, indent=2))
        return
    for rank, hit in enumerate(hits, 1):
        where = _shown(hit.source) + (f" p.{hit.page}" if hit.page else "") + f" [{hit.start}:{hit.end}]"
        heading = f"  {' > '.join(hit.headings)}" if hit.headings else ""
        reranked = "" if hit.rerank_score is None else f" (reranker {hit.rerank_score:.3f})"
        typer.echo(f"{rank}. {hit.score:.4f}{reranked}  {where}{heading}")
        typer.echo("   " + " ".join(hit.text.split())[:300])


BenchBackendsOpt = Annotated[Optional[list[str]], typer.Option(
    help="llamacpp and/or pytorch (repeat); default: both, when llama.cpp is installed.")]


def check_bench_backends(names: list[str] | None) -> None:
    for name in names or []:
        if name not in ("llamacpp", "pytorch"):
            raise ConfigError(f"--backend is llamacpp or pytorch, not {name!r}")


bench_app = _typer("Measure: bench serve, batch, upstream, train, learn, agreement, repetition, tools and knowledge.")
app.add_typer(bench_app, name="bench")


@bench_app.command("serve")
def bench_serve(
    model: ModelOpt = None,
    clients: Annotated[int, typer.Option(help="Concurrent streaming clients.", min=1)] = 8,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer.", min=2)] = 64,
    compare: Annotated[bool, typer.Option(help="Also serve each prompt alone and compare with the batched answer.")] = True,
    backend: BenchBackendsOpt = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    reference_server: Annotated[Optional[Path], typer.Option(help="A llama-server binary: also measure llama.cpp's own server on the same GGUF (-np CLIENTS) and show it side by side.")] = None,
    adapters: Annotated[int, typer.Option(help="Instead: train this many tiny LoRA versions of the model and measure a server answering them all on one base (RSS vs one assistant; streams mixed over them vs to one).", min=0)] = 0,
    config: ConfigOpt = None,
) -> None:
    """Start the server on a model per backend; measure one stream, then concurrent streams (tokens/s, TTFT, latency)."""
    from forja.bench import adapters_benchmark, render_adapters, render_serve, serve_benchmark

    settings = settings_from(config, model=model)
    check_bench_backends(backend)
    if adapters:
        figures = adapters_benchmark(settings, settings.model, adapters=adapters, clients=clients, max_tokens=max_tokens,
                                     backends=backend, log=lambda line: typer.echo(line, err=True))
        typer.echo(render_adapters(figures))
        if as_json:
            as_json.write_text(json.dumps(figures, indent=2))
        return
    if reference_server and not (reference_server.is_file() and os.access(reference_server, os.X_OK)):
        raise ConfigError(f"--reference-server {reference_server} is not an executable file "
                          "(the path of a llama-server binary built from llama.cpp)")
    results = serve_benchmark(settings, settings.model, clients=clients, max_tokens=max_tokens, compare_alone=compare,
                              backends=backend, reference_server=reference_server,
                              log=lambda line: typer.echo(line, err=True))
    typer.echo(render_serve(results))
    if as_json:
        as_json.write_text(json.dumps(results, indent=2))


@bench_app.command("batch")
def bench_batch(
    model: ModelOpt = None,
    prompts: Annotated[int, typer.Option(help="Prompts answered each way.", min=1)] = 256,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer at most.", min=2)] = 32,
    backend: BenchBackendsOpt = None,
    reference_server: Annotated[Optional[Path], typer.Option(help="A llama-server binary (default: llama-server on the PATH): with --backend llamacpp, also llama.cpp's own server answering 8 at a time.")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    config: ConfigOpt = None,
) -> None:
    """The same prompts as one batch (forja generate --input) and one by one through the API; answers/s and tokens/s of each."""
    import shutil

    from forja.bench_batch import batch_benchmark, render_batch

    settings = settings_from(config, model=model)
    check_bench_backends(backend)
    found = shutil.which("llama-server")
    reference_server = reference_server or (Path(found) if found else None)
    if reference_server and not (reference_server.is_file() and os.access(reference_server, os.X_OK)):
        raise ConfigError(f"--reference-server {reference_server} is not an executable file "
                          "(the path of a llama-server binary built from llama.cpp)")
    results = batch_benchmark(settings, settings.model, prompts=prompts, max_tokens=max_tokens, backends=backend,
                              reference_server=reference_server, log=lambda line: typer.echo(line, err=True))
    typer.echo(render_batch(results))
    if as_json:
        as_json.write_text(json.dumps(results, indent=2))


@bench_app.command("upstream")
def bench_upstream(
    url: Annotated[str, typer.Option("--url", help="The upstream's base URL (http://127.0.0.1:8080/v1), already running.")],
    clients: Annotated[int, typer.Option(help="Requests sent at once in the concurrent part (1: none; llama-cpp-python's server takes one at a time).", min=1)] = 4,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer.", min=2)] = 64,
    rounds: Annotated[int, typer.Option(help="Alternated rounds (medians).", min=1)] = 5,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """What forja adds in front of an OpenAI-compatible upstream: the same requests sent directly and through forja serve --backend openai."""
    from forja.bench import render_upstream, upstream_benchmark

    figures = upstream_benchmark(url, clients=clients, max_tokens=max_tokens, rounds=rounds,
                                 log=lambda line: typer.echo(line, err=True))
    typer.echo(render_upstream(figures))
    if as_json:
        as_json.write_text(json.dumps(figures, indent=2))


@bench_app.command("learn")
def bench_learn(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write every answer and figure as JSON.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="faq_es.jsonl, corrections_es.jsonl and controls_es.jsonl (default: data/bench).")] = None,
) -> None:
    """The whole story on defaults: train a FAQ, ask it through forja serve, correct four answers over HTTP, retrain, ask again, and refuse a bad version."""
    from forja.bench_learn import BENCH_DATA, learn_benchmark, render_learn

    report = learn_benchmark(data_dir or BENCH_DATA, out, log=lambda line: typer.echo(line, err=True))
    typer.echo(render_learn(report))


@bench_app.command("tools")
def bench_tools(
    model: ModelOpt = None,
    backend: BenchBackendsOpt = None,
    rounds: Annotated[int, typer.Option(help="Rounds of the decode-rate comparison; medians count.", min=1)] = 5,
    data: Annotated[Optional[Path], typer.Option(help="Prompts, one JSON object a line: prompt, lang, tool (or null), arguments (default: data/bench/tools_es_en.jsonl).")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write every answer and figure to this JSON file.")] = None,
    config: ConfigOpt = None,
) -> None:
    """How well the model calls tools (tool_choice required and auto) and follows a JSON schema through forja serve, and what the grammar costs per token."""
    from forja.bench_tools import BENCH_DATA, render_tools, tools_benchmark

    settings = settings_from(config, model=model)
    check_bench_backends(backend)
    report = tools_benchmark(settings.model, backends=backend, data=data or BENCH_DATA, rounds=rounds,
                             extra_env={"FORJA_CONFIG": str(config)} if config else None,
                             log=lambda line: typer.echo(line, err=True))
    typer.echo(render_tools(report))
    if as_json:
        as_json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


@bench_app.command("agent")
def bench_agent(
    model: ModelOpt = None,
    backend: BenchBackendsOpt = None,
    traces: Annotated[int, typer.Option(help="Corrected traces to train on.", min=1)] = 12,
    held_out: Annotated[int, typer.Option(help="Other questions asked before and after.", min=1)] = 12,
    steps: Annotated[int, typer.Option(help="Training steps.", min=1)] = 60,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Does training on a few corrected tool-calling traces teach the model its tools? Held-out questions of one step (the calculator) and two (the time in a city, then the calculator) before and after, through the agent loop, on each backend."""
    from forja.bench_agent import agent_benchmark, render_agent
    from forja.engine import llamacpp

    settings = settings_from(config, model=model)
    check_bench_backends(backend)
    backends = tuple(backend or (["pytorch", "llamacpp"] if llamacpp.available() else ["pytorch"]))
    results = agent_benchmark(settings, settings.model, traces=traces, held_out=held_out, steps=steps,
                              backends=backends, log=lambda line: typer.echo(line, err=True))
    typer.echo(render_agent(results))
    if as_json:
        as_json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


@bench_app.command("knowledge")
def bench_knowledge(
    sizes: Annotated[str, typer.Option(help="Collection sizes in chunks, comma-separated (1k = 1000).")] = "1k,10k,100k",
    chunk_tokens: Annotated[int, typer.Option(help="knowledge.chunk_tokens of the generated collections (one catalogue paragraph a chunk at 48).", min=16, max=254)] = 48,
    queries: Annotated[int, typer.Option(help="Known-answer questions searched per size.", min=1)] = 100,
    threads: Annotated[int, typer.Option(help="torch threads: 1 as forja serve beside llama.cpp; 0 = torch's default (one per core).", min=0)] = 1,
    alone_every: Annotated[int, typer.Option(help="Embed alone only every n-th file (the ratio is theirs): 10 saves most of the comparison's time at 100k.", min=1)] = 1,
    random_vectors: Annotated[bool, typer.Option("--random-vectors", help="Random chunk vectors instead of MiniLM's (queries still embedded): the index and search at sizes whose embedding takes hours; no embedding-alone figure.")] = False,
    sqlite_vec: Annotated[bool, typer.Option("--sqlite-vec", help="Also rank the same vectors with the sqlite-vec extension, beside forja's numpy ranking (the bench extra installs it).")] = False,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write every figure to this JSON file.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Index generated Spanish and English catalogues at each size; chunks/s against embedding alone, disk, peak RSS, query p50/p95, hit@1/5."""
    from forja.bench_knowledge import knowledge_benchmark, parse_sizes, render_knowledge

    report = knowledge_benchmark(settings_from(config), parse_sizes(sizes), chunk_tokens=chunk_tokens,
                                 queries=queries, threads=threads or None,
                                 random_vectors=random_vectors, alone_every=alone_every, sqlite_vec=sqlite_vec,
                                 log=lambda line: typer.echo(line, err=True))
    typer.echo(render_knowledge(report))
    if as_json:
        as_json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


@bench_app.command("agreement")
def bench_agreement(
    model: ModelOpt = None,
    quant: Annotated[Optional[list[str]], typer.Option(help="Quantizations to export and check (repeat); default f16, q8_0, q4_k_m.")] = None,
    config: ConfigOpt = None,
) -> None:
    """How often llama.cpp's greedy answers equal PyTorch's, per GGUF quantization (speed vs fidelity)."""
    from forja.bench import agreement_benchmark, render_agreement
    from forja.engine import llamacpp

    if not llamacpp.available():
        raise ConfigError("llama-cpp-python is not installed (make install)")
    settings = settings_from(config, model=model)
    rows = agreement_benchmark(settings, settings.model, quant or ["f16", "q8_0", "q4_k_m"],
                               log=lambda line: typer.echo(line, err=True))
    typer.echo(render_agreement(settings.model, rows))


@bench_app.command("repetition")
def bench_repetition(
    model: ModelOpt = None,
    kind: Annotated[str, typer.Option(help="Which penalty: repetition (transformers', prompt and answer), frequency or presence (OpenAI's, answer only).")] = "repetition",
    penalty: Annotated[Optional[list[float]], typer.Option(help="Values to try (repeat); default repetition 1.0 1.1 1.2 1.3, frequency and presence 0 0.2 0.5 1.0.", min=-2.0, max=2.0)] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer (the page's default is generate.max_new_tokens).", min=1)] = 256,
    sampled: Annotated[bool, typer.Option(help="Also sampled answers (3 seeds per prompt) after the greedy ones.")] = True,
    temperature: Annotated[float, typer.Option(help="Temperature of the sampled rows.", min=0.0, max=2.0)] = 0.3,
    top_p: Annotated[float, typer.Option(help="top_p of the sampled rows.", min=0.01, max=1.0)] = 0.9,
    backend: BackendOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows (with the looping answers) as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """How many answers loop (a 6-word phrase 3 times) per penalty value, greedy and sampled, on the served engine."""
    from forja.bench import PENALTY_KINDS, render_repetition, repetition_benchmark
    from forja.config import GenerateSettings
    from forja.evaluate import runs_on

    if kind not in PENALTY_KINDS:
        raise ConfigError(f"--kind is {', '.join(PENALTY_KINDS)}, not {kind!r}")
    values = penalty or list(PENALTY_KINDS[kind])
    try:  # the values generate: itself accepts
        for value in values:
            GenerateSettings(**{f"{kind}_penalty": value})
    except ValidationError as exc:
        raise ConfigError(f"--penalty {exc.errors()[0]['input']}: {exc.errors()[0]['msg']} for {kind}_penalty") from None
    settings = settings_from(config, model=model)
    if backend is not None:
        settings = _with_serve(settings, backend=backend)
    rows = repetition_benchmark(settings, settings.model, values, kind=kind, max_tokens=max_tokens, sampled=sampled,
                                temperature=temperature, top_p=top_p, log=lambda line: typer.echo(line, err=True))
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    typer.echo(render_repetition(settings.model, runs_on(settings), max_tokens, rows))


@bench_app.command("train")
def bench_train(
    model: ModelOpt = None,
    data: Annotated[Optional[Path], typer.Option(help="Dialogue files (default: the repository's data/sample/dialogue).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Train steps × 4 examples on every side instead of one epoch of the data.", min=1)] = None,
    max_length: Annotated[int, typer.Option(help="Truncation and padding length of the references, forja's max_seq_length, TRL's packed length.", min=16)] = 256,
    rounds: Annotated[int, typer.Option(help="Rounds of every side; each side's median round is reported.", min=1)] = 3,
    side: Annotated[Optional[list[str]], typer.Option(help="seeds, padded, trl or forja (repeat); default: all four.")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--out", "--json", help="Also write every figure to this JSON file.")] = None,
    method: Annotated[Optional[str], typer.Option(help="dpo or kto: forja's preference training against TRL's DPOTrainer/KTOTrainer instead (default: supervised).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train with forja and three references (the tutorial recipe, padded, TRL with packing) on the same examples; tokens/s, memory, loss, roofline. With --method dpo|kto: forja against TRL's preference trainers."""
    from forja.bench_train import preference_benchmark, render_preferences, render_train, train_benchmark

    settings = settings_from(config, model=model)
    if method is not None:
        if side:
            raise ConfigError("--side chooses among the supervised references; --method dpo|kto runs forja and TRL")
        report = preference_benchmark(settings.model, data, steps, max_length, method, out=as_json, rounds=rounds,
                                      log=lambda line: typer.echo(line, err=True))
        return typer.echo(render_preferences(report))
    report = train_benchmark(settings.model, data, steps, max_length, out=as_json, rounds=rounds, sides=side,
                             log=lambda line: typer.echo(line, err=True))
    typer.echo(render_train(report))


@app.command("eval")
def eval_(
    testset: Annotated[Path, typer.Option("--testset", "-t", help="Questions with ground truth: .csv, .jsonl or .xlsx.")],
    model: ModelOpt = None,
    compare: Annotated[Optional[list[str]], typer.Option("--compare", help="Another model or persona to answer the same questions (repeatable).")] = None,
    judge: Annotated[Optional[str], typer.Option(help="LLM judge: a model forja can load, or an OpenAI-compatible base URL (http://host/v1).")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="The judge's model name at that URL (default: the first it lists); key from FORJA_JUDGE_API_KEY or OPENAI_API_KEY.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default FORJA_HOME/evals/DATE-TIME).")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", help="METRIC=VALUE (exact_match, token_f1, rouge_l, semantic, judge, contains_fact, faithfulness): exit 1 when the first model's mean is lower (repeatable).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer (greedy, with generate:'s penalties).", min=1)] = 128,
    question_col: Annotated[str, typer.Option(help="Column holding the questions.")] = "question",
    answer_col: Annotated[str, typer.Option(help="Column holding the ground-truth answers.")] = "answer",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    without_knowledge: Annotated[bool, typer.Option("--without-knowledge", help="Also answer with each persona that has knowledge, without it (labelled 'NAME (no knowledge)').")] = False,
    backend: BackendOpt = None,
    knowledge: Annotated[Optional[str], typer.Option("--knowledge", help="Score retrieval from this knowledge collection instead of answers (rows: question, source, optional page, heading, fact); also chosen when the rows name a source.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer a test set with one or more models; score exact match, F1, ROUGE-L, similarity, a judge and, for personas with knowledge, the fact and faithfulness; write reports. With sources: score retrieval (hit@k, MRR)."""
    from forja.evaluate import EvalError, check_thresholds, evaluate, load_testset, parse_thresholds, write_reports
    from forja.evaluate_retrieval import is_retrieval_testset

    settings = settings_from(config, model=model)
    if knowledge or is_retrieval_testset(testset):
        if compare or judge:
            raise EvalError(f"{'--compare' if compare else '--judge'} is for answers; this test set scores "
                            "retrieval (--knowledge, or rows with a source), which no model answers")
        _eval_retrieval(settings, testset, knowledge, out, fail_under or [], question_col)
        return
    if backend is not None:
        settings = _with_serve(settings, backend=backend)
    thresholds = parse_thresholds(fail_under or [])
    for needs_judge in ("judge", "faithfulness"):
        if needs_judge in thresholds and not judge:
            raise EvalError(f"--fail-under {needs_judge}=... needs a judge: add --judge MODEL_OR_URL")
    cases = load_testset(testset, question_col, answer_col)
    result = evaluate([settings.model, *(compare or [])], cases, settings, judge=judge, judge_model=judge_model,
                      max_new_tokens=max_tokens, progress=not quiet, without_knowledge=without_knowledge)
    result.testset = str(testset)
    if out is None:
        out = settings.home / "evals" / time.strftime("%Y%m%d-%H%M%S")
    paths = write_reports(result, out)
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", *result.models, title=f"{len(cases)} questions: mean [95% interval]")
    for metric in result.metrics:
        table.add_row(metric, *(f"{result.means[m][metric]:.3f} [{result.intervals[m][metric][0]:.3f}, "
                                f"{result.intervals[m][metric][1]:.3f}]" if metric in result.means[m] else "-"
                                for m in result.models))
    Console().print(table)
    stats = result.stats
    typer.echo(f"{stats.get('answers_computed', 0)} answers generated, {stats.get('answers_cached', 0)} from cache "
               f"(answers by {stats.get('answers_backend', '-')})"
               + (f"; {stats.get('judge_computed', 0)} judge calls, {stats.get('judge_cached', 0)} from cache" if judge else "")
               + f"; {stats['seconds']:.1f}s")
    typer.echo(f"reports: {paths['html']} (and rows.csv, rows.jsonl, summary.md in {out})")
    failures = check_thresholds(result, thresholds)
    if failures:
        raise EvalError(f"--fail-under: {'; '.join(failures)}")


def _eval_retrieval(settings: Settings, testset: Path, knowledge: str | None, out: Path | None,
                    fail_under: list[str], question_col: str) -> None:
    """forja eval on a test set of sources: where each question's chunk ranks in its collection."""
    from rich.console import Console
    from rich.table import Table

    from forja.evaluate import EvalError
    from forja.evaluate_retrieval import (METRIC_LABELS, RETRIEVAL_METRICS, check_retrieval_thresholds,
                                          evaluate_retrieval, load_retrieval_testset, parse_retrieval_thresholds,
                                          write_retrieval_reports)

    thresholds = parse_retrieval_thresholds(fail_under)
    cases = load_retrieval_testset(testset, knowledge, question_col)
    result = evaluate_retrieval(cases, settings)
    result.testset = str(testset)
    out = out or settings.home / "evals" / time.strftime("%Y%m%d-%H%M%S")
    paths = write_retrieval_reports(result, out)
    table = Table("metric", "mean [95% interval]", title=f"{len(cases)} questions, retrieval")
    for metric in RETRIEVAL_METRICS:
        low, high = result.intervals[metric]
        table.add_row(METRIC_LABELS[metric], f"{result.means[metric]:.3f} [{low:.3f}, {high:.3f}]")
    Console().print(table)
    for row in result.rows:
        top = row["hits"][0] if row["hits"] else None
        found = (Path(top["source"]).name + (f" › {top['headings'][-1]}" if top["headings"] else "")) if top else "nothing"
        typer.echo(f"{row['case']:>3}. rank {row['rank'] or '-':>2}  {row['question'][:60]}  (first: {found[:70]})")
    typer.echo(f"{result.stats['seconds']:.1f}s; reports: {paths['html']} (and rows.csv, rows.jsonl, summary.md in {out})")
    failures = check_retrieval_thresholds(result, thresholds)
    if failures:
        raise EvalError(f"--fail-under: {'; '.join(failures)}")


@app.command("config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the resolved settings (file < environment < flags) as YAML."""
    import yaml

    settings = settings_from(config)
    typer.echo(yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False, allow_unicode=True))


def main() -> None:
    if sys.argv[1:2] == ["train"]:
        _start_with_jemalloc()
    app()


def _start_with_jemalloc() -> None:
    """Run `forja train` again, from the start, with jemalloc preloaded (see config.jemalloc_env)."""
    if not wants_jemalloc(os.environ):
        return
    env = jemalloc_env(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    typer.echo("forja: note: jemalloc is not installed (apt-get install libjemalloc2); training uses the system "
               "allocator and peaks about 300 MB higher (FORJA_ALLOCATOR=system hides this note)", err=True)


if __name__ == "__main__":
    main()
