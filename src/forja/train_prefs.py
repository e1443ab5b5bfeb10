"""Preference training in forja's trainer: DPO and ORPO on pairs, KTO on rated answers, instead of or next to
supervised rows (train.objective; `forja train --method dpo|kto|orpo`, `forja train --from-feedback`).

Every answer is a packed example (a pair's two answers share their prompt in one forward), its log-probability
summed through a chunked head (the vocabulary's logits never exist whole) with the activations recomputed as in
supervised runs. The reference log-probabilities are computed once, before the first step, with the LoRA adapter
disabled (or the initial weights, for full fine-tuning) and kept in the run directory: never a second model.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from forja.train import IGNORE, Example, TrainError, dialogue_example, labelled_states, packed_tokens, pack, shared_prefix

REFERENCE_FILE = "reference.pt"  # in the run directory: the reference log-probabilities of every training item
VAL_REFERENCE_FILE = "reference.val.pt"  # and of every validation item
PAIR_OBJECTIVES = {"sft": "dpo", "dpo": "dpo", "orpo": "orpo"}  # how pairs train under each objective


@dataclass
class Preference:
    """One training item: a pair of answers to a prompt (DPO, ORPO) or one rated answer (KTO)."""

    answers: list[Example]  # a pair's [chosen, rejected], or a rated row's [completion]
    label: bool | None = None  # a rated row: a good answer (True) or a bad one; None for a pair
    kl: Example | None = None  # a rated row: its prompt with another row's answer, for KTO's estimate of the KL term

    @property
    def input_ids(self) -> list[int]:  # the longest answer: what batch_order groups items of similar length by
        return max((a.input_ids for a in self.answers), key=len)

    @property
    def tokens(self) -> int:
        return packed_tokens(self.answers)


def answer_example(tokenizer: Any, prompt: list[dict[str, Any]], answer: str) -> Example:
    """The prompt and one answer in the chat template, only the answer (and its end of turn) labelled."""
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
    return dialogue_example(tokenizer, [*context, {"role": "assistant", "content": answer}])


def build_items(tokenizer: Any, rows: list[dict[str, Any]], objective: str, max_len: int
                ) -> tuple[list[Preference], list[str]]:
    """Training items of the preference rows under `objective`: kto makes a pair one good and one bad rated row;
    dpo and orpo train pairs only. Items with an answer longer than max_len are left out and reported."""
    pairs = [r for r in rows if "chosen" in r]
    rated = [r for r in rows if "label" in r]
    if objective == "kto":
        rated += [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                  for r in pairs for key in ("chosen", "rejected")]
        pairs = []
    elif objective in ("dpo", "orpo") and rated:
        raise TrainError(f"--method {objective} trains on pairs (prompt, chosen, rejected); {len(rated)} rows are "
                         "single rated answers (prompt, completion, label): train them with --method kto")
    items, too_long = [], []
    for row in pairs:
        items.append(Preference([answer_example(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]))
    for i, row in enumerate(rated):
        # KTO's reference point: the prompt with the answer of the next row that asks something else (a fixed
        # partner, so its reference log-probability is computed once like the others)
        partner = next((rated[(i + j) % len(rated)] for j in range(1, len(rated))
                        if rated[(i + j) % len(rated)]["prompt"] != row["prompt"]), None)
        kl = answer_example(tokenizer, row["prompt"], partner["completion"]) if partner else None
        items.append(Preference([answer_example(tokenizer, row["prompt"], row["completion"])], bool(row["label"]),
                                kl if kl is not None and len(kl.input_ids) <= max_len else None))
    kept = []
    for item, row in zip(items, pairs + rated):
        if len(item.input_ids) > max_len:
            too_long.append(f"{row.get('source', '?')}: {len(item.input_ids)} tokens")
        else:
            kept.append(item)
    return kept, too_long


def as_dialogue(row: dict[str, Any]) -> dict[str, Any]:
    """A preference row as a conversation ending with an empty answer, so the FAQ grounding of training rows
    (knowledge.grounding.grounded_rows) prompts it as it prompts the others; `from_dialogue` takes it back."""
    return {"messages": [*row["prompt"], {"role": "assistant", "content": ""}], "preference": row}


def from_dialogue(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["preference"], "prompt": row["messages"][:-1]}


# ---------------------------------------------------------------------------------------------
# Log-probabilities of answers, from packed forwards


def sequence_logps(model: Any, examples: list[Example], device: str) -> torch.Tensor:
    """Each example's summed log-probability of its labelled tokens, from one packed forward."""
    hidden, targets, head = labelled_states(model, pack(examples, device))
    if type(head) is torch.nn.Linear and head.bias is None:
        losses = LinearTokenLoss.apply(hidden, head.weight, targets)
    else:
        losses = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    shared = shared_prefix(examples)
    counts = [sum(label != IGNORE for label in e.labels[shared + 1 :]) for e in examples]
    return torch.stack([-part.sum() for part in losses.split(counts)])


