"""Picking the next token from a row of logits, the same for every backend: logit bias, repetition,
frequency and presence penalties, a grammar's mask, temperature, top-k, top-p and min-p, then greedy or a
seeded draw; with the chosen token's log-probability and the most likely alternatives when asked.

One `Sampler` per sequence keeps what the penalties and the grammar need (the tokens seen so far)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from forja.engine import SamplingParams

MIN_MASS = 1e-6  # top_p and min_p below this would keep no token at all: the top token is always kept


@dataclass
class TokenLogprob:
    """A generated token with its log-probability under the model (before temperature and penalties) and,
    when asked, the most likely tokens at that step. An upstream's tokens are their text (it has no ids here)."""

    token: int | str
    logprob: float
    top: list[tuple[int | str, float]]


class Sampler:
    """The next token of one sequence. `plain` is true when nothing but greedy argmax is needed, so the
    scheduler can pick those rows in one batched argmax."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: Any):
        self.params = params
        self.prompt_ids = prompt_ids
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self.constraint = params.grammar.start() if params.grammar is not None else None
        self.counts: torch.Tensor | None = None  # [vocab] how often each token was generated
        self.seen: torch.Tensor | None = None  # [vocab] in the prompt or the answer (repetition_penalty)
        self.pending: list[TokenLogprob] = []  # logprobs not yet handed to a delta
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values), made once
        self.plain = (params.temperature == 0 and not params.logprobs and self.constraint is None
                      and not _penalised(params) and not params.logit_bias)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing may follow."""
        return self.constraint is not None and self.constraint.done

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits [vocab] (a float tensor; not modified)."""
        p = self.params
        raw = logits.float()
        scores = raw.clone()
        if p.logit_bias:
            if self.bias is None:
                ids = torch.tensor(list(p.logit_bias), device=scores.device)
                values = torch.tensor(list(p.logit_bias.values()), device=scores.device)
                valid = ids < scores.numel()
                self.bias = ids[valid], values[valid]
            scores[self.bias[0]] += self.bias[1]
        if _penalised(p):
            self._penalise(scores)
        if self.constraint is not None:
            self.constraint.mask(scores)
        token = self._choose(scores)
        if self.constraint is not None:
            self.constraint.accept(token)
        if p.logprobs:
            self.pending.append(_logprob(raw, token, p.top_logprobs))
        self._count(token, scores.numel(), scores.device)
        return token

    def _choose(self, scores: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(scores.argmax())
        scores = scores / p.temperature
        if p.top_k and p.top_k < scores.numel():
            cut = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < cut, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < max(p.min_p, MIN_MASS) * probs.max(), 0.0)
        if p.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            drop = ordered.cumsum(dim=-1) - ordered >= max(p.top_p, MIN_MASS)
            drop[0] = False
            probs = torch.zeros_like(probs).scatter(-1, order, ordered.masked_fill(drop, 0.0))
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            return int(scores.argmax())  # everything underflowed: the most likely token
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _penalise(self, scores: torch.Tensor) -> None:
        """transformers' repetition penalty over the prompt and the answer; OpenAI's frequency and presence
        penalties over the answer."""
        p = self.params
        if p.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
                prompt = torch.tensor([t for t in self.prompt_ids if t < scores.numel()], dtype=torch.long,
                                      device=scores.device)
                self.seen[prompt] = True
            penalised = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
            scores.copy_(torch.where(self.seen, penalised, scores))
        if self.counts is not None and (p.frequency_penalty or p.presence_penalty):
            scores -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()

    def _count(self, token: int, vocab: int, device: Any) -> None:
        p = self.params
        if p.frequency_penalty or p.presence_penalty:
            if self.counts is None:
                self.counts = torch.zeros(vocab, device=device)
            if token < vocab:
                self.counts[token] += 1
        if self.seen is not None and token < vocab:
            self.seen[token] = True

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs gathered since the last call (None when they were not asked for)."""
        if not self.params.logprobs:
            return None
        taken, self.pending = self.pending, []
        return taken


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def _logprob(raw: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(raw, dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), alternatives)
