"""`forja bench train`: forja's trainer against three references on the same examples, in one command:
the tutorial recipe ("seeds' recipe"), the same with every example padded to max length, and TRL's
SFTTrainer with packing; then each side's share of the machine's matmul roofline.

Each side runs in a process of its own (`python -m forja.bench_train SIDE SPEC RESULT`), so its peak
memory (VmHWM) is its own. Speed is a ratio measured within one command, never an absolute target in a test.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLE_DIALOGUE = Path(__file__).resolve().parents[2] / "data" / "sample" / "dialogue"
EXAMPLES_PER_STEP = 4  # per optimizer step on the sides that batch examples (forja; the HF Trainer recipes)
SIDES = {  # `forja bench train --method dpo|kto` runs forja and TRL's preference trainers (preference_benchmark)
    "seeds": "seeds' recipe",
    "padded": "padded baseline",
    "trl": "TRL SFTTrainer, packing",
    "forja": "forja",
}
# The targets, reported as met or not (never asserted: they depend on the machine).
TARGET_VS_TRL = 3.0
TARGET_ROOFLINE_SHARE = 0.75
TODAY_PEAK_MIB = 1254  # forja's peak before this benchmark had references (README: 1246-1254 MiB over six rounds)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def train_benchmark(model: str, data: Path | None, steps: int | None, max_length: int, out: Path | None = None,
                    rounds: int = 3, sides: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    """Train every side on the same examples (one epoch of the data, or `steps` × 4 examples), each in its
    own process, `rounds` times; measure the machine's matmul speed on the model's shapes. Each side's
    figures are from its median-speed round; the ratios are medians of the ratios within each round
    (one side lasts seconds, and this machine's speed drifts by more than 10% over a command)."""
    from forja.config import ConfigError
    from forja.data import prepare

    sides = sides or list(SIDES)
    unknown = [side for side in sides if side not in SIDES]
    if unknown:
        raise ConfigError(f"--side {unknown[0]!r} is not one of {', '.join(SIDES)}")
    if "trl" in sides and not trl_available():
        log("TRL is not installed (pip install 'forja[bench]'): the TRL reference is left out")
        sides = [side for side in sides if side != "trl"]
    data = data or SAMPLE_DIALOGUE
    if not data.exists():
        raise ConfigError(f"benchmark data {data} does not exist; pass --data with dialogue files")
    log("measuring the machine's matmul speed on the model's shapes ...")
    machine, model_config = machine_figures(model, max_length)
    with tempfile.TemporaryDirectory(prefix="forja-bench-") as tmp:
        prepared = prepare([data], Path(tmp) / "bench.jsonl", val_fraction=0.15, seed=0)
        examples = _fix_examples(prepared.train_path, steps)
        spec = {"train_path": str(prepared.train_path), "model": model, "max_length": max_length,
                "bf16": machine["precision"] == "bfloat16"}
        runs = []
        for index in range(rounds):
            run = {}
            # each round starts with the next side, so that no side always runs at the same point of a drift
            for side in sides[index % len(sides):] + sides[:index % len(sides)]:
                log(f"round {index + 1} of {rounds}: {SIDES[side]} ...")
                run[side] = _train_side(side, spec, Path(tmp) / f"{side}-{index}")
            runs.append({side: run[side] for side in sides})
    log("measuring the matmul speed again ...")
    _measure_matmul(machine, model_config, max_length)
    report = {"model": model, "examples": examples, "steps": steps, "examples_per_step": EXAMPLES_PER_STEP,
              "max_length": max_length, "rounds": rounds, "machine": machine, **summarise(runs, machine)}
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(runs: list[dict[str, dict[str, Any]]], machine: dict[str, Any]) -> dict[str, Any]:
    """Each side's figures from its median-speed round (the lower of two middles); the ratios forja/other
    as the median of the ratios within each round, which shares that round's machine speed; the roofline
    share and the issue's targets."""
    sides = list(runs[0])
    middle = (len(runs) - 1) // 2
    summary: dict[str, Any] = {
        "sides": {side: sorted((run[side] for run in runs), key=lambda r: r["tokens_per_second"])[middle] for side in sides},
        "ratios": {}, "runs": runs,
    }
    if "forja" in sides:
        for other in (side for side in sides if side != "forja"):
            summary["ratios"][f"forja/{other}"] = statistics.median(
                run["forja"]["tokens_per_second"] / run[other]["tokens_per_second"] for run in runs)
        summary["roofline"] = _roofline(machine, summary["sides"]["forja"]["tokens_per_second"])
        summary["targets"] = _targets(summary)
    return summary


def _fix_examples(train_path: Path, steps: int | None) -> int:
    """With `steps`, rewrite the prepared training rows as the first steps × 4 of the data repeated, so
    that every side trains one pass over the very same examples (TRL's packed steps hold a varying number
    of them; only the examples can be the same). Returns how many examples each side trains."""
    from forja.data import meta_path
    from forja.train import read_rows

    rows = read_rows(train_path)
    if steps is None:
        return len(rows)
    rows = [rows[i % len(rows)] for i in range(steps * EXAMPLES_PER_STEP)]
    train_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    meta = json.loads(meta_path(train_path).read_text())  # forja train takes a prepared file by its meta
    meta["train"]["rows"] = len(rows)
    meta["hash"] = hashlib.sha256(train_path.read_bytes()).hexdigest()
    meta_path(train_path).write_text(json.dumps(meta, indent=2) + "\n")
    return len(rows)


def _train_side(side: str, spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    """One side in a process of its own, with an empty home that reuses the converted models of the user's."""
    from forja.config import ForjaError, jemalloc_env

    directory.mkdir()
    spec_file, result_file = directory / "spec.json", directory / "result.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "FORJA_HOME": str(directory / "home"), "PYTHONUNBUFFERED": "1",
           "FORJA_BENCH_MODELS": str(Path(os.environ.get("FORJA_HOME", "~/.forja")).expanduser() / "models")}
    if side == "forja":  # the allocator `forja train` starts itself with; the references run on glibc's
        env = jemalloc_env(env) or env
    proc = subprocess.run([sys.executable, "-m", "forja.bench_train", side, str(spec_file), str(result_file)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["no output"]
        raise ForjaError(f"the {SIDES.get(side, side)} side of the benchmark failed: {' | '.join(tail)}")
    return json.loads(result_file.read_text())


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


# ---------------------------------------------------------------------------------------------
# The machine: CPU, flags, and the matmul speed the roofline is drawn from


def machine_figures(model: str, tokens: int) -> tuple[dict[str, Any], Any]:
    """The CPU model and the flags that decide matmul speed; the precision every side trains in (forja's
    own choice: bf16 autocast where the CPU runs bf16 natively); the model's parameter count; the speed of
    its matmul shapes at `tokens` rows in fp32 (and bf16 when native). Returns them and the model's config.
    Loading the model here also converts a bundled GGUF once, before the sides reuse it."""
    import torch

    from forja.config import TrainSettings
    from forja.models import load
    from forja.train import use_bf16

    loaded = load(model, _bench_settings(), dtype="float32")
    machine = {**_cpu_info(), "threads": torch.get_num_threads(),
               "precision": "bfloat16" if use_bf16(TrainSettings()) else "float32",
               "parameters": sum(p.numel() for p in loaded.model.parameters()), "matmul": {}, "matmul_runs": []}
    _measure_matmul(machine, loaded.model.config, tokens)
    return machine, loaded.model.config


def _measure_matmul(machine: dict[str, Any], config: Any, tokens: int) -> None:
    """Measure the matmul speed once more (before and after the sides: other processes on the machine show
    as a gap between the two); `matmul` keeps the faster measurement of each precision."""
    import torch

    dtypes = [torch.float32] + ([torch.bfloat16] if machine["native_bf16"] else [])
    measured = {str(dtype).removeprefix("torch."): matmul_speed(config, tokens, dtype) for dtype in dtypes}
    machine["matmul_runs"].append({dtype: figures["gflops"] for dtype, figures in measured.items()})
    for dtype, figures in measured.items():
        if figures["gflops"] > machine["matmul"].get(dtype, {}).get("gflops", 0):
            machine["matmul"][dtype] = figures


def _cpu_info() -> dict[str, Any]:
    from forja.models import cpu_has_fast_bf16, cpu_info

    name, flags = cpu_info()
    return {"cpu": name, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in CPU_FLAGS},
            "native_bf16": cpu_has_fast_bf16()}


def matmul_speed(config: Any, tokens: int, dtype: Any, repeats: int = 10) -> dict[str, Any]:
    """GFLOP/s of `torch.matmul` on the model's own linear shapes, `tokens` rows at a time (a training
    forward's), best of `repeats` each; `gflops` weighs them by the FLOPs one token spends in each, so it
    is the speed of the model's matmuls as a whole."""
    import torch

    h, i, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    layers = config.num_hidden_layers
    # (in, out) of each weight shape, and how many such weights one forward multiplies by
    shapes = {"q/o": ((h, h), 2 * layers), "k/v": ((h, kv), 2 * layers), "gate/up": ((h, i), 2 * layers),
              "down": ((i, h), layers), "lm_head": ((h, vocab), 1)}
    flops = seconds = 0.0
    per_shape = {}
    for name, ((n_in, n_out), count) in shapes.items():
        x, w = torch.randn(tokens, n_in, dtype=dtype), torch.randn(n_in, n_out, dtype=dtype)
        for _ in range(3):  # warm-up (oneDNN builds its kernel on the first call)
            torch.matmul(x, w)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(x, w)
            best = min(best, time.perf_counter() - started)
        shape_flops = 2 * tokens * n_in * n_out
        per_shape[name] = round(shape_flops / best / 1e9, 1)
        flops, seconds = flops + shape_flops * count, seconds + best * count
    return {"gflops": round(flops / seconds / 1e9, 1), "per_shape_gflops": per_shape, "tokens": tokens}


def _roofline(machine: dict[str, Any], tokens_per_second: float) -> dict[str, Any]:
    """LoRA training spends about 4 N FLOPs per token in matmuls (N parameters): the forward 2 N and the
    backward's input gradients 2 N; the frozen base has no weight gradients, the adapters' are small.
    The roofline is the matmul speed in the training precision over that."""
    gflops = machine["matmul"][machine["precision"]]["gflops"]
    flops_per_token = 4 * machine["parameters"]
    bound = gflops * 1e9 / flops_per_token
    return {"precision": machine["precision"], "gflops": gflops, "flops_per_token": flops_per_token,
            "tokens_per_second": round(bound, 1), "forja_share": tokens_per_second / bound}


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    forja = report["sides"]["forja"]
    targets: dict[str, Any] = {
        "roofline_share": {"target": TARGET_ROOFLINE_SHARE, "value": report["roofline"]["forja_share"]},
        "peak_mib": {"target": TODAY_PEAK_MIB, "value": forja["peak_rss_mb"]},
    }
    if "forja/trl" in report["ratios"]:
        targets["vs_trl"] = {"target": TARGET_VS_TRL, "value": report["ratios"]["forja/trl"]}
    for name, t in targets.items():
        t["met"] = t["value"] <= t["target"] if name == "peak_mib" else t["value"] >= t["target"]
    return targets


# ---------------------------------------------------------------------------------------------
# The report


def render_train(report: dict[str, Any]) -> str:
    m = report["machine"]
    flags = " ".join(flag if on else f"no-{flag}" for flag, on in m["flags"].items())
    matmul = ", ".join(f"{dtype} {figures['gflops']:.1f}" for dtype, figures in m["matmul"].items())
    measured = " then ".join("/".join(f"{g:.0f}" for g in run.values()) for run in m["matmul_runs"])
    scope = (f"{report['steps']} steps of {report['examples_per_step']} examples" if report["steps"]
             else "one epoch")
    rows = [
        f"forja bench train: {report['model']}, {scope} = {report['examples']} examples for every side, "
        f"max length {report['max_length']}, LoRA r=16 on all linear layers, {m['precision']}"
        f"{' autocast (native bf16)' if m['precision'] == 'bfloat16' else ''}",
        f"CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}; {flags}",
        f"matmul on the model's shapes ({m['matmul']['float32']['tokens']} rows): {matmul} GFLOP/s "
        f"(the faster of {measured}, before and after the sides)",
        "",
        f"{'':26} {'seconds':>8} {'tokens/s':>9} {'tokens':>7} {'steps':>6} {'peak memory (VmHWM)':>20} "
        f"{'val loss':>9} {'CPU use':>8}  allocator",
    ]
    for side, r in report["sides"].items():
        rows.append(f"{SIDES[side]:26} {r['seconds']:8.1f} {r['tokens_per_second']:9.1f} {r['tokens']:7d} "
                    f"{r['optimizer_steps']:6d} {_mib(r['peak_rss_mb']):>20} {r['val_loss']:9.4f} "
                    f"{r['cpu_use']:8.0%}  {r['allocator']}")
    rows.append(f"CPU use: the side's CPU time over its wall time x {m['threads']} threads; well under 100% means "
                "other processes took the cores")
    rows.append("")
    for name, ratio in report["ratios"].items():
        rows.append(f"{'forja / ' + SIDES[name.split('/')[1]]:38} {ratio:5.2f}x")
    if "roofline" in report:
        roof = report["roofline"]
        rows.append(f"{'forja / roofline':38} {roof['forja_share']:5.0%}  4 x {m['parameters'] / 1e6:.1f}M FLOP per "
                    f"token at {roof['gflops']:.1f} GFLOP/s ({roof['precision']}) = {roof['tokens_per_second']:.0f} tokens/s")
    for name, t in report.get("targets", {}).items():
        label = {"vs_trl": f"forja >= {t['target']:.0f}x TRL", "roofline_share": f"forja >= {t['target']:.0%} of the roofline",
                 "peak_mib": f"forja peak <= {_mib(t['target'])} (before the references)"}[name]
        rows.append(f"target {label}: {'met' if t['met'] else 'NOT met'}")
    if len(report["runs"]) > 1:
        rows.append(f"each side: its median-speed round of {len(report['runs'])}; ratios: the median of the rounds' ratios")
        for i, run in enumerate(report["runs"], 1):
            rows.append(f"  round {i}: " + ", ".join(f"{side} {r['tokens_per_second']:.1f} tokens/s "
                                                     f"({r['cpu_use']:.0%} CPU) {r['peak_rss_mb']:.0f} MiB"
                                                     for side, r in run.items()))
    return "\n".join(rows)


def _mib(mib: float) -> str:
    return f"{mib:.0f} MiB = {mib * 2**20 / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------
# The sides, each run as `python -m forja.bench_train SIDE SPEC RESULT`


def _bench_settings() -> Any:
    from forja.config import load_settings

    settings = load_settings()
    shared = Path(os.environ.get("FORJA_BENCH_MODELS", "")) / "converted"
    target = settings.models_dir / "converted"
    if shared.is_dir() and not target.exists():  # skip a second ~30 s conversion of the bundled GGUF
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared)
    return settings


def _lora_config() -> Any:
    """The references' adapter: the tutorials' LoRA r=16 on all linear layers, dropout 0.05."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def _hf_arguments(config_class: Any, spec: dict[str, Any], **overrides: Any) -> Any:
    """The training arguments the references share: one epoch, lr 2e-4 decaying linearly, no warm-up,
    the benchmark's precision, no checkpoints or progress bars."""
    arguments = dict(output_dir=tempfile.mkdtemp(prefix="forja-bench-hf-"), num_train_epochs=1, learning_rate=2e-4,
                     lr_scheduler_type="linear", warmup_steps=0, bf16=spec["bf16"], logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                     disable_tqdm=True)
    return config_class(**{**arguments, **overrides})


class Stopwatch:
    """Wall time of a block and this process's CPU use over it: CPU time (all threads) over wall time x
    torch's threads. A side that had its cores to itself is near 100%."""

    def __enter__(self) -> "Stopwatch":
        self.started, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        self.seconds = time.perf_counter() - self.started
        self.cpu_use = (time.process_time() - self.cpu) / (self.seconds * torch.get_num_threads())


def _counting(collator: Any, seen: list[int]) -> Any:
    """The collator, noting the real (non-padding) tokens of every batch the trainer reads."""

    def count(batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = collator(batch)
        seen.append(int(out["attention_mask"].sum()) if "attention_mask" in out else out["input_ids"].numel())
        return out

    return count


def _val_loss(model: Any, tokenizer: Any, spec: dict[str, Any]) -> float:
    """forja's own validation loss (assistant tokens of the validation rows, in forja's precision), the
    same function forja train ends with: every side is judged by the same evaluation."""
    import torch

    from forja.config import TrainSettings
    from forja.data import validation_path
    from forja.train import build_examples, evaluate, read_rows

    rows = read_rows(validation_path(Path(spec["train_path"])))
    examples = build_examples(tokenizer, rows, spec["max_length"])[0]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"])
    return evaluate(model, examples, TrainSettings(batch_size=EXAMPLES_PER_STEP), "cpu", autocast)


def _hf_side(spec: dict[str, Any], features: list[dict[str, Any]], collator: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """HF `Trainer`, batch 1 × gradient accumulation 4, one epoch of `features`."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from forja.train import allocator, peak_rss_mb

    model.train()
    model = get_peft_model(model, _lora_config())
    args = _hf_arguments(TrainingArguments, spec, per_device_train_batch_size=1,
                         gradient_accumulation_steps=EXAMPLES_PER_STEP)
    seen: list[int] = []
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=_counting(collator, seen))
    with Stopwatch() as clock:
        trainer.train()
    return {"examples": len(features), "optimizer_steps": trainer.state.global_step, "tokens": sum(seen),
            "seconds": clock.seconds, "tokens_per_second": sum(seen) / clock.seconds, "cpu_use": clock.cpu_use, "val_loss": _val_loss(model, tokenizer, spec),
            "peak_rss_mb": peak_rss_mb(), "allocator": allocator()}


def _load(spec: dict[str, Any]) -> Any:
    from forja.models import load

    return load(spec["model"], _bench_settings(), dtype="float32")


def _seeds_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The typical tutorial: tokenize the chat with truncation only, labels on the (last) assistant answer,
    the prompt's masked with -100; `DataCollatorForSeq2Seq` pads each batch dynamically (with batch size 1,
    no padding at all)."""
    from transformers import DataCollatorForSeq2Seq

    from forja.train import read_rows

    loaded = _load(spec)
    tokenizer = loaded.tokenizer
    features = []
    for row in read_rows(Path(spec["train_path"])):
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer(full, truncation=True, max_length=spec["max_length"])
        answer_from = len(tokenizer(prompt, truncation=True, max_length=spec["max_length"])["input_ids"])
        ids = encoded["input_ids"]
        features.append({"input_ids": ids, "attention_mask": encoded["attention_mask"],
                         "labels": [-100] * answer_from + ids[answer_from:]})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return {**_hf_side(spec, features, collator, loaded.model, tokenizer), "padded_tokens": None}


def _padded_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The padded baseline: every example padded to max_length, labels = input ids with the padding masked
    by `DataCollatorForLanguageModeling` (so the prompt is trained on too)."""
    from transformers import DataCollatorForLanguageModeling

    from forja.train import read_rows

    loaded = _load(spec)
    tokenizer = loaded.tokenizer
    features = []
    for row in read_rows(Path(spec["train_path"])):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        encoded = tokenizer(text, truncation=True, max_length=spec["max_length"], padding="max_length")
        features.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    result = _hf_side(spec, features, DataCollatorForLanguageModeling(tokenizer, mlm=False), loaded.model, tokenizer)
    return {**result, "padded_tokens": len(features) * spec["max_length"]}


def _trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's `SFTTrainer` as its documentation recommends for speed: packing (best-fit decreasing into
    sequences of max_length, padding-free, each example attending to itself only), completion-only loss on
    prompt/completion rows (the prompt is every turn before the last answer), one packed sequence per
    step, the same LoRA as the other references. Gradient checkpointing off, as forja has it at this length."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from forja.train import allocator, peak_rss_mb, read_rows

    loaded = _load(spec)
    tokenizer, model = loaded.tokenizer, loaded.model
    rows = read_rows(Path(spec["train_path"]))
    dataset = Dataset.from_list([{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows])
    args = _hf_arguments(SFTConfig, spec, max_length=spec["max_length"], packing=True, completion_only_loss=True,
                         per_device_train_batch_size=1, gradient_accumulation_steps=1, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora_config())
    seen: list[int] = []
    trainer.data_collator = _counting(trainer.data_collator, seen)  # SFTTrainer refuses its own collator when packing
    examples = sum(len(lengths) for lengths in trainer.train_dataset["seq_lengths"])
    with Stopwatch() as clock:
        trainer.train()
    return {"examples": examples, "optimizer_steps": trainer.state.global_step, "tokens": sum(seen),
            "seconds": clock.seconds, "tokens_per_second": sum(seen) / clock.seconds, "cpu_use": clock.cpu_use,
            "val_loss": _val_loss(trainer.model, tokenizer, spec), "peak_rss_mb": peak_rss_mb(), "allocator": allocator(),
            "trl_version": __import__("trl").__version__}


def _forja_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """`forja train` itself with its defaults, one epoch, 4 examples per step and the references' learning
    rate and schedule; its final validation loss is the same `evaluate` on the same rows."""
    from forja.config import TrainSettings
    from forja.train import allocator, new_run, peak_rss_mb, read_rows, train

    settings = _bench_settings()
    config = TrainSettings(epochs=1, batch_size=EXAMPLES_PER_STEP, max_seq_length=spec["max_length"], eval_every=None,
                           checkpoint_every=None, lr_scheduler="linear", warmup_ratio=0.0, learning_rate=2e-4,
                           stop_when_learned=False)  # one epoch of speed: no answer checks
    run = new_run(settings, [Path(spec["train_path"])], "bench", spec["model"], config)
    with Stopwatch() as clock:  # the whole call (loading and the final evaluation too): its CPU use only
        version = train(settings, run, progress=False)
    metrics = json.loads((version / "version.json").read_text())["metrics"]
    seconds = metrics["tokens"] / metrics["tokens_per_second"]
    return {"examples": len(read_rows(run.data)) - metrics["left_out_too_long"], "optimizer_steps": metrics["step"],
            "tokens": metrics["tokens"], "seconds": seconds, "tokens_per_second": metrics["tokens_per_second"],
            "val_loss": metrics["val_loss"], "cpu_use": clock.cpu_use, "peak_rss_mb": peak_rss_mb(),
            "allocator": allocator()}


# ---------------------------------------------------------------------------------------------
# `forja bench train --method dpo|kto`: forja's preference training against TRL's DPOTrainer/KTOTrainer


PREFERENCE_SIDES = {"forja": "forja", "trl": "TRL {trainer}, LoRA"}


def preference_benchmark(model: str, data: Path | None, steps: int | None, max_length: int, method: str,
                         out: Path | None = None, rounds: int = 1, log: Any = print) -> dict[str, Any]:
    """forja and TRL's DPOTrainer (KTOTrainer) with the same LoRA on the same preference rows and steps, each in a
    process of its own: seconds, tokens/s and peak memory, and each side's loss per step. Without --data, pairs
    are made from the sample dialogue (each question's answer chosen over the next question's). Tokens/s counts
    the same tokens on both sides: every answer with its prompt, as a trainer without a shared prompt computes."""
    from forja.config import ConfigError
    from forja.data import is_preference, prepare

    if method not in ("dpo", "kto"):
        raise ConfigError(f"--method {method!r}: the preference benchmark runs dpo or kto")
    if not trl_available():
        raise ConfigError("TRL is not installed (pip install 'forja[bench]'): the preference benchmark compares with it")
    with tempfile.TemporaryDirectory(prefix="forja-bench-") as tmp:
        prepared = prepare([data or SAMPLE_DIALOGUE], Path(tmp) / "rows.jsonl", val_fraction=0.0, seed=0)
        rows = [json.loads(line) for line in prepared.train_path.read_text(encoding="utf-8").splitlines()]
        if not any(is_preference(row) for row in rows):
            rows = _pairs_from_dialogue(rows)
        rows = [row for row in rows if "chosen" in row] if method == "dpo" else _rated(rows)
        if steps is not None:
            rows = [rows[i % len(rows)] for i in range(steps * EXAMPLES_PER_STEP)]
        path = Path(tmp) / "prefs.jsonl"
        from forja.feedback import write_training_file

        write_training_file(path, rows)
        spec = {"train_path": str(path), "model": model, "max_length": max_length, "method": method,
                "bf16": _machine_bf16()}
        spec["tokens"] = _sequence_tokens(spec, rows)
        runs = []
        for index in range(rounds):
            run = {}
            for side in (["forja", "trl"] if index % 2 == 0 else ["trl", "forja"]):
                log(f"round {index + 1} of {rounds}: {side} {method} ...")
                run[side] = _train_side(f"{method}-{side}", spec, Path(tmp) / f"{side}-{index}")
            runs.append(run)
    middle = (len(runs) - 1) // 2
    sides = {side: sorted((run[side] for run in runs), key=lambda r: r["tokens_per_second"])[middle] for side in ("forja", "trl")}
    report = {"model": model, "method": method, "rows": len(rows), "steps": sides["forja"]["optimizer_steps"],
              "max_length": max_length, "machine": _cpu_info(), "precision": "bfloat16" if spec["bf16"] else "float32",
              "sides": sides, "runs": runs,
              "ratios": {"tokens_per_second": statistics.median(r["forja"]["tokens_per_second"] / r["trl"]["tokens_per_second"] for r in runs),
                         "peak_memory": statistics.median(r["forja"]["peak_rss_mb"] / r["trl"]["peak_rss_mb"] for r in runs)}}
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _pairs_from_dialogue(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dialogue = [row for row in rows if "messages" in row]
    return [{"prompt": row["messages"][:-1], "chosen": row["messages"][-1]["content"],
             "rejected": dialogue[(i + 1) % len(dialogue)]["messages"][-1]["content"]}
            for i, row in enumerate(dialogue) if row["messages"][-1]["content"] != dialogue[(i + 1) % len(dialogue)]["messages"][-1]["content"]]


def _rated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO rows: those given, else each pair's answers, good and bad alternately by pair (no prompt twice in a row)."""
    rated = [row for row in rows if "label" in row]
    if rated:
        return rated
    pairs = [row for row in rows if "chosen" in row]
    return [{"prompt": row["prompt"], "completion": row["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
            for i, row in enumerate(pairs)]


def _machine_bf16() -> bool:
    from forja.config import TrainSettings
    from forja.train import use_bf16

    return use_bf16(TrainSettings())


def _sequence_tokens(spec: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """Every answer with its prompt, in the chat template: the tokens both sides are credited with."""
    from forja.models import load_tokenizer
    from forja.train_prefs import answer_example

    tokenizer = load_tokenizer(spec["model"], _bench_settings())
    answers = [(row["prompt"], row[key]) for row in rows for key in ("chosen", "rejected", "completion") if key in row]
    return sum(len(answer_example(tokenizer, prompt, answer).input_ids) for prompt, answer in answers)


def _preference_forja(spec: dict[str, Any]) -> dict[str, Any]:
    """`forja train --method dpo|kto` with the TRL side's settings: one epoch, 4 rows a step, lr 2e-4 linear,
    LoRA r=16; its seconds are the training steps and the reference pass before them."""
    from forja.config import TrainSettings
    from forja.train import allocator, new_run, peak_rss_mb, train

    settings = _bench_settings()
    config = TrainSettings(objective=spec["method"], epochs=1, batch_size=EXAMPLES_PER_STEP,
                           max_seq_length=spec["max_length"], eval_every=None, checkpoint_every=None,
                           lr_scheduler="linear", warmup_ratio=0.0, learning_rate=2e-4, lora_dropout=0.05,
                           stop_when_learned=False, faq_retrieval=False)
    run = new_run(settings, [Path(spec["train_path"])], "bench", spec["model"], config)
    version = train(settings, run, progress=False)
    metrics = json.loads((version / "version.json").read_text())["metrics"]
    seconds = metrics["tokens"] / metrics["tokens_per_second"] + metrics["reference_seconds"]
    losses = [json.loads(line)["loss"] for line in (version / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"optimizer_steps": metrics["step"], "seconds": seconds, "tokens_per_second": spec["tokens"] / seconds,
            "reference_seconds": metrics["reference_seconds"], "losses": losses,
            "peak_rss_mb": peak_rss_mb(), "allocator": allocator()}


def _preference_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer or KTOTrainer with its defaults for LoRA (the reference is the model with the adapter
    disabled, computed at each step), 4 rows per device batch (KTO needs more than one for its KL term)."""
    from datasets import Dataset

    from forja.train import allocator, peak_rss_mb, read_rows

    loaded = _load(spec)
    tokenizer, model = loaded.tokenizer, loaded.model
    rows = read_rows(Path(spec["train_path"]))
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if spec["method"] == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer

        dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": answer(r["chosen"]),
                                      "rejected": answer(r["rejected"])} for r in rows])
    else:
        from trl import KTOConfig as Config, KTOTrainer as Trainer

        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": answer(r["completion"]),
                                      "label": r["label"]} for r in rows])
    args = _hf_arguments(Config, spec, max_length=spec["max_length"], beta=0.1, per_device_train_batch_size=EXAMPLES_PER_STEP,
                         gradient_accumulation_steps=1, gradient_checkpointing=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora_config())
    with Stopwatch() as clock:
        trainer.train()
    return {"optimizer_steps": trainer.state.global_step, "seconds": clock.seconds,
            "tokens_per_second": spec["tokens"] / clock.seconds, "cpu_use": clock.cpu_use,
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "peak_rss_mb": peak_rss_mb(), "allocator": allocator(), "trl_version": __import__("trl").__version__}


def render_preferences(report: dict[str, Any]) -> str:
    m = report["machine"]
    trainer = "DPOTrainer" if report["method"] == "dpo" else "KTOTrainer"
    rows = [f"forja bench train --method {report['method']}: {report['model']}, {report['rows']} rows, "
            f"{report['steps']} steps of {EXAMPLES_PER_STEP}, max length {report['max_length']}, LoRA r=16 on all linear "
            f"layers, {report['precision']}",
            f"CPU: {m['cpu']}, {m['cores']} cores", "",
            f"{'':22} {'seconds':>8} {'tokens/s':>9} {'peak memory (VmHWM)':>20}  loss first -> last"]
    for side, r in report["sides"].items():
        name = PREFERENCE_SIDES[side].format(trainer=trainer)
        rows.append(f"{name:22} {r['seconds']:8.1f} {r['tokens_per_second']:9.1f} {_mib(r['peak_rss_mb']):>20}  "
                    f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    rows += ["", f"forja / TRL: {report['ratios']['tokens_per_second']:.2f}x the tokens/s, "
             f"{report['ratios']['peak_memory']:.2f}x the peak memory"]
    return "\n".join(rows)


WORKERS = {"seeds": _seeds_worker, "padded": _padded_worker, "trl": _trl_worker, "forja": _forja_worker,
           "dpo-forja": _preference_forja, "kto-forja": _preference_forja,
           "dpo-trl": _preference_trl, "kto-trl": _preference_trl}

if __name__ == "__main__":
    side, spec_path, result_path = sys.argv[1:4]
    result = WORKERS[side](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