class LinearTokenLoss(torch.autograd.Function):
    """Each row's cross-entropy of `hidden @ weight.T` against its target, a chunk of rows at a time, as
    train.LinearCrossEntropy computes their sum: the logits never exist whole. The gradient for `hidden` is
    computed in the forward pass and scaled by each row's incoming gradient in the backward; the one for
    `weight` (full fine-tuning of the head) is recomputed there, chunk by chunk."""

    CHUNK = 32

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        out = hidden.new_empty(len(hidden), dtype=torch.float32)
        for rows, logits, picked in _chunks(hidden, w, targets, dtype):
            out[rows] = torch.logsumexp(logits, dim=-1) - logits.gather(1, picked[:, None])[:, 0]
            if grad_hidden is not None:
                grad_hidden[rows] = (_softmax_minus_onehot(logits, picked).to(dtype) @ w).to(hidden.dtype)
        ctx.grad_hidden, ctx.dtype = grad_hidden, dtype
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden = None
        if ctx.grad_hidden is not None:
            grad_hidden = ctx.grad_hidden * grad_out[:, None].to(ctx.grad_hidden.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            hidden, weight, targets = ctx.saved_tensors
            w = weight.to(ctx.dtype)
            total = torch.zeros_like(weight, dtype=torch.float32)
            for rows, logits, picked in _chunks(hidden, w, targets, ctx.dtype):
                total += (_softmax_minus_onehot(logits, picked) * grad_out[rows, None]).T @ hidden[rows].float()
            grad_weight = total.to(weight.dtype)
        return grad_hidden, grad_weight, None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunks(hidden: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
            ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(hidden), LinearTokenLoss.CHUNK):
        rows = slice(start, start + LinearTokenLoss.CHUNK)
        yield rows, (hidden[rows].to(dtype) @ w.T).float(), targets[rows]


def _softmax_minus_onehot(logits: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    grad = logits.softmax(dim=-1)
    grad[torch.arange(len(picked)), picked] -= 1
    return grad


def forwards(sizes: list[tuple[Any, int]], max_tokens: int) -> list[list[Any]]:
    """Keys grouped into forwards of at most max_tokens (summed sizes; one larger goes alone), shortest first."""
    parts: list[list[Any]] = []
    total = 0
    for key, size in sorted(sizes, key=lambda ks: ks[1]):
        if parts and total + size <= max_tokens:
            parts[-1].append(key)
            total += size
        else:
            parts.append([key])
            total = size
    return parts


# ---------------------------------------------------------------------------------------------
# The reference: computed once, kept with the run


def reference_logps(model: Any, items: list[Preference], max_tokens: int, device: str, autocast: Any) -> torch.Tensor:
    """[items, 3]: the reference log-probability of each item's answers and KL sequence (NaN where none): the
    model as it is before the first step, its LoRA adapter disabled (peft's disable_adapter)."""
    out = torch.full((len(items), 3), float("nan"))
    sequences = {(i, slot): e for i, item in enumerate(items)
                 for slot, e in enumerate([*item.answers, *([None] * (2 - len(item.answers))), item.kl]) if e is not None}
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast, disabled:
            for keys in forwards([(k, len(e.input_ids)) for k, e in sequences.items()], max_tokens):
                for (i, slot), logp in zip(keys, sequence_logps(model, [sequences[k] for k in keys], device)):
                    out[i, slot] = float(logp)
    finally:
        model.train(was_training)
    return out


def cached_reference(path: Path, model: Any, items: list[Preference], max_tokens: int, device: str,
                     autocast: Any) -> torch.Tensor:
    """The run's reference log-probabilities: read from the run directory (a resumed run: the weights are no
    longer the initial ones), else computed now, before the first step, and written there."""
    digest = hashlib.sha256(repr([(e.input_ids, e.labels) for item in items
                                  for e in [*item.answers, item.kl] if e is not None]).encode()).hexdigest()
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["digest"] == digest:
            return saved["logps"]
    logps = reference_logps(model, items, max_tokens, device, autocast)
    tmp = path.with_suffix(".tmp")
    torch.save({"digest": digest, "logps": logps}, tmp)
    tmp.rename(path)
    return logps


# ---------------------------------------------------------------------------------------------
# The losses


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β((log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))))
    per pair, and the two rewards β·(log π - log π_ref)."""
    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def kto_loss(logps: torch.Tensor, ref: torch.Tensor, good: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7): with r = log π(y) - log π_ref(y) and the detached reference point
    z0 = max(0, KL estimate), a good answer's loss is λ_D(1 - σ(β(r - z0))), a bad one's λ_U(1 - σ(β(z0 - r)));
    and each row's reward β·r."""
    ratio = logps - ref
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, (beta * ratio).detach()


