"""Fine-tune a model on prepared data (LoRA or full), with checkpoints, resume and model versions.

`forja train --data data/sample --name mi-asistente-v1` prepares the files, trains in FORJA_HOME/runs/NAME,
checkpoints every N steps and on Ctrl-C (`forja train --resume NAME` continues), and publishes the result
as the self-describing model version FORJA_HOME/models/versions/NAME. Preference rows (pairs, rated answers;
`forja train --method dpo|kto|orpo`) train in the same steps with the losses of forja.train_prefs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forja import __version__
from forja.config import ForjaError, Settings, TrainSettings
from forja.chat import model_turns, with_answer_turns
from forja.data import Source, is_preference, meta_path, prepare, read_rows, validation_path, write_jsonl
from forja.models import (CHECKPOINTS_DIR, KNOWLEDGE_FILE, METRICS_FILE, RUN_FILE, VERSION_FILE, LoadedModel,
                          ModelError, common_prefix, cpu_has_fast_bf16, hold_run, load, pick_device, resolve, valid_name,
                          with_system)


IGNORE = -100  # label of a token that is not trained on (prompt, system, user turns, padding)
LOSS_PLOT = "loss.png"
FAQ_MIN_CONTEXT = 1024  # tokens a model must read for its FAQ rows to go into the prompt (train.faq_retrieval)
DATA_FILE = "data.jsonl"  # the training rows, in the run directory and in the version
# Activation memory above which `gradient_checkpointing: auto` turns checkpointing on. The 4 GB VPS
# this is made for must hold the weights, the optimizer and the activations with room to spare.
AUTO_CHECKPOINTING_BYTES = 512 * 2**20
MIN_SHARED_PREFIX = 8  # shared leading tokens worth a forward of their own


class TrainError(ForjaError):
    """A training run that cannot start or continue; one line for the user."""


# ---------------------------------------------------------------------------------------------
# Examples: token ids with labels only where the model should learn


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def dialogue_example(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                     ) -> Example:
    """The conversation in the chat template, labelled on the assistant turns and their end-of-turn token
    (except turns with OpenAI's `"weight": 0`, which are context: a corrected conversation's earlier answers).
    A tool-calling conversation is written as the server writes it for the model (forja.chat): its calls are
    learned as the model must write them, its tool results are context."""
    template_tools = None
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages = with_answer_turns(messages)  # as the agent loop prompts after results
        weights = [m.get("weight", 1) for m in messages]
        messages, template_tools = model_turns(tokenizer, messages, tools)
        if len(messages) > len(weights):  # the tools' system turn was put first
            weights = [1, *weights]
        messages = [{**m, "weight": 0} if w == 0 else m for m, w in zip(messages, weights)]
    extra = {"tools": template_tools} if template_tools else {}
    render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
        [{k: v for k, v in m.items() if k != "weight"} for m in msgs], tokenize=False, add_generation_prompt=gen,
        **extra)
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:  # weight 0: context, not learned
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        if not full.startswith(render(messages[: i + 1], False)):
            raise TrainError("the chat template does not render a conversation as a prefix of the next; cannot mask turns")
        # the span holds the answer and the end-of-turn token (EOS is learned), not the newline after it
        spans.append((start, len(full[:end].rstrip())))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(s <= begin < e for s, e in spans) else IGNORE
        for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return Example(list(encoded["input_ids"]), labels)


def knowledge_examples(tokenizer: Any, text: str, max_len: int) -> list[Example]:
    """Plain causal LM on the text; a chunk longer than the window is split, never cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [Example(ids[i : i + max_len], ids[i : i + max_len]) for i in range(0, len(ids), max_len)]


def build_examples(tokenizer: Any, rows: list[dict[str, Any]], max_len: int) -> tuple[list[Example], list[str]]:
    """Examples for every row; dialogue rows longer than max_len are left out and reported (never cut)."""
    examples, too_long = [], []
    for row in rows:
        if "messages" in row:
            example = dialogue_example(tokenizer, row["messages"], row.get("tools"))
            if len(example.input_ids) > max_len:
                too_long.append(f"{row.get('source', '?')}: {len(example.input_ids)} tokens")
                continue
            examples.append(example)
        else:
            examples.extend(knowledge_examples(tokenizer, row["text"], max_len))
    return [e for e in examples if e.trained_tokens > 0], too_long


