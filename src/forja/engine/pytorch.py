"""Token-by-token decoding of a transformers model with a KV cache, streamed as text deltas.

Used by `forja generate`; the serving scheduler batches the same steps across requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from forja.engine import ContextLengthExceeded, SamplingParams, Usage
from forja.models import LoadedModel, with_system


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after `system` when given (else the chat template's default system turn, if any)."""
    return with_system([{"role": "user", "content": prompt}], system)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of the conversation rendered with the model's chat template, ready for the answer."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Base models without a template: plain concatenation of the turns.
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token for each row of logits [batch, vocab] → [batch]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8
    character and any tail that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (after stop-string truncation)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.text = text
        for stop in self.stop:
            cut = text.find(stop)
            if cut != -1:
                self.text = text[:cut]
                self.stopped = True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])), default=0)
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta


class PackedLinear(torch.nn.Module):
    """An inference-only `nn.Linear` whose weight oneDNN has laid out once, in advance, for its own matrix
    kernel. On a CPU in float32 a decode step's small products (1 to 8 rows against the weight) run
    1.2–3× faster than the default BLAS call, which re-reads the plain layout every time; the results
    agree to float32 rounding (about 1e-4 on the logits)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: Any) -> bool:
    """oneDNN packing applies to a float32 model on the CPU of a torch build that has it."""
    return (model.device.type == "cpu" and model.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: Any, rows: int = 8) -> int:
    """Swap every `nn.Linear` of an inference model for a `PackedLinear` (tuned for about `rows` rows at a time),
    in place; returns how many were swapped (0 where packing does not apply). The model can no longer be
    trained or saved afterwards: only the engine that owns it does this."""
    if not can_pack(model):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child, rows))
                swapped += 1
    return swapped


class Generation:
    """One streamed answer. Iterate for text deltas; afterwards `text`, `usage`, `finish_reason` are set."""

    def __init__(self, loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams):
        limit = loaded.context_length
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise ContextLengthExceeded(len(prompt_ids), params.max_new_tokens, limit)
        self.loaded = loaded
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream = TextStream(loaded.tokenizer, params.stop)
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.stream.text

    def __iter__(self) -> Iterator[str]:
        from transformers import DynamicCache

        model = self.loaded.model
        device = model.device
        generator = None
        if self.params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.params.seed)
        eos = self.loaded.eos_token_ids
        cache = DynamicCache()
        inputs = torch.tensor([self.prompt_ids], device=device)
        with torch.inference_mode():
            for _ in range(self.params.max_new_tokens):
                logits = model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
                token = int(sample_next(logits, self.params, generator)[0])
                if token in eos:
                    self.finish_reason = "stop"
                    break
                self.usage.completion_tokens += 1
                delta = self.stream.push(token)
                if delta:
                    yield delta
                if self.stream.stopped:
                    self.finish_reason = "stop"
                    return
                inputs = torch.tensor([[token]], device=device)
            else:
                self.finish_reason = "length"
        tail = self.stream.finish()
        if tail:
            yield tail