def orpo_odds_term(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 7): log σ(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)) with P the
    answer's per-token mean probability; log(1 - P) through log1p(-exp) (the answers' log-probabilities are < 0)."""
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean)) - torch.log1p(-torch.exp(rejected_mean)))
    return F.logsigmoid(log_odds)


# ---------------------------------------------------------------------------------------------
# A step's preference items


def preference_step(model: Any, items: list[Preference], ids: list[int], reference: torch.Tensor, config: Any,
                    device: str, autocast: Any) -> dict[str, float]:
    """Forward (and, with gradients on, backward) of one step's preference items, each kind's loss the mean over
    the step's items of that kind (ORPO's answer loss per chosen token), as one batch of them would give; returns
    the step's preference loss and its metrics: chosen and rejected log-probabilities, reward margin, reward
    accuracy (the chosen reward above the rejected, or a rated row's reward of its label's sign) and KTO's KL."""
    pair_loss = PAIR_OBJECTIVES.get(config.objective)
    pairs = [i for i in ids if items[i].label is None]
    rated = [i for i in ids if items[i].label is not None]
    chosen_tokens = sum(items[i].answers[0].trained_tokens for i in pairs)
    kl = torch.zeros(())
    with_kl = [i for i in rated if items[i].kl is not None]
    if with_kl:  # KTO's reference point: detached, so no gradient and computed first
        policy = []
        with torch.no_grad(), autocast:
            for keys in forwards([(i, len(items[i].kl.input_ids)) for i in with_kl], config.micro_batch_tokens):
                policy += zip(keys, sequence_logps(model, [items[i].kl for i in keys], device).float())
        kl = torch.stack([logp - reference[i, 2] for i, logp in policy]).mean().clamp(min=0)
    total = 0.0
    stats: dict[str, list[float]] = {"chosen": [], "rejected": [], "margin": [], "correct": []}
    for keys in forwards([(i, items[i].tokens) for i in ids], config.micro_batch_tokens):
        answers = [a for i in keys for a in items[i].answers]
        with autocast:
            logps = sequence_logps(model, answers, device).float()
        at, start = {}, 0  # each item's first answer's place in logps (a pair's second follows it)
        for i in keys:
            at[i], start = start, start + len(items[i].answers)
        loss = logps.new_zeros(())
        in_pairs = [i for i in keys if items[i].label is None]
        if in_pairs:
            chosen = torch.stack([logps[at[i]] for i in in_pairs])
            rejected = torch.stack([logps[at[i] + 1] for i in in_pairs])
            if pair_loss == "orpo":
                lengths = [(items[i].answers[0].trained_tokens, items[i].answers[1].trained_tokens) for i in in_pairs]
                chosen_mean = chosen / torch.tensor([c for c, _ in lengths])
                rejected_mean = rejected / torch.tensor([r for _, r in lengths])
                odds = orpo_odds_term(chosen_mean, rejected_mean)
                loss = loss - chosen.sum() / chosen_tokens - config.orpo_lambda * odds.sum() / len(pairs)
                good_reward, bad_reward = config.orpo_lambda * chosen_mean.detach(), config.orpo_lambda * rejected_mean.detach()
            else:
                ref = reference[in_pairs]
                losses, good_reward, bad_reward = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], config.beta)
                loss = loss + losses.sum() / len(pairs)
            stats["chosen"] += chosen.tolist()
            stats["rejected"] += rejected.tolist()
            stats["margin"] += (good_reward - bad_reward).tolist()
            stats["correct"] += (good_reward > bad_reward).float().tolist()
        in_rated = [i for i in keys if items[i].label is not None]
        if in_rated:
            good = torch.tensor([bool(items[i].label) for i in in_rated])
            mine = torch.stack([logps[at[i]] for i in in_rated])
            losses, rewards = kto_loss(mine, reference[in_rated, 0], good, kl, config.beta,
                                       config.kto_desirable_weight, config.kto_undesirable_weight)
            loss = loss + losses.sum() / len(rated)
            for is_good, logp, reward in zip(good.tolist(), mine.tolist(), rewards.tolist()):
                stats["chosen" if is_good else "rejected"].append(logp)
                stats["correct"].append(float((reward > 0) == is_good))
            stats.setdefault("good_rewards", []).extend(r for r, g in zip(rewards.tolist(), good.tolist()) if g)
            stats.setdefault("bad_rewards", []).extend(r for r, g in zip(rewards.tolist(), good.tolist()) if not g)
        if torch.is_grad_enabled():
            loss.backward()
        total += float(loss.detach())
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    margins = [mean(stats["margin"])] if stats["margin"] else []
    if stats.get("good_rewards") and stats.get("bad_rewards"):  # KTO: the mean good reward above the mean bad one
        margins.append(mean(stats["good_rewards"]) - mean(stats["bad_rewards"]))
    record = {"preference_loss": total, "chosen_logps": mean(stats["chosen"]), "rejected_logps": mean(stats["rejected"]),
              "reward_margin": mean(margins), "reward_accuracy": mean(stats["correct"])}
    if rated:
        record["kl"] = float(kl)
    return {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def evaluate_preferences(model: Any, items: list[Preference], reference: torch.Tensor, config: Any, device: str,
                         autocast: Any) -> dict[str, float]:
    """The validation items' preference loss and reward accuracy, all of them as one step (no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            record = preference_step(model, items, list(range(len(items))), reference, config, device, autocast)
    finally:
        model.train(was_training)
    return {"val_preference_loss": record["preference_loss"], "val_reward_accuracy": record.get("reward_accuracy", 0.0)}
