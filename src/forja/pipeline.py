"""`forja run`: every assistant of the `pipeline:` section prepared → trained → evaluated → gated → promoted →
exported → packaged, a step skipped when what it reads has not changed (a hash of its inputs recorded with its
outputs in FORJA_HOME/pipelines/ASSISTANT/STEP/). Each run writes a report and what reproduces it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from forja.config import (MODEL_FORMATS, PACKAGE_FORMATS, PIPELINE_STEPS, AssistantDefaults, ConfigError, ForjaError,
                          Persona, PipelineSettings, Settings, TrainSettings, config_path, read_yaml)

STEPS = PIPELINE_STEPS
STATE_FILE = "state.json"  # in FORJA_HOME/pipelines/ASSISTANT/STEP: the inputs' hash and the outputs
RECORD_FORMAT = 1  # bump when what a step records (or how inputs are hashed) changes: every step reruns
# what the reproduce/packages.txt of a run lists, besides Python and the OS
PACKAGES = ("forja", "torch", "transformers", "peft", "tokenizers", "safetensors", "accelerate", "gguf",
            "llama-cpp-python", "pydantic", "numpy")
GATE_FAILED_EXIT = 2  # as `forja train --from-feedback`: a CI job tells a failed gate from a crash


class PipelineError(ForjaError):
    """A pipeline that cannot run as written; one line naming the assistant, step or field."""


class GateFailed(PipelineError):
    """An assistant's version scored under a fail_under threshold: it is not promoted, exported or packaged."""


@dataclass
class StepResult:
    """What happened to one step of one assistant."""

    step: str
    status: str  # ran, skipped, would run, failed, not run
    reason: str
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AssistantRun:
    """One assistant's steps in a run, and what they left (its version, eval means, files)."""

    name: str
    spec: AssistantDefaults
    steps: list[StepResult] = field(default_factory=list)

    @property
    def failed(self) -> StepResult | None:
        return next((s for s in self.steps if s.status == "failed"), None)

    def outputs(self, step: str) -> dict[str, Any]:
        return next((s.outputs for s in self.steps if s.step == step), {})


@dataclass
class PipelineRun:
    """A whole `forja run`: every assistant chosen, the run directory with its report."""

    assistants: list[AssistantRun]
    directory: Path | None
    dry_run: bool

    @property
    def gate_failed(self) -> bool:
        return any(a.failed is not None and a.failed.step == "gate" for a in self.assistants)

    @property
    def failed(self) -> list[AssistantRun]:
        return [a for a in self.assistants if a.failed is not None]


# ---------------------------------------------------------------------------------------------
# Reading the pipeline