def batch_order(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length (little padding), reproducible from (seed, epoch) alone."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: len(examples[i].input_ids))
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batches(batch: list[int], examples: list[Example], max_tokens: int) -> list[list[int]]:
    """Split a batch into forwards of at most max_tokens packed tokens (`packed_tokens`): activation memory
    grows with the tokens in one forward, not with the batch size. A longer example goes alone. The shared
    prefix of the forward being filled is kept up to date as examples join (one comparison each)."""
    parts: list[list[int]] = []
    room = total = 0  # the last part's shared prefix before the MIN_SHARED_PREFIX floor, and its tokens
    for i in sorted(batch, key=lambda i: len(examples[i].input_ids)):
        e = examples[i]
        if parts:
            joined = _joined_prefix(room, examples[parts[-1][0]], e)
            if total + len(e.input_ids) - len(parts[-1]) * _worth_sharing(joined) <= max_tokens:
                parts[-1].append(i)
                room, total = joined, total + len(e.input_ids)
                continue
        parts.append([i])
        room, total = _prefix_room(e), len(e.input_ids)
    return parts


def shared_prefix(examples: list[Example]) -> int:
    """How many tokens every example starts with that a forward can compute once for all of them: the
    system turn and the opening of the user turn, in dialogue data. It stops before the first labelled
    token of any row (a prefix position's prediction is not trained) and leaves each row a token of its own;
    under MIN_SHARED_PREFIX tokens it is not worth sharing (0)."""
    if len(examples) < 2:
        return 0
    room = _prefix_room(examples[0])
    for e in examples[1:]:
        room = _joined_prefix(room, examples[0], e)
    return _worth_sharing(room)


def _prefix_room(e: Example) -> int:
    """The longest prefix of `e` that may be shared: before its first labelled token, and not all of it."""
    labelled = next((i for i, label in enumerate(e.labels) if label != IGNORE), len(e.labels))
    return min(labelled - 1, len(e.input_ids) - 1)


def _joined_prefix(room: int, first: Example, e: Example) -> int:
    """The prefix a group that starts with `first` and may share `room` tokens may still share once `e` joins."""
    return min(room, common_prefix(first.input_ids, e.input_ids), _prefix_room(e))


def _worth_sharing(prefix: int) -> int:
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def packed_tokens(examples: list[Example]) -> int:
    """Positions one forward over `examples` computes once packed: the shared prefix once, then each row's rest."""
    shared = shared_prefix(examples)
    return shared + sum(len(e.input_ids) - shared for e in examples)


def pack(examples: list[Example], device: str) -> dict[str, torch.Tensor]:
    """Examples packed into one sequence with no padding: their shared prefix once, then the rest of each.
    Each token attends causally to the prefix and to its own example only (`attention_mask`), its
    position counts from its own example's start, and `targets[j]` is the token position j must predict
    (IGNORE where nothing is learnt, and at the end of each example). The model computes exactly what it
    would for each example alone."""
    shared = shared_prefix(examples)
    first = examples[0]
    ids, positions, targets = list(first.input_ids[:shared]), list(range(shared)), list(first.labels[1 : shared + 1])
    segments = [-1] * shared
    for row, e in enumerate(examples):
        ids += e.input_ids[shared:]
        positions += range(shared, len(e.input_ids))
        targets += [*e.labels[shared + 1 :], IGNORE]
        segments += [row] * (len(e.input_ids) - shared)
    segment = torch.tensor(segments)
    order = torch.arange(len(ids))
    allowed = (order[None, :] <= order[:, None]) & ((segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
    # additive and float: every layer's attention uses (and keeps for backward) this one tensor, where a
    # boolean mask would be converted anew in each layer
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": torch.tensor([ids], device=device), "position_ids": torch.tensor([positions], device=device),
            "attention_mask": mask[None, None].to(device), "targets": torch.tensor(targets, device=device)}


def labelled_states(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The last hidden states at the labelled positions of a packed batch, their targets and the output head
    (activations recomputed in the backward pass). Logits are left to the caller, computed only there: with
    a 49k vocabulary the full logits tensor would cost more memory than the rest."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    with Recompute():
        hidden = causal.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state[0]
    keep = batch["targets"] != IGNORE
    return hidden[keep], batch["targets"][keep], causal.lm_head


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the labelled positions of a packed batch."""
    hidden, targets, head = labelled_states(model, batch)
    if type(head) is torch.nn.Linear and head.bias is None and torch.is_grad_enabled():
        return LinearCrossEntropy.apply(hidden, head.weight, targets), len(targets)
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), len(targets)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, a chunk of rows at a time, with its
    gradients computed in the forward pass: the [rows, vocabulary] logits (49k columns) never exist
    whole, nor their softmax and its gradient for the backward pass; what is kept is the gradient for
    `hidden` (and for `weight` when it is trained). The same matrix products as the plain loss."""

    CHUNK = 32

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(hidden), LinearCrossEntropy.CHUNK):
            rows = slice(start, start + LinearCrossEntropy.CHUNK)
            h = hidden[rows].to(dtype)
            logits = (h @ w.T).float()
            picked = targets[rows]
            total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, picked[:, None])[:, 0]).sum()
            grad = logits.softmax(dim=-1)
            grad[torch.arange(len(picked)), picked] -= 1
            grad_hidden[rows] = (grad.to(dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad.T @ h.float()
        # computed gradients, neither inputs nor outputs: kept on ctx (save_for_backward is for those)
        ctx.grad_hidden, ctx.grad_weight, ctx.weight_dtype = grad_hidden, grad_weight, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        weight_grad = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden * grad_total.to(grad_hidden.dtype), weight_grad, None


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """A training run's directory in FORJA_HOME/runs and what it needs to continue after a stop."""

    name: str
    directory: Path
    config: TrainSettings
    base: str
    data: Path
    data_hash: str
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checkpoints(self) -> Path:
        return self.directory / CHECKPOINTS_DIR

    def last_checkpoint(self) -> Path | None:
        # a "step-N.tmp" directory is a checkpoint that was being written when the process died
        done = sorted(p for p in self.checkpoints.glob("step-*") if p.suffix != ".tmp" and (p / "state.pt").is_file())
        return done[-1] if done else None

    def save_description(self) -> None:
        description = {
            "name": self.name,
            "base": self.base,
            "data": str(self.data),
            "data_hash": self.data_hash,
            "config": self.config.model_dump(),
            "forja_version": code_version(),
        }
        (self.directory / RUN_FILE).write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with (self.directory / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def check_name(name: str, flag: str) -> None:
    if not valid_name(name):
        raise TrainError(f"{flag} {name!r}: a run or version name may only hold letters, digits, '-', '_' and '.' "
                         "(starting with a letter or digit), not a path")


def new_run(settings: Settings, data: list[Path | Source], name: str | None, base: str, config: TrainSettings,
            faq: list[dict[str, str]] | None = None, validation: Path | Source | None = None) -> Run:
    """A run directory with its prepared data; `data` are prepared JSONL, or files, folders and `hf:` datasets
    (with the options `forja data` reads them with: data.sources). With train.faq_retrieval, the FAQ it answers
    from: `faq` when given (a retrain's), else the data's own rows when they are a small FAQ. `validation`, a
    file of its own, is the validation set (then nothing is held out of `data`)."""
    name = name or f"{Path(base).name.removesuffix('.gguf')}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(name, "--name")
    if (settings.versions_dir / name / VERSION_FILE).exists():
        raise TrainError(f"a model version named {name!r} already exists; choose another --name")
    directory = settings.runs_dir / name
    if (directory / RUN_FILE).exists():
        raise TrainError(f"a run named {name!r} exists in {directory}; continue it with --resume {name} or choose another --name")
    resolve(base, settings)  # fail before preparing data when the base is wrong
    directory.mkdir(parents=True, exist_ok=True)
    if validation is not None:
        config = config.model_copy(update={"val_fraction": 0.0})
    train_file, data_hash = prepared_data(data, directory, config)
    if validation is not None:
        held = prepare([validation], directory / "validation-rows.jsonl", val_fraction=0.0, seed=config.seed)
        held.train_path.replace(validation_path(train_file))
    first = Path(data[0].path if isinstance(data[0], Source) else data[0])
    if config.system is None and len(data) == 1 and meta_path(first).is_file():
        # data prepared with --system: the version records it, so it is served as it was trained
        config = config.model_copy(update={"system": json.loads(meta_path(first).read_text()).get("system")})
    if config.faq_retrieval:
        write_faq(directory / KNOWLEDGE_FILE, faq if faq is not None else faq_pairs(read_rows(train_file), config))
    run = Run(name, directory, config, base, train_file, data_hash)
    run.save_description()
    return run


def faq_pairs(rows: list[dict[str, Any]], config: TrainSettings) -> list[dict[str, str]]:
    """The rows as question-answer pairs when they are a small FAQ (every row one question and its answer,
    at most small_data_rows of them), else none: a corpus or conversations are not looked up row by row."""
    pairs = []
    for row in rows:
        turns = [m for m in row.get("messages") or [] if m.get("role") != "system"]
        if len(turns) != 2 or [m.get("role") for m in turns] != ["user", "assistant"]:
            return []
        pairs.append({"question": turns[0]["content"], "answer": turns[1]["content"]})
    return pairs if len(pairs) <= config.small_data_rows else []


def write_faq(path: Path, pairs: list[dict[str, str]]) -> None:
    """The version's FAQ as knowledge (one record per row), or no file when there is none."""
    if pairs:
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    else:
        path.unlink(missing_ok=True)


def prepared_data(paths: list[Path | Source], directory: Path, config: TrainSettings) -> tuple[Path, str]:
    """Use a JSONL written by `forja data prepare` as it is; prepare anything else into the run directory."""
    first = Path(paths[0].path if isinstance(paths[0], Source) else paths[0])
    if len(paths) == 1 and first.suffix == ".jsonl" and meta_path(first).is_file():
        meta = json.loads(meta_path(first).read_text())
        local = directory / DATA_FILE
        shutil.copy(first, local)
        if validation_path(first).is_file():
            shutil.copy(validation_path(first), validation_path(local))
        return local, meta["hash"]
    summary = prepare(paths, directory / DATA_FILE, val_fraction=config.val_fraction, seed=config.seed)
    if summary.small_data:
        print(f"{summary.train_rows} rows is small data: none held out for validation (every row is trained; "
              "validation uses the training rows and their rewordings)")
    return summary.train_path, summary.hash


def open_run(settings: Settings, name: str) -> Run:
    check_name(name, "--resume")
    directory = settings.runs_dir / name
    try:
        description = json.loads((directory / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        known = sorted(p.name for p in settings.runs_dir.glob("*") if (p / RUN_FILE).exists()) if settings.runs_dir.exists() else []
        raise TrainError(f"no run named {name!r} in {settings.runs_dir} (runs: {', '.join(known) or 'none'})") from None
    if (settings.versions_dir / name / VERSION_FILE).exists():
        raise TrainError(f"run {name!r} already finished as a model version; nothing to resume")
    config = TrainSettings.model_validate(description["config"])
    return Run(name, directory, config, description["base"], Path(description["data"]), description["data_hash"])


def use_bf16(config: TrainSettings) -> bool:
    if config.precision != "auto":
        return config.precision == "bfloat16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def prepare_model(loaded: LoadedModel, config: TrainSettings, longest: int) -> Any:
    model = loaded.model
    model.config.use_cache = False
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules, task_type="CAUSAL_LM",
            ),
        )
    lean_activations(model)
    if wants_checkpointing(loaded, config, longest):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.method == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward pass (autograd would also keep
    silu(gate): one more intermediate-sized tensor per token and layer, ~14% of the activations)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        return grad * up * (sigmoid + silu * (1 - sigmoid)), grad * silu


def lean_activations(model: Any) -> int:
    """Route every gated SiLU MLP (Llama, Mistral, Qwen... : down(silu(gate(x)) * up(x))) through SiluMul,
    and let its product be recomputed for the backward pass (`Recompute`) rather than kept; returns how
    many were changed. Other MLPs are left as they are. RMS norms' outputs are made recomputable too."""
    changed = 0
    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
                type(module.act_fn).__name__ in ("SiLU", "SiLUActivation"):  # torch's, or transformers' own
            module.forward = (lambda m: lambda x: m.down_proj(_silu_mul(m.gate_proj(x), m.up_proj(x))))(module)
            changed += 1
        elif type(module).__name__.endswith("RMSNorm"):
            module.forward = (lambda plain: lambda x: Recompute.note(plain(x), plain, x))(module.forward)
    return changed


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return Recompute.note(SiluMul.apply(gate, up), lambda g, u: F.silu(g) * u, gate, up)


class Recompute:
    """Saved-tensor hooks for one forward/backward: an activation noted as cheap to recompute from tensors the
    backward keeps anyway (the gated MLP's product from gate and up, a norm's output from its input) is not
    kept where a later layer saves it (a LoRA A matrix saves its input): its recipe is, and the backward
    recomputes it when it needs it. Per token and layer that is one intermediate-sized and two hidden-sized
    tensors fewer, about a third of the activations, for a few elementwise operations."""

    active: "Recompute | None" = None

    def __init__(self) -> None:
        self.recipes: dict[int, tuple[Any, _Recipe]] = {}

    @classmethod
    def note(cls, out: torch.Tensor, recipe: Any, *inputs: torch.Tensor) -> torch.Tensor:
        if cls.active is not None and torch.is_grad_enabled():
            cls.active.recipes[out.untyped_storage().data_ptr()] = (weakref.ref(out), _Recipe(recipe, inputs))
        return out

    def pack(self, saved: torch.Tensor) -> Any:
        entry = self.recipes.get(saved.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:  # not noted, or a dead tensor's memory reused
            return saved
        entry[1].uses += 1
        return entry[1], saved.size(), saved.stride(), saved.storage_offset()

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, size, stride, offset = packed
        return recipe.value().as_strided(size, stride, offset)

    def __enter__(self) -> "Recompute":
        Recompute.active = self
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)
        del self.hooks  # a reference cycle (self → hooks → self.pack) would keep the recipes' tensors until gc
        self.recipes.clear()  # what the backward needs is in the packed entries
        Recompute.active = None


class _Recipe:
    """How to recompute one activation; the value is kept from its first use in the backward pass to its
    last (q, k and v's LoRA A matrices all use the same norm output, one after the other)."""

    def __init__(self, recipe: Any, inputs: tuple[torch.Tensor, ...]):
        self.recipe, self.inputs, self.uses, self.kept = recipe, inputs, 0, None

    def value(self) -> torch.Tensor:
        value = self.kept
        if value is None:
            with torch.no_grad():
                value = self.recipe(*self.inputs)
        self.uses -= 1
        self.kept = value if self.uses > 0 else None
        return value


def wants_checkpointing(loaded: LoadedModel, config: TrainSettings, longest: int) -> bool:
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "on"
    c = loaded.model.config
    # rough count of the fp32 activations autograd keeps per token and layer (measured ~1.5 MB per
    # token for SmolLM2-135M's 30 layers)
    per_token_layer = (14 * c.hidden_size + 4 * c.intermediate_size) * 4
    tokens = max(longest, config.micro_batch_tokens)
    return tokens * c.num_hidden_layers * per_token_layer > AUTO_CHECKPOINTING_BYTES


def train(settings: Settings, run: Run, progress: bool = True, processes: int = 1) -> Path:
    """Train (or continue) the run to its end and publish it as a model version; returns the version dir.
    The run is held by this process meanwhile (a second `forja train --resume` of it is refused). With
    `processes` > 1 the steps are shared by that many processes (data parallel, below)."""
    with hold_run(run.directory, run.name):
        if processes > 1:
            return _train_in_processes(settings, run, progress, processes)
        return _train(settings, run, progress)


# ---------------------------------------------------------------------------------------------
# Several processes: data parallelism. Every process holds the whole model and takes its share of the
# examples of each batch (`Ranks.share`); after the backward passes of a step their gradients (and the
# loss and token counts) are summed across processes (`Ranks.sum`), so every process takes the same
# optimizer step and the losses equal one process's with the same global batch. Rank 0 logs, checkpoints
# and publishes. The gradients go in one flat all-reduce per step (gloo on a CPU, NCCL on GPUs): what
# DistributedDataParallel does, without its per-micro-batch hooks that gradient accumulation would have
# to switch off with no_sync.


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: list[int]) -> list[int]:
        return batch[self.rank :: self.world]

    def sum(self, params: list[torch.Tensor], *numbers: float) -> list[float]:
        """Sum the trainable parameters' gradients and `numbers` over the processes (in place for the
        gradients); the summed numbers."""
        if self.world == 1:
            return list(numbers)
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        counts = torch.tensor(numbers, dtype=torch.float64)
        dist.all_reduce(counts)
        return counts.tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_in_processes(settings: Settings, run: Run, progress: bool, processes: int) -> Path:
    """`forja train --processes N`: N processes (torch.multiprocessing, so Windows too) train the run
    together; a Ctrl-C or SIGTERM is passed on to rank 0, which saves the checkpoint. The one-line error of a
    process that failed is this process's error."""
    import signal
    import threading

    import torch.multiprocessing as mp

    threads = settings.threads or max(1, (os.cpu_count() or processes) // processes)
    errors = run.directory / "rank-errors"
    shutil.rmtree(errors, ignore_errors=True)
    errors.mkdir(parents=True)
    context = mp.start_processes(_rank_main, args=(processes, _free_port(), settings, run, progress, threads),
                                 nprocs=processes, join=False, start_method="spawn")
    interrupted = False

    def stop(number: int) -> None:  # rank 0 saves the checkpoint and stops, which ends the others (join
        nonlocal interrupted  # stops the rest when one fails)
        interrupted = True
        if context.processes[0].is_alive():
            os.kill(context.processes[0].pid, number)

    main = threading.current_thread() is threading.main_thread()  # (only there a handler can be set)
    before = signal.signal(signal.SIGTERM, lambda number, _frame: stop(number)) if main else None
    try:
        while True:
            try:
                if context.join():
                    break
            except KeyboardInterrupt:  # Ctrl-C, or the job worker's SIGINT
                stop(signal.SIGINT)
            except mp.ProcessExitedException:
                break
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
    said = sorted(errors.glob("rank-*.txt"))
    message = said[0].read_text(encoding="utf-8") if said else None
    published = (errors / PUBLISHED).is_file()
    shutil.rmtree(errors, ignore_errors=True)
    codes = [p.exitcode for p in context.processes]
    if published and not message:  # (a Ctrl-C after that stops nothing: the version is there)
        # rank 0 published the version before any process began to end: a process that fails while it
        # tears down (gloo can abort in its exit) loses nothing, so the run stands, said in one line
        if any(codes):
            print(f"note: the version is saved; a training process failed as it ended (exit codes {codes})",
                  file=sys.stderr)
        return settings.versions_dir / run.name
    if message or interrupted or any(codes):
        raise TrainError(message or f"a training process stopped without saying why (exit codes {codes})")
    return settings.versions_dir / run.name


PUBLISHED = "published"  # in the run's rank-errors folder: rank 0 has published the version


def _rank_main(rank: int, world: int, port: int, settings: Settings, run: Run, progress: bool, threads: int) -> None:
    import torch.distributed as dist

    import signal

    if hasattr(os, "setpgrp"):  # a Ctrl-C reaches the parent only, which passes it to rank 0 once
        os.setpgrp()
    if sys.platform == "linux":  # a parent killed with -9 takes its processes with it
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if rank:  # rank 0 takes a stop at the end of a step and saves; the others end when it does
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    try:
        _train(settings, run, progress and rank == 0, Ranks(rank, world))
    except ForjaError as exc:
        (run.directory / "rank-errors" / f"rank-{rank}.txt").write_text(str(exc), encoding="utf-8")
        sys.exit(1)
    if rank == 0:  # the version is published: what follows is the processes ending
        (run.directory / "rank-errors" / PUBLISHED).touch()
    # the others wait while rank 0 evaluates and publishes: a process that ends first is a failure to the
    # launcher, which would stop rank 0 mid-publish (and gloo aborts a process leaving a live group)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: torch's and gloo's threads have aborted processes in it


def _train(settings: Settings, run: Run, progress: bool, ranks: Ranks = Ranks()) -> Path:
    config = run.config
    torch.manual_seed(config.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # LoRA under bf16 autocast: the frozen base is kept in bf16 (autocast would otherwise keep a bf16 copy
    # of every fp32 weight): 1.73 -> 1.23 GB peak on an avx512_bf16 CPU, the same loss curve (within 0.02)
    frozen_bf16 = config.method == "lora" and use_bf16(config)
    loaded = load(run.base, settings, dtype="bfloat16" if frozen_bf16 else "float32", merge_adapter=True)
    tokenizer = loaded.tokenizer
    device = pick_device()
    rows = [row_with_system(row, config.system) for row in read_rows(run.data)]
    val_rows = [row_with_system(row, config.system) for row in read_rows(validation_path(run.data))]
    # preference rows (pairs, rated answers) train with their own losses (forja.train_prefs)
    pref_rows, rows = [r for r in rows if is_preference(r)], [r for r in rows if not is_preference(r)]
    val_pref_rows, val_rows = [r for r in val_rows if is_preference(r)], [r for r in val_rows if not is_preference(r)]
    faq = run.directory / KNOWLEDGE_FILE
    if faq.is_file() and loaded.context_length < FAQ_MIN_CONTEXT:
        print(f"FAQ retrieval off: the model reads {loaded.context_length} tokens, too few for a FAQ row next to "
              f"the question (train.faq_retrieval needs {FAQ_MIN_CONTEXT})")
        faq.unlink()
    # preference rows alone teach a preference, not answers word for word: the adapt goal's rate and epochs
    goal = config.resolved_goal(sum("messages" in row for row in rows)) if rows or config.goal != "auto" else "adapt"
    if not val_rows and goal == "memorise":
        val_rows = memorisation_validation(rows)  # nothing held out of small data: the rows and their rewordings
    augmented = reworded_rows(rows, config.augment_rewordings) if goal == "memorise" and config.augment_rewordings else []
    if faq.is_file():  # train.faq_retrieval: each row (and rewording) prompted as served, with its nearest FAQ row
        from forja.knowledge.grounding import grounded_rows
        from forja.train_prefs import as_dialogue, from_dialogue

        rows, val_rows, augmented, pref_rows, val_pref_rows = grounded_rows(
            settings, faq, f"run.{run.name}",
            [rows, val_rows, augmented, [as_dialogue(r) for r in pref_rows], [as_dialogue(r) for r in val_pref_rows]],
            config.faq_embedding_model)
        pref_rows, val_pref_rows = [from_dialogue(r) for r in pref_rows], [from_dialogue(r) for r in val_pref_rows]
    check_rows = learn_rows(rows, config) if config.stop_when_learned else []
    data_rows = len(rows)
    rows = rows + augmented
    train_examples, too_long = build_examples(tokenizer, rows, config.max_seq_length)
    val_examples, _ = build_examples(tokenizer, val_rows, config.max_seq_length)
    items: list[Any] = []  # preference items (train_prefs.Preference), trained after the examples in each step
    val_items: list[Any] = []
    if pref_rows or config.objective != "sft":
        from forja import train_prefs

        items, long_items = train_prefs.build_items(tokenizer, pref_rows, config.objective, config.max_seq_length)
        val_items, _ = train_prefs.build_items(tokenizer, val_pref_rows, config.objective, config.max_seq_length)
        too_long += long_items
        if not items:
            raise TrainError(f"{run.data}: --method {config.objective} trains on preference rows ({{prompt, chosen, "
                             "rejected}} pairs or {prompt, completion, label} rows) and the data has none")
    if too_long:
        print(f"warning: {len(too_long)} conversations are longer than max_seq_length={config.max_seq_length} "
              f"and are left out (raise max_seq_length to keep them): {'; '.join(too_long[:3])}")
    if not train_examples and not items:
        raise TrainError(f"{run.data}: no training rows with assistant answers or text to learn")
    if items and ranks.world > 1:  # KTO's reference point and the losses' means are over a whole step's rows
        raise TrainError(f"{run.data}: preference rows (DPO, KTO, ORPO) train in one process; leave out --processes")
    units = train_examples + items  # what batches are drawn from: the examples' order is unchanged by items
    sequences = train_examples + [a for item in items for a in item.answers]
    longest = max(len(e.input_ids) for e in sequences)
    steps_per_epoch = math.ceil(math.ceil(len(units) / config.batch_size) / config.gradient_accumulation)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs_for(goal)))
    planned = plan(loaded, config, goal, sequences, total_steps, steps_per_epoch, check_rows)
    if progress and ranks.main and run.last_checkpoint() is None:
        print(planned["text"])
    model = prepare_model(loaded, config, longest)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16(config))
    reference = val_reference = None
    started = time.perf_counter()
    if items:  # before the first step (and before a checkpoint's weights are restored): the reference model
        reference = train_prefs.cached_reference(run.directory / train_prefs.REFERENCE_FILE, model, items,
                                                 config.micro_batch_tokens, device, autocast)
        if val_items:
            val_reference = train_prefs.cached_reference(run.directory / train_prefs.VAL_REFERENCE_FILE, model,
                                                         val_items, config.micro_batch_tokens, device, autocast)
    reference_seconds = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate_for(goal), weight_decay=config.weight_decay)

    from transformers import get_scheduler

    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val": None, "bad_evals": 0, "tokens": 0, "seconds": 0.0,
             "epoch_loss": 0.0, "epoch_steps": 0, "learned_since": None}
    checkpoint = run.last_checkpoint()
    if checkpoint is not None:
        state = {"epoch_loss": 0.0, "epoch_steps": 0, "learned_since": None, **restore(checkpoint, model, optimizer, scheduler)}
        run.history = read_rows(run.directory / METRICS_FILE)
        run.history = [r for r in run.history if r.get("step", 0) <= state["step"]]
        if ranks.main:  # a new file (the job worker reading the old one sees it is another file, not a shorter one)
            write_jsonl(run.directory / (METRICS_FILE + ".tmp"), run.history)
            os.replace(run.directory / (METRICS_FILE + ".tmp"), run.directory / METRICS_FILE)
            print(f"resuming {run.name} from step {state['step']} of {total_steps}")
    log = run.log if ranks.main else (lambda record: None)

    bar = make_bar(total_steps, state["step"], progress)
    stopped_early = stopped_learned = False
    checked: tuple[int, list[dict[str, Any]]] | None = None  # the step of the last answer check, and its answers
    interrupts = StepInterrupts(ranks.main)
    try:
        while state["step"] < total_steps and not stopped_early:
            batches = batch_order(units, config.batch_size, config.seed, state["epoch"])
            groups = [batches[i : i + config.gradient_accumulation] for i in range(0, len(batches), config.gradient_accumulation)]
            while state["batch_in_epoch"] < len(groups) and state["step"] < total_steps:
                started = time.perf_counter()
                group = groups[state["batch_in_epoch"]]
                pref_ids = [i - len(train_examples) for b in group for i in b if i >= len(train_examples)]
                group = [[i for i in b if i < len(train_examples)] for b in group]
                labelled = sum(train_examples[i].trained_tokens for b in group for i in b)
                total_loss, real_tokens = 0.0, 0
                mine = (part for b in group for part in micro_batches(ranks.share(b), train_examples,
                                                                    config.micro_batch_tokens))
                for batch_ids in mine:
                    chosen = [train_examples[i] for i in batch_ids]
                    batch = pack(chosen, device)
                    with autocast:
                        summed, _ = loss_sum(model, batch)
                    (summed / labelled).backward()
                    total_loss += float(summed.detach())
                    real_tokens += sum(len(e.input_ids) for e in chosen)
                preference = {}
                if pref_ids:
                    preference = train_prefs.preference_step(model, items, pref_ids, reference, config, device, autocast)
                    real_tokens += sum(items[i].tokens for i in pref_ids)
                total_loss, real_tokens = ranks.sum(params, total_loss, real_tokens)
                real_tokens = int(real_tokens)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                elapsed = time.perf_counter() - started
                state["tokens"] += real_tokens
                state["seconds"] += elapsed
                supervised = total_loss / labelled if labelled else 0.0
                record = {
                    "step": state["step"], "epoch": state["epoch"],
                    "loss": supervised + preference.get("preference_loss", 0.0),
                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": real_tokens,
                    "tokens_per_second": real_tokens / elapsed, "total_steps": total_steps,
                }
                if items:  # the supervised part too, when both kinds train: the answer checks go by it
                    record.update({**({"sft_loss": supervised} if train_examples else {}), **preference})
                if config.eval_every and (val_examples or val_items) and state["step"] % config.eval_every == 0:
                    record.update(validation(model, val_examples, val_items, val_reference, config, device, autocast))
                    stopped_early = early_stop(state, record["val_loss"], config)
                state["epoch_loss"] += record.get("sft_loss", record["loss"])
                state["epoch_steps"] += 1
                log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{state['tokens'] / state['seconds']:.0f}")
                if ranks.main and config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                    save_checkpoint(run, model, optimizer, scheduler, state)
                interrupts.check()
                if stopped_early:
                    break
            if state["batch_in_epoch"] >= len(groups):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                mean_loss = state["epoch_loss"] / max(1, state["epoch_steps"])
                state["epoch_loss"], state["epoch_steps"] = 0.0, 0
                if check_rows and mean_loss < LEARNED_LOSS and state["step"] < total_steps:
                    answers = reproduce(model, tokenizer, check_rows, device)
                    checked = (state["step"], answers)
                    learned = sum(a["learned"] for a in answers)
                    log({"step": state["step"], "learned": learned, "checked": len(answers)})
                    bar.set_postfix(loss=f"{mean_loss:.3f}", learned=f"{learned}/{len(answers)}")
                    # stop once every answer has been reproduced for a margin of at least an epoch and
                    # LEARNED_MARGIN_STEPS steps: served weights (another precision, a quantized file)
                    # differ a little from the ones checked here
                    if learned < len(answers):
                        state["learned_since"] = None
                    elif state.get("learned_since") is None:
                        state["learned_since"] = state["step"]
                    since = state.get("learned_since")
                    stopped_learned = since is not None and \
                        state["step"] - since >= max(steps_per_epoch, LEARNED_MARGIN_STEPS)
                    stopped_early = stopped_early or stopped_learned
                    interrupts.check()
    except KeyboardInterrupt as stop:  # (rank 0 only: the others ignore SIGINT and stop when it does)
        bar.close()
        if isinstance(stop, StopNow):  # mid-step: the weights may be a step ahead of the count, so not saved
            last = run.last_checkpoint()
            raise TrainError(f"stopped during step {state['step'] + 1}; continue from "
                             f"{'its last checkpoint' if last else 'the start'} with: forja train --resume "
                             f"{run.name}") from None
        save_checkpoint(run, model, optimizer, scheduler, state)
        raise TrainError(f"interrupted at step {state['step']}; checkpoint saved, continue with: forja train --resume {run.name}") from None
    finally:
        interrupts.restore()
    bar.close()
    if not ranks.main:
        return run.directory

    final: dict[str, Any] = {"step": state["step"], "epochs": state["epoch"] + state["batch_in_epoch"] / max(1, steps_per_epoch)}
    losses = [r["loss"] for r in run.history if "loss" in r]
    if losses:
        final["train_loss"] = losses[-1]
    if val_examples or val_items:
        final.update(validation(model, val_examples, val_items, val_reference, config, device, autocast))
        if losses and "val_loss" not in next((r for r in reversed(run.history) if "checkpoint" not in r), {}):
            run.log({"step": state["step"], **{k: v for k, v in final.items() if k.startswith("val_")}})
    if items:
        last = next((r for r in reversed(run.history) if "reward_accuracy" in r), {})
        final.update({k: last[k] for k in ("reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps") if k in last})
        final["reference_seconds"] = round(reference_seconds, 3)  # computing them (a resumed run: reading them back)
        final["preference_items"] = {"pairs": sum(i.label is None for i in items),
                                     "rated_good": sum(i.label is True for i in items),
                                     "rated_bad": sum(i.label is False for i in items)}
    final["tokens"] = state["tokens"]
    final["tokens_per_second"] = round(state["tokens"] / state["seconds"], 1) if state["seconds"] else None
    final["stopped_early"] = stopped_early
    final["stopped"] = ("answers learned" if stopped_learned else "validation stopped improving" if stopped_early
                        else "max_steps" if config.max_steps else "epochs")
    final["goal"] = goal
    final["learning_rate"] = config.learning_rate_for(goal)
    final["planned_steps"] = total_steps
    final["estimated_peak_mb"] = planned["peak_mb"]
    if check_rows:
        # a run that stopped because the answers are learned has just checked them
        answers = checked[1] if checked and checked[0] == state["step"] else reproduce(model, tokenizer, check_rows, device)
        final["answers"] = answers_summary(answers, data_rows)
    final["left_out_too_long"] = len(too_long)
    final["peak_rss_mb"] = round(peak_rss_mb())
    final["allocator"] = allocator()
    plot_losses(run.history, run.directory / LOSS_PLOT)
    return publish(settings, run, model, tokenizer, final)


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, in the middle of a step."""


class StepInterrupts:
    """Ctrl-C (or the job worker's SIGINT) during a step is taken when the step ends (`check`), so the
    checkpoint saved then never holds weights a step ahead of its step count; a second Ctrl-C stops at once.
    SIGTERM (a service manager's stop, or the signal a job's process gets when its worker dies) asks the
    same stop at the step's end, and never more than that however often it comes: the kernel sends the
    parent-death signal again as each thread of a killed worker ends. Only in the main thread of the
    process that saves (elsewhere the handlers stay as they are)."""

    def __init__(self, enabled: bool = True):
        import signal
        import threading

        self.asked, self._before = False, {}
        if enabled and threading.current_thread() is threading.main_thread():
            for number, handle in ((signal.SIGINT, self._interrupt), (signal.SIGTERM, self._terminate)):
                if signal.getsignal(number) is not signal.SIG_IGN:  # ignored stays ignored
                    self._before[number] = signal.signal(number, handle)

    def _interrupt(self, _signum: int, _frame: Any) -> None:
        if self.asked:
            raise StopNow()
        self.asked = True

    def _terminate(self, _signum: int, _frame: Any) -> None:
        self.asked = True

    def check(self) -> None:
        if self.asked:
            raise KeyboardInterrupt()

    def restore(self) -> None:
        import signal

        for number, before in self._before.items():  # (None: a handler set outside Python, not kept)
            signal.signal(number, signal.SIG_DFL if before is None else before)
        self._before = {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB: Linux's VmHWM (since the last exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def allocator() -> str:
    """"jemalloc" when this process allocates through it (see config.jemalloc_env), else "system"."""
    try:
        return "jemalloc" if "libjemalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:
        return "system"


def make_bar(total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)


def evaluate(model: Any, examples: list[Example], config: TrainSettings, device: str, autocast: Any) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        batches = batch_order(examples, config.batch_size, seed=0, epoch=0)
        for batch_ids in (part for b in batches for part in micro_batches(b, examples, config.micro_batch_tokens)):
            summed, n = loss_sum(model, pack([examples[i] for i in batch_ids], device))
            total, count = total + float(summed), count + n
    model.train(was_training)
    return total / max(1, count)


def validation(model: Any, examples: list[Example], items: list[Any], reference: Any, config: TrainSettings,
               device: str, autocast: Any) -> dict[str, float]:
    """val_loss: the validation conversations' loss, or (a run of preference rows only) their preference loss;
    with preference rows, their loss and reward accuracy too."""
    record: dict[str, float] = {}
    if items:
        from forja.train_prefs import evaluate_preferences

        record = evaluate_preferences(model, items, reference, config, device, autocast)
    record["val_loss"] = (evaluate(model, examples, config, device, autocast) if examples
                          else record["val_preference_loss"])
    return record


def early_stop(state: dict[str, Any], val_loss: float, config: TrainSettings) -> bool:
    if state["best_val"] is None or val_loss < state["best_val"]:
        state["best_val"], state["bad_evals"] = val_loss, 0
        return False
    state["bad_evals"] += 1
    return bool(config.early_stopping_patience) and state["bad_evals"] >= config.early_stopping_patience


# ---------------------------------------------------------------------------------------------
# What the run learns: the plan before it, the answers reproduced during and after it


def row_with_system(row: dict[str, Any], system: str | None) -> dict[str, Any]:
    """The row with `system` as its first turn when it is a dialogue (or a preference row's prompt) without one
    (models.with_system)."""
    if isinstance(row.get("prompt"), str) and is_preference(row):  # a preference row's prompt given as text
        row = {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}
    for key in ("messages", "prompt"):
        if isinstance(row.get(key), list):
            return {**row, key: with_system(row[key], system)}
    return row


def learn_rows(rows: list[dict[str, Any]], config: TrainSettings) -> list[dict[str, Any]]:
    """The dialogue rows whose answers are checked: those marked `must_learn` (a retrain's corrections) when
    any are, else all of them, or a fixed sample of learn_check_rows when there are more."""
    # (a tool call is not an answer)
    dialogue = [row for row in rows if "messages" in row and not row.get("tools") and not row["messages"][-1].get("tool_calls")]
    marked = [row for row in dialogue if row.get("must_learn")]
    if marked:
        return marked
    if len(dialogue) <= config.learn_check_rows:
        return dialogue
    return random.Random(config.seed).sample(dialogue, config.learn_check_rows)


def memorisation_validation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation for data nothing was held out of: every dialogue row, and the row again with its last
    question reworded (`forja.rewordings`): the loss says whether the answers hold for other wordings."""
    return [row for row in rows if "messages" in row] + reworded_rows(rows, 2)


def reworded_rows(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Each dialogue row again with its last question reworded `count` ways, the same answer (not checked)."""
    from forja.rewordings import rewordings

    out = []
    for row in rows:
        messages = row.get("messages")
        if not messages or len(messages) < 2 or messages[-2]["role"] != "user":
            continue
        for question in rewordings(messages[-2]["content"], count=count):
            reworded = [*messages[:-2], {"role": "user", "content": question}, messages[-1]]
            out.append({k: v for k, v in row.items() if k != "must_learn"} | {"messages": reworded})
    return out


def reproduce(model: Any, tokenizer: Any, rows: list[dict[str, Any]], device: str,
              batch_size: int = 8) -> list[dict[str, Any]]:
    """Each row's conversation up to its last answer, answered greedily by the model in training; an
    answer is learned when it equals the row's (forja.metrics.exact_match: case, accents, punctuation
    and articles aside). In float32 even where training runs under bf16 autocast: on a CPU, generating
    under autocast was 26x slower (200 s against 7.7 s for 30 answers, avx512_bf16)."""
    from forja.metrics import exact_match

    prompts = [tokenizer.apply_chat_template([{k: v for k, v in m.items() if k != "weight"} for m in row["messages"][:-1]],
                                             tokenize=False, add_generation_prompt=True) for row in rows]
    expected = [row["messages"][-1]["content"] for row in rows]
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    new_tokens = max(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected) + 4
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=pad, use_cache=True)
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
    return [{"question": next((m["content"] for m in reversed(row["messages"][:-1]) if m["role"] == "user"), ""),
             "expected": want, "answer": got, "learned": bool(exact_match(got, want))}
            for row, want, got in zip(rows, expected, answers)]


def answers_summary(answers: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """For version.json and the CLI: how many of the checked answers the version reproduces, and which not."""
    missed = [{k: a[k] for k in ("question", "expected", "answer")} for a in answers if not a["learned"]]
    return {"checked": len(answers), "reproduced": len(answers) - len(missed), "of_rows": rows, "not_reproduced": missed}


def render_answers(summary: dict[str, Any], shown: int = 5) -> list[str]:
    """"27 of 30 of your answers reproduced; 3 not: …" and the ones missed."""
    checked, done = summary["checked"], summary["reproduced"]
    sample = "" if checked >= summary["of_rows"] else f" (a sample of {checked} of {summary['of_rows']} rows)"
    missed = summary["not_reproduced"]
    lines = [f"{done} of {checked} of your answers reproduced{sample}" + (f"; {len(missed)} not:" if missed else ".")]
    for miss in missed[:shown]:
        lines.append(f"  {miss['question']!r}: wanted {miss['expected']!r}, got {miss['answer']!r}")
    if len(missed) > shown:
        lines.append(f"  ... and {len(missed) - shown} more (version.json, metrics.answers)")
    return lines


LEARNED_LOSS = 0.5  # an epoch's mean loss (nats per answer token) low enough to be worth checking the answers
LEARNED_MARGIN_STEPS = 6  # steps trained on after every answer is first reproduced (at least an epoch)
# Calibrated on SmolLM2-135M LoRA runs (bf16 base, jemalloc, avx512_bf16 CPU): 1235 MiB measured for training
# alone, 1612 MiB with the answer checks, for estimates of 984 before these two terms were added.
BASE_RSS_MB = 700  # python, torch, transformers and peft, and what the allocator keeps besides the model
ANSWER_CHECK_MB = 380  # greedy generation of the checked answers (stop_when_learned)


def plan(loaded: LoadedModel, config: TrainSettings, goal: str, examples: list[Example], total_steps: int,
         steps_per_epoch: int, check_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run will do, how long it may take on this CPU and how much memory it needs; refuses a run
    that would not fit in the memory available (better now than `Killed` half-way)."""
    c = loaded.model.config
    params = sum(p.numel() for p in loaded.model.parameters())
    per_token = (14 * c.hidden_size + 4 * c.intermediate_size) * 4 * c.num_hidden_layers * 2 / 3  # lean activations
    # full: weights, grads and two Adam moments; LoRA: the frozen weights, in bf16 under bf16 autocast
    weights_mb = params * (16 if config.method == "full" else 2 if use_bf16(config) else 4) / 2**20
    tokens = max(config.micro_batch_tokens, max(len(e.input_ids) for e in examples))
    checkpointed = wants_checkpointing(loaded, config, tokens)
    activations_mb = (tokens * c.num_hidden_layers * c.hidden_size * 4 if checkpointed else tokens * per_token) / 2**20
    peak_mb = BASE_RSS_MB + weights_mb + activations_mb + (ANSWER_CHECK_MB if check_rows else 0)
    available_mb = available_memory_mb()
    if available_mb is not None and peak_mb > available_mb:
        fits = int((available_mb - peak_mb + activations_mb) * 2**20 / per_token)
        fix = (f"set train.micro_batch_tokens to {fits // 16 * 16} or less" if fits >= 64 and not checkpointed
               else "use --method lora" if config.method == "full" else "use a smaller model")
        raise TrainError(f"this run needs about {peak_mb:.0f} MB of memory and {available_mb:.0f} MB "
                         f"are available; {fix} (or gradient_checkpointing: on)")
    epoch_tokens = sum(len(e.input_ids) for e in examples)
    seconds = total_steps / steps_per_epoch * epoch_tokens / estimated_tokens_per_second(params, loaded, use_bf16(config))
    stop = ("stopping once every answer is reproduced" if check_rows else
            "stopping when validation stops improving" if config.early_stopping_patience else "")
    what = f"{config.method}{f' r={config.lora_r}' if config.method == 'lora' else ''}"
    text = (f"plan: goal {goal}, {len(examples)} examples, {what}, learning rate {config.learning_rate_for(goal):g}, "
            f"at most {total_steps} steps ({steps_per_epoch} per epoch){', ' + stop if stop else ''}; "
            f"~{max(1, round(seconds / 60))} min at most on this CPU (an estimate); peak ≈ {peak_mb / 1000:.1f} GB"
            + (f" of the {available_mb / 1000:.1f} GB available" if available_mb else ""))
    return {"text": text, "peak_mb": round(peak_mb), "seconds": round(seconds)}


def available_memory_mb() -> float | None:
    """Memory this process may still use: MemAvailable, or the cgroup's limit when that is lower."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, (int(limit) - used) / 2**20)
    except (OSError, ValueError):
        pass
    return available


def estimated_tokens_per_second(params: int, loaded: LoadedModel, bf16: bool) -> float:
    """Training speed guessed from this machine's matrix-product speed (0.1 s of them, in the precision the
    run uses): forja reaches about half the roofline of ~4 FLOP per parameter and trained token (forward,
    and backward to the inputs)."""
    size = loaded.model.config.hidden_size
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(512, size, dtype=dtype), torch.randn(size, 4 * size, dtype=dtype)
    torch.mm(a, b)
    started, reps = time.perf_counter(), 0
    while time.perf_counter() - started < 0.1:
        torch.mm(a, b)
        reps += 1
    flops = reps * 2 * 512 * size * 4 * size / (time.perf_counter() - started)
    return max(1.0, 0.5 * flops / (4 * params))


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights, optimizer, scheduler, RNG and position in the data, written atomically


def save_checkpoint(run: Run, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> Path:
    target = run.checkpoints / f"step-{state['step']:06d}"
    if (target / "state.pt").is_file():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    torch.save(
        {
            "trainable": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        },
        tmp / "state.pt",
    )
    with (tmp / "state.pt").open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.rename(target)
    for old in sorted(p for p in run.checkpoints.glob("step-*") if not p.name.endswith(".tmp"))[: -run.config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    run.log({"step": state["step"], "checkpoint": target.name})  # a job's worker reports it (it may be rotated out)
    return target


def restore(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    saved = torch.load(checkpoint / "state.pt", weights_only=False)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    return saved["state"]


# ---------------------------------------------------------------------------------------------
# Publishing the version


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train_points = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val_points = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if train_points:
        ax.plot(*zip(*train_points), label="train loss")
    if val_points:
        ax.plot(*zip(*val_points), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def copy_records(source: Path, target: Path) -> None:
    """The run's description, metrics log, loss plot and training data travel with every version made
    from it (the data lets a later retrain replay it, so the version does not forget)."""
    for name in (METRICS_FILE, LOSS_PLOT, RUN_FILE, DATA_FILE, validation_path(DATA_FILE).name, KNOWLEDGE_FILE):
        if (source / name).exists():
            shutil.copy(source / name, target / name)


def publish(settings: Settings, run: Run, model: Any, tokenizer: Any, final: dict[str, Any]) -> Path:
    target = settings.versions_dir / run.name
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp)  # a PEFT model saves the adapter only; the base is named in version.json
    tokenizer.save_pretrained(tmp)
    copy_records(run.directory, tmp)
    description = {
        "name": run.name,
        "base": run.base,
        "method": run.config.method,
        "objective": run.config.objective,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": str(run.data),
        "data_hash": run.data_hash,
        "config": run.config.model_dump(),
        "system": run.config.system,  # what serving, evaluation and export put first when a request has none
        "forja_version": code_version(),
        "metrics": final,
    }
    (tmp / VERSION_FILE).write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    return target


def merge_version(settings: Settings, name: str, out_name: str | None) -> Path:
    """Merge a LoRA version into full weights, published as a new version (default NAME-merged)."""
    ref = resolve(name, settings)
    if ref.kind != "version" or not (ref.path / "adapter_config.json").is_file():
        raise ModelError(f"{name!r} is not a LoRA model version; only LoRA versions can be merged")
    out_name = out_name or f"{name}-merged"
    target = settings.versions_dir / out_name
    if target.exists():
        raise ModelError(f"a model version named {out_name!r} already exists")
    loaded = load(name, settings, dtype="float32", merge_adapter=True)
    tmp = target.with_name(target.name + ".tmp")
    loaded.model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    meta = json.loads((ref.path / VERSION_FILE).read_text())
    meta.update({"name": out_name, "method": "full", "merged_from": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    copy_records(ref.path, tmp)
    (tmp / VERSION_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(target)
    return target