def load_pipeline(settings: Settings, file: Path | None = None) -> tuple[PipelineSettings, Path]:
    """The pipeline to run and the folder its relative paths start from: `file` (a `pipeline:` section, or
    the section's contents at the top level) else the config's `pipeline:` section."""
    if file is None:
        source = config_path()
        return settings.pipeline, (source.parent if source is not None else Path.cwd())
    data = read_yaml(file)
    section = data.get("pipeline", data)
    from pydantic import ValidationError

    try:
        pipeline = PipelineSettings.model_validate(section)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in ("pipeline", *err["loc"]))
        raise ConfigError(f"{file}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    return pipeline, file.resolve().parent


def choose(pipeline: PipelineSettings, names: list[str]) -> list[Any]:
    """The assistants named (all when none is), in the pipeline's order."""
    if not pipeline.assistants:
        raise PipelineError("no assistants to run: list them under pipeline.assistants in forja.yaml "
                            "(or in the file given with --file)")
    known = [a.name for a in pipeline.assistants]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PipelineError(f"no assistant named {unknown[0]!r} in the pipeline; its assistants: {', '.join(known)}")
    return [a for a in pipeline.assistants if not names or a.name in names]


def check_steps(force: list[str], start: str | None, only: list[str]) -> None:
    for flag, steps in (("--force", force), ("--from", [start] if start else []), ("--only", only)):
        for step in steps:
            if step not in STEPS:
                raise PipelineError(f"{flag} {step!r}: not a step; the steps are {', '.join(STEPS)}")
    if start and only:
        raise PipelineError("--from and --only choose steps two ways; give one of them")


# ---------------------------------------------------------------------------------------------
# Inputs: what each step reads, hashed. A step's inputs include the hash of the step before it, so a
# change reruns every step after the first one it reaches, and nothing before it.


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_hashes(paths: list[str]) -> dict[str, str]:
    """Every file the data paths name (folders read whole), by path, with its content hash; an `hf:`
    dataset by its name (what the hub serves under it is not hashed)."""
    from forja.data import expand_paths

    hashes: dict[str, str] = {}
    for path in paths:
        if path.startswith("hf:"):
            hashes[path] = "hub dataset (not hashed)"
            continue
        if not Path(path).exists():
            raise PipelineError(f"data path {path} does not exist")
        for file in expand_paths([path]):
            hashes[file.as_posix()] = sha256_file(file)
    return hashes


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Context:
    """What the steps of one assistant share: settings, its resolved spec, where its paths start and records go."""

    settings: Settings
    name: str
    spec: AssistantDefaults
    root: Path  # relative data and test-set paths start here
    progress: bool
    log: Callable[[str], None]
    keys: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.settings.home / "pipelines" / self.name

    def step_dir(self, step: str) -> Path:
        return self.directory / step

    def path(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def base(self) -> str:
        return self.spec.base or self.settings.model

    def hyper(self) -> TrainSettings:
        config = TrainSettings.model_validate({**self.settings.train.model_dump(), **self.spec.train})
        if config.system is None and self.spec.persona.system:
            config = config.model_copy(update={"system": self.spec.persona.system})
        return config

    def data_paths(self) -> list[str]:
        if not self.spec.data:
            raise PipelineError(f"assistant {self.name!r} has no data: list its files or folders under data:")
        return [p if p.startswith("hf:") else str(self.path(p)) for p in self.spec.data]

    def persona(self, version: str) -> Persona:
        """The assistant as a served persona: its name, system prompt, sampling and knowledge, on its version."""
        persona = self.spec.persona
        return Persona(name=self.name, system=persona.system, model=version, temperature=persona.temperature,
                       top_p=persona.top_p, max_tokens=persona.max_tokens, knowledge=persona.knowledge,
                       description=f"forja run: {self.name}")

    def served_settings(self, version: str) -> Settings:
        """The settings with this assistant among serve.personas (what an Ollama Modelfile or a package reads)."""
        personas = [p for p in self.settings.serve.personas if p.name != self.name] + [self.persona(version)]
        return self.settings.model_copy(update={"serve": self.settings.serve.model_copy(update={"personas": personas})})


def step_inputs(ctx: Context, step: str) -> dict[str, Any]:
    """What `step` reads, as values and hashes; the recorded copy says why a step reruns."""
    from forja.train import code_version

    spec = ctx.spec
    before = STEPS[STEPS.index(step) - 1] if step != STEPS[0] else None
    inputs: dict[str, Any] = {"record_format": RECORD_FORMAT, "code_version": code_version()}
    if before is not None:
        inputs["after"] = ctx.keys[before]
    if step == "prepare":
        inputs["data"] = data_hashes(ctx.data_paths())
        inputs["read_options"] = [s.model_dump() for s in ctx.settings.data.sources]
        inputs["split"] = {"seed": ctx.hyper().seed, "val_fraction": ctx.hyper().val_fraction}
    elif step == "train":
        from forja.models import fingerprint

        inputs["base"] = fingerprint(ctx.base, ctx.settings)
        inputs["train"] = ctx.hyper().model_dump()
    elif step == "eval":
        testset = spec.eval.testset
        inputs["testset"] = {str(testset): sha256_file(ctx.path(testset))} if testset else None
        if testset and not ctx.path(testset).is_file():
            raise PipelineError(f"assistant {ctx.name!r}: test set {ctx.path(testset)} does not exist")
        inputs["eval"] = {"max_tokens": spec.eval.max_tokens, "generate": ctx.settings.generate.model_dump()}
    elif step == "gate":
        inputs["fail_under"] = spec.eval.fail_under
    elif step == "promote":
        inputs["persona"] = spec.persona.model_dump()
        inputs["activate"] = spec.activate
    elif step == "export":
        inputs["formats"] = [f for f in spec.export if f in MODEL_FORMATS]
        inputs["quant"] = spec.quant
    elif step == "package":
        inputs["formats"] = [f for f in spec.export if f in PACKAGE_FORMATS]
    return inputs


def read_state(ctx: Context, step: str) -> dict[str, Any] | None:
    path = ctx.step_dir(step) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # a record half written by a killed run: the step runs again


def write_state(ctx: Context, step: str, inputs: dict[str, Any], outputs: dict[str, Any], seconds: float) -> None:
    record = {"assistant": ctx.name, "step": step, "key": ctx.keys[step], "inputs": inputs, "outputs": outputs,
              "seconds": round(seconds, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = ctx.step_dir(step) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def why_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The inputs that differ from the recorded ones, in the user's words."""
    words = {"after": "the step before it reran with new inputs", "code_version": "forja's code changed",
             "record_format": "forja records steps differently now", "base": "the base model changed",
             "train": "the train settings changed", "testset": "the test set changed", "eval": "the eval settings changed",
             "fail_under": "the thresholds changed", "persona": "the persona changed", "activate": "activate changed",
             "formats": "the formats changed", "quant": "the quantization changed",
             "read_options": "data.sources options changed", "split": "the split changed"}
    reasons = []
    for key in new:
        if old.get(key) == new[key]:
            continue
        if key == "data":
            before, now = old.get("data") or {}, new["data"]
            changed = sorted(p for p in set(before) | set(now) if before.get(p) != now.get(p))
            shown = ", ".join(Path(p).name for p in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            reasons.append(f"data changed ({shown})")
        else:
            reasons.append(words.get(key, f"{key} changed"))
    return "; ".join(reasons) or "its record differs"


# ---------------------------------------------------------------------------------------------
# The steps. Each takes the context and the outputs recorded so far, and returns its own outputs.


def do_prepare(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from forja.data import prepare, sources

    out = ctx.step_dir("prepare") / "data.jsonl"
    hyper = ctx.hyper()
    summary = prepare(sources(ctx.data_paths(), ctx.settings.data.sources), out, val_fraction=hyper.val_fraction,
                      seed=hyper.seed, allow=ctx.settings.guard.pii.allow)
    return {"data": str(out), "hash": summary.hash, "train_rows": summary.train_rows, "val_rows": summary.val_rows}


def do_train(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from forja import models
    from forja.train import LOSS_PLOT, new_run, train

    settings = ctx.settings
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"{ctx.name}-{stamp}", 1
    while (settings.versions_dir / name).exists() or (settings.runs_dir / name).exists():
        n += 1
        name = f"{ctx.name}-{stamp}-{n}"
    run = new_run(settings, [Path(done["prepare"]["data"])], name, ctx.base, ctx.hyper())
    version = train(settings, run, progress=ctx.progress)
    metrics = models.read_version(version).get("metrics", {})
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"version": name, "path": str(version), "loss_plot": str(version / LOSS_PLOT), "metrics": shown}


def do_eval(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from forja.evaluate import evaluate, load_testset, write_reports

    if ctx.spec.eval.testset is None:
        return {"testset": None}
    testset = ctx.path(ctx.spec.eval.testset)
    version = done["train"]["version"]
    cases = load_testset(testset)
    result = evaluate([version], cases, ctx.settings, max_new_tokens=ctx.spec.eval.max_tokens, progress=ctx.progress)
    result.testset = str(testset)
    out = ctx.step_dir("eval") / "report"
    shutil.rmtree(out, ignore_errors=True)
    paths = write_reports(result, out)
    model = result.models[0]
    return {"testset": str(testset), "cases": len(cases), "means": result.means[model],
            "intervals": {m: list(v) for m, v in result.intervals[model].items()},
            "report": str(paths["html"]), "summary": str(paths["markdown"])}


def do_gate(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    means = done["eval"].get("means") or {}
    checks, failures = {}, []
    for metric, minimum in ctx.spec.eval.fail_under.items():
        if not done["eval"].get("testset"):
            raise GateFailed(f"assistant {ctx.name!r}: fail_under {metric} needs a test set (eval.testset)")
        mean = means.get(metric)
        passed = mean is not None and mean >= minimum
        checks[metric] = {"mean": mean, "fail_under": minimum, "passed": passed}
        if not passed:
            failures.append(f"{metric} mean {'none' if mean is None else f'{mean:.3f}'} < {minimum:g}")
    if failures:
        raise GateFailed(f"gate failed for {ctx.name} ({done['train']['version']}): {'; '.join(failures)}")
    return {"passed": True, "checks": checks}


def do_promote(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The version becomes the assistant's current one; the one before stays for rollback (its record keeps
    it); with activate, it also becomes the active model. personas.yaml lists each assistant as it serves."""
    import yaml

    from forja import models

    version = done["train"]["version"]
    earlier = read_state(ctx, "promote")
    previous = (earlier or {}).get("outputs", {}).get("version")
    previous = previous if previous != version else (earlier or {}).get("outputs", {}).get("previous")
    activated = False
    if ctx.spec.activate and models.active_model(ctx.settings) != version:
        models.promote(ctx.settings, version, reason=f"forja run: {ctx.name} passed its gate")
        activated = True
    personas_file = ctx.settings.home / "pipelines" / "personas.yaml"
    entries = yaml.safe_load(personas_file.read_text(encoding="utf-8")) if personas_file.is_file() else None
    served = [p for p in ((entries or {}).get("serve", {}).get("personas") or []) if p.get("name") != ctx.name]
    served.append(ctx.persona(version).model_dump(exclude_defaults=True))
    personas_file.write_text("# forja run: each assistant as a persona on its current version; copy these under\n"
                             "# serve.personas in forja.yaml to serve them all from one `forja serve`\n"
                             + yaml.safe_dump({"serve": {"personas": served}}, sort_keys=False, allow_unicode=True),
                             encoding="utf-8")
    return {"version": version, "previous": previous, "activated": activated, "personas": str(personas_file)}


def do_export(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from forja.export import export

    version = done["train"]["version"]
    out = ctx.step_dir("export") / "files"
    shutil.rmtree(out, ignore_errors=True)
    files: list[str] = []
    for fmt in (f for f in ctx.spec.export if f in MODEL_FORMATS):
        written = export(ctx.served_settings(version), version, fmt, ctx.spec.quant, out,
                         ctx.name if fmt == "ollama" else None, evaluation=done["eval"], gate=done["gate"])
        files += [str(p) for p in written]
    return {"files": files}


def do_package(ctx: Context, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    version = done["train"]["version"]
    out = ctx.step_dir("package") / "files"
    shutil.rmtree(out, ignore_errors=True)
    files: list[str] = []
    for fmt in (f for f in ctx.spec.export if f in PACKAGE_FORMATS):
        from forja.export import package

        files += [str(p) for p in package(ctx.served_settings(version), version, fmt, out / fmt, persona=ctx.name,
                                          quant=ctx.spec.quant)]
    return {"files": files}


RUNNERS: dict[str, Callable[[Context, dict[str, dict[str, Any]]], dict[str, Any]]] = {
    "prepare": do_prepare, "train": do_train, "eval": do_eval, "gate": do_gate, "promote": do_promote,
    "export": do_export, "package": do_package,
}


def outputs_present(ctx: Context, step: str, outputs: dict[str, Any]) -> bool:
    """Whether what a step recorded is still there (a deleted version or export makes it run again)."""
    from forja import models

    if step == "prepare":
        return Path(outputs.get("data", "")).is_file()
    if step == "train":
        return models.version_dir(ctx.settings, outputs.get("version", "")) is not None
    if step == "eval" and outputs.get("testset"):
        return Path(outputs.get("report", "")).is_file()
    if step in ("export", "package"):
        return all(Path(p).exists() for p in outputs.get("files", []))
    return True


# ---------------------------------------------------------------------------------------------
# Running


def run_assistant(ctx: Context, force: set[str], chosen: set[str], dry_run: bool) -> AssistantRun:
    """The steps of one assistant in order; a step not chosen (--only, --from) uses what it recorded."""
    result = AssistantRun(ctx.name, ctx.spec)
    done: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        try:
            inputs = step_inputs(ctx, step)
        except ForjaError as exc:
            result.steps.append(StepResult(step, "failed", str(exc)))
            break
        ctx.keys[step] = _key(inputs)
        state = read_state(ctx, step)
        current = state is not None and state.get("key") == ctx.keys[step] and outputs_present(ctx, step, state["outputs"])
        if step not in chosen:
            if not current:
                reason = (f"not chosen, and no current record of it: run it first (forja run {ctx.name} --only {step})")
                result.steps.append(StepResult(step, "failed", reason))
                break
            result.steps.append(StepResult(step, "skipped", "not chosen; its record is current", outputs=state["outputs"]))
            done[step] = state["outputs"]
            continue
        if step in force:
            reason = "forced"
        elif current:
            result.steps.append(StepResult(step, "skipped", "inputs unchanged", outputs=state["outputs"]))
            done[step] = state["outputs"]
            continue
        elif state is None:
            reason = "never ran"
        elif state.get("key") == ctx.keys[step]:
            reason = "its outputs are gone"
        else:
            reason = why_changed(state.get("inputs", {}), inputs)
        if dry_run:
            result.steps.append(StepResult(step, "would run", reason))
            if state is not None:
                done[step] = state.get("outputs", {})
            continue
        ctx.log(f"{ctx.name}: {step} ({reason})")
        started = time.perf_counter()
        try:
            outputs = RUNNERS[step](ctx, done)
        except ForjaError as exc:
            result.steps.append(StepResult(step, "failed", str(exc), time.perf_counter() - started))
            break
        seconds = time.perf_counter() - started
        write_state(ctx, step, inputs, outputs, seconds)
        result.steps.append(StepResult(step, "ran", reason, seconds, outputs))
        done[step] = outputs
    for step in STEPS[len(result.steps):]:
        failed = result.failed
        result.steps.append(StepResult(step, "not run", f"{failed.step} failed" if failed else ""))
    return result


def run(settings: Settings, names: list[str] | None = None, *, file: Path | None = None, force: list[str] = (),
        start: str | None = None, only: list[str] = (), dry_run: bool = False, progress: bool = False,
        log: Callable[[str], None] = lambda line: None) -> PipelineRun:
    """`forja run`: the chosen assistants' steps in order, then (unless a dry run) the run's report."""
    force, only = list(force), list(only)
    check_steps(force, start, only)
    pipeline, root = load_pipeline(settings, file)
    chosen_steps = set(only) if only else set(STEPS[STEPS.index(start):]) if start else set(STEPS)
    forced = set(force) | (set(only) if only else set(STEPS[STEPS.index(start):]) if start else set())
    results = []
    for assistant in choose(pipeline, names or []):
        ctx = Context(settings, assistant.name, assistant.resolved(pipeline.defaults), root, progress, log)
        results.append(run_assistant(ctx, forced, chosen_steps, dry_run))
    outcome = PipelineRun(results, None, dry_run)
    if not dry_run:
        outcome.directory = write_run(settings, outcome, pipeline, root)
    return outcome


# ---------------------------------------------------------------------------------------------
# The run's report and what reproduces it


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_run(settings: Settings, outcome: PipelineRun, pipeline: PipelineSettings, root: Path) -> Path:
    """FORJA_HOME/pipelines/runs/STAMP: report.md, report.html (loss curves, eval tables, gates) and
    reproduce/ (the resolved config, the data and step hashes, the package versions)."""
    import yaml

    from forja.train import code_version

    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory, n = settings.home / "pipelines" / "runs" / stamp, 1
    while directory.exists():
        n += 1
        directory = directory.with_name(f"{stamp}-{n}")
    (directory / "reproduce").mkdir(parents=True)
    resolved = json.loads(settings.model_dump_json())
    resolved["pipeline"] = {"defaults": pipeline.defaults.model_dump(mode="json"), "assistants": [
        {"name": a.name, **a.resolved(pipeline.defaults).model_dump(mode="json")} for a in pipeline.assistants]}
    resolved["pipeline"]["root"] = str(root)
    (directory / "reproduce" / "config.yaml").write_text(
        "# the settings this run resolved (pipeline: each assistant with its defaults laid in); rerun with\n"
        "# forja run --file reproduce/config.yaml (from the folder named by pipeline.root)\n"
        + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")
    hashes = {}
    for assistant in outcome.assistants:
        records = {step: read_state_of(settings, assistant.name, step) for step in STEPS}
        hashes[assistant.name] = {
            "data": (records["prepare"] or {}).get("inputs", {}).get("data"),
            "prepared_data_hash": assistant.outputs("prepare").get("hash"),
            "testset": (records["eval"] or {}).get("inputs", {}).get("testset"),
            "base": (records["train"] or {}).get("inputs", {}).get("base"),
            "steps": {step: (r or {}).get("key") for step, r in records.items()},
        }
    (directory / "reproduce" / "hashes.json").write_text(json.dumps(hashes, indent=2, ensure_ascii=False) + "\n")
    versions = {"forja_code": code_version(), **package_versions()}
    (directory / "reproduce" / "packages.txt").write_text("".join(f"{k}=={v}\n" for k, v in versions.items()))
    plots = {}
    for assistant in outcome.assistants:
        plot = Path(assistant.outputs("train").get("loss_plot", ""))
        if plot.is_file():
            shutil.copy(plot, directory / f"loss-{assistant.name}.png")
            plots[assistant.name] = base64.b64encode(plot.read_bytes()).decode()
    (directory / "report.md").write_text(render_markdown(outcome, versions), encoding="utf-8")
    (directory / "report.html").write_text(render_html(outcome, versions, plots), encoding="utf-8")
    (directory / "run.json").write_text(json.dumps(
        {"assistants": {a.name: [{"step": s.step, "status": s.status, "reason": s.reason, "seconds": round(s.seconds, 2)}
                                 for s in a.steps] for a in outcome.assistants}}, indent=2) + "\n")
    return directory


def read_state_of(settings: Settings, name: str, step: str) -> dict[str, Any] | None:
    path = settings.home / "pipelines" / name / step / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def gate_line(assistant: AssistantRun) -> str:
    step = next(s for s in assistant.steps if s.step == "gate")
    if step.status in ("ran", "skipped"):
        checks = step.outputs.get("checks") or {}
        shown = ", ".join(f"{m} {c['mean']:.3f} ≥ {c['fail_under']:g}" for m, c in checks.items())
        return f"passed ({shown})" if checks else "passed (no thresholds)"
    return "FAILED: " + step.reason if step.status == "failed" else step.status


def render_markdown(outcome: PipelineRun, versions: dict[str, str]) -> str:
    lines = ["# forja run", "", f"forja {versions['forja_code']}, Python {versions['python']}, {versions['platform']}", ""]
    for assistant in outcome.assistants:
        lines += [f"## {assistant.name}", "", f"version: {assistant.outputs('train').get('version', '-')}; "
                  f"base: {assistant.spec.base or '(the configured model)'}; gate: {gate_line(assistant)}", "",
                  "| step | status | why | seconds |", "|---|---|---|---|"]
        lines += [f"| {s.step} | {s.status} | {s.reason.replace('|', '/')} | {s.seconds:.1f} |" for s in assistant.steps]
        means = assistant.outputs("eval").get("means")
        if means:
            cases = assistant.outputs("eval")["cases"]
            lines += ["", f"eval on {assistant.outputs('eval')['testset']} ({cases} question{'s' if cases != 1 else ''}):",
                      "", "| metric | mean | 95% interval |", "|---|---|---|"]
            intervals = assistant.outputs("eval").get("intervals", {})
            lines += [f"| {m} | {v:.3f} | {intervals.get(m, ['-', '-'])[0]:.3f} – {intervals.get(m, ['-', '-'])[1]:.3f} |"
                      for m, v in means.items()]
        if assistant.outputs("train").get("loss_plot"):
            lines += ["", f"![loss of {assistant.name}](loss-{assistant.name}.png)"]
        files = assistant.outputs("export").get("files", []) + assistant.outputs("package").get("files", [])
        if files:
            lines += ["", "files:", *[f"- {f}" for f in files]]
        lines.append("")
    return "\n".join(lines)


REPORT_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>forja run</title>
<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
.failed{color:#b00020;font-weight:600}.ran{color:#0a6}.skipped{color:#777}img{max-width:100%}</style></head><body>
<h1>forja run</h1><p>forja {{ versions.forja_code }}, Python {{ versions.python }}, {{ versions.platform }}</p>
{% for a in assistants %}<h2>{{ a.name }}</h2>
<p>version <b>{{ a.outputs('train').get('version', '-') }}</b>; gate: {{ gate(a) }}</p>
<table><tr><th>step</th><th>status</th><th>why</th><th>seconds</th></tr>
{% for s in a.steps %}<tr><td>{{ s.step }}</td><td class="{{ s.status.split()[0] }}">{{ s.status }}</td><td>{{ s.reason }}</td>
<td>{{ '%.1f' % s.seconds }}</td></tr>{% endfor %}</table>
{% set ev = a.outputs('eval') %}{% if ev.get('means') %}<h3>eval: {{ ev.testset }} ({{ ev.cases }} question{{ 's' if ev.cases != 1 }})</h3>
<table><tr><th>metric</th><th>mean</th><th>95% interval</th></tr>{% for m, v in ev.means.items() %}
<tr><td>{{ m }}</td><td>{{ '%.3f' % v }}</td><td>{{ '%.3f' % ev.intervals[m][0] }} – {{ '%.3f' % ev.intervals[m][1] }}</td></tr>
{% endfor %}</table>{% endif %}
{% if plots.get(a.name) %}<h3>loss</h3><img alt="loss curves of {{ a.name }}" src="data:image/png;base64,{{ plots[a.name] }}">{% endif %}
{% set files = a.outputs('export').get('files', []) + a.outputs('package').get('files', []) %}{% if files %}<h3>files</h3>
<ul>{% for f in files %}<li><code>{{ f }}</code></li>{% endfor %}</ul>{% endif %}
{% endfor %}</body></html>
"""


def render_html(outcome: PipelineRun, versions: dict[str, str], plots: dict[str, str]) -> str:
    from jinja2 import Environment

    template = Environment(autoescape=True).from_string(REPORT_HTML)
    return template.render(assistants=outcome.assistants, versions=versions, plots=plots, gate=gate_line)
