"""The PyTorch backend of the scheduler: continuous batching over a transformers model (CPU or GPU).

How the batch is kept: one KV cache whose rows are the active requests, aligned so that every row's
newest token sits in the last column; a [rows, columns] mask of valid columns hides the padding (on the
left, and between a shared prefix and the rest of a prompt) and explicit position ids keep each row's
positions its own. A request is prefilled alone or with the others admitted at the same time
(left-padded), on top of the cached keys and values of the prefix it shares with other prompts, then its
cache rows are padded and concatenated to the batch; a finished row is dropped with index_select.

LoRA versions of the engine's base are served as PEFT adapters on its one copy of the weights
(`add_adapter`): each row of a decode step names its adapter (PEFT's mixed-batch `adapter_names`), so
requests for several assistants share every step; prefixes are cached per adapter.
"""

from __future__ import annotations

import collections
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from forja.engine import GenerationError
from forja.engine.scheduler import Scheduler, Sequence
from forja.models import LoadedModel, common_prefix


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

    def unpacked(self) -> torch.nn.Linear:
        """The plain `nn.Linear` again (the packed layout converts back exactly), for PEFT to wrap."""
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = torch.nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear


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


class PyTorchEngine(Scheduler):
    """Continuous batching over a transformers model (PyTorch, CPU or GPU), with shared prompt prefixes:
    the key/value cache of a prefix that several prompts start with (a persona's system turn, the chat
    template's default one) is computed once and kept (`PrefixCache`), so a prompt prefills only what
    follows it. The engine owns its model: on a CPU in float32 it packs the linear weights for oneDNN
    (`pack_linears`) unless `pack=False`."""

    backend = "pytorch"

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8, max_queue: int = 64, name: str | None = None,
                 prefix_tokens: int = 2048, pack: bool = True):
        self.loaded = loaded
        self.packed_linears = pack_linears(loaded.model, max_batch_size) if pack else 0
        self._cache: Any = None  # the batch DynamicCache, rows in the order of self._active
        self._valid: torch.Tensor | None = None  # [rows, columns] which cache columns hold a real token
        self.prefixes = PrefixCache(prefix_tokens)
        self.model = loaded.model  # what a forward calls: the PeftModel around it once an adapter is added
        self._peft_state: str | None = MIXED  # what PEFT's layers are set to (`_switch`)
        super().__init__(loaded.tokenizer, loaded.eos_token_ids, loaded.context_length, loaded.model.device,
                         name=name or loaded.ref.name, max_batch_size=max_batch_size, max_queue=max_queue)

    def _reset(self) -> None:
        self._active, self._cache, self._valid = [], None, None

    def add_adapter(self, name: str, path: Any) -> None:
        """Load a trained LoRA version's adapter (its directory) onto this engine's base, between two steps.
        PEFT wraps the adapter's target layers; those the engine had packed for oneDNN are unpacked first
        (PEFT wraps plain `nn.Linear`s only) and packed again inside PEFT's wrapper, where only its forward
        calls them (the base's product stays oneDNN's; the adapter's two thin ones are added to it)."""
        from peft import PeftModel

        if name in self.adapters:
            return
        targets = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("target_modules")
        with self._model_lock:
            packed = bool(self.packed_linears)
            if packed:
                _unpack_targets(self.loaded.model, targets)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.loaded.model, str(path), adapter_name=name,
                                                       is_trainable=False)
            self.model.eval()
            if packed:
                self.packed_linears = _pack_wrapped(self.loaded.model, self.max_batch_size)
            self._peft_state = MIXED  # loading may change the active adapter: set it again before the next forward
            self._switch(None)
            self.adapters[name] = path

    def _forward(self, adapters: list[str | None], **inputs: Any) -> Any:
        """The model's forward over rows whose adapters are `adapters` (one per row). Rows of several
        adapters: each row names its own, "__base__" for the plain base (PEFT's mixed batch, which splits
        every LoRA layer's input by adapter). Rows of one: that adapter alone is switched on (or all off,
        for the base), no split (measured: a mixed batch of one adapter costs more than the adapter alone)."""
        if not self.adapters:
            if any(adapters):
                raise GenerationError(f"the engine for {self.name} has no adapters")
            return self.model(**inputs)
        distinct = set(adapters)
        self._switch(next(iter(distinct)) if len(distinct) == 1 else MIXED)
        if len(distinct) > 1:
            inputs["adapter_names"] = [adapter or BASE_ADAPTER for adapter in adapters]
        return self.model(**inputs)

    def _switch(self, state: str | None) -> None:
        """Set PEFT's layers for the next forward: one adapter on (a name), all off (None) or all on for a
        mixed batch (MIXED); only when it changes (each switch visits every layer)."""
        if state == self._peft_state:
            return
        if state is None:
            self.model.base_model.disable_adapter_layers()
        else:
            if self._peft_state is None:
                self.model.base_model.enable_adapter_layers()
            if state != MIXED:
                self.model.base_model.set_adapter(state, inference_mode=True)
        self._peft_state = state

    def _admit(self, group: list[Sequence]) -> None:
        """Prefill new requests (after the prefix they share with earlier prompts, when one is cached),
        sample their first tokens, join the batch."""
        for seq in group:
            if seq.stream.cancelled.is_set():
                self._finish(seq, "cancelled")
        plans: dict[tuple[str | None, int], tuple[Prefix | None, int, list[Sequence]]] = {}
        for seq in group:
            if seq.done:
                continue
            prefix, shared = self.prefixes.lookup(seq.prompt_ids, seq.adapter)
            key = (seq.adapter, id(prefix))  # one forward per prefix, and adapter
            _, known, members = plans.get(key, (prefix, shared, []))
            plans[key] = (prefix, min(known, shared), [*members, seq])
        for prefix, shared, members in plans.values():
            if prefix is None and len(members) > 1:  # new prompts that start alike: their common part first
                prefix, shared = self._prefill_common_part(members)
            self._prefill(members, prefix, shared)

    def _prefill_common_part(self, group: list[Sequence]) -> tuple["Prefix | None", int]:
        """Prefill once, alone, the tokens every prompt of `group` starts with (when at least MIN_PREFIX)
        and cache them: one more (short) forward saves computing them once per prompt."""
        first, adapter = group[0].prompt_ids, group[0].adapter
        shared = min(min(common_prefix(first, seq.prompt_ids) for seq in group[1:]), *(len(s.prompt_ids) - 1 for s in group))
        if shared < MIN_PREFIX or shared > self.prefixes.max_tokens:
            return None, 0
        from transformers import DynamicCache

        cache = DynamicCache()
        self._forward([adapter], input_ids=torch.tensor([first[:shared]], device=self.device), past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        prefix = self.prefixes.add(first[:shared], [(layer.keys, layer.values) for layer in cache.layers], adapter)
        return (prefix, shared) if prefix is not None else (None, 0)

    def _prefill(self, group: list[Sequence], prefix: "Prefix | None", start: int) -> None:
        """One left-padded forward over each prompt of `group` after its first `start` tokens, on top of
        those tokens' keys and values cut from `prefix` (everything, when there is no prefix)."""
        from transformers import DynamicCache

        model = self.loaded.model
        device = model.device
        rows = len(group)
        tails = [seq.prompt_ids[start:] for seq in group]
        width = max(len(t) for t in tails)
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        inputs = torch.tensor([[pad_id] * (width - len(t)) + t for t in tails], device=device)
        pads = torch.tensor([width - len(t) for t in tails], device=device)
        columns = torch.arange(width, device=device)
        position_ids = start + (columns[None, :] - pads[:, None]).clamp(min=0)
        cache = DynamicCache()
        if prefix is not None:
            for index, (keys, values) in enumerate(prefix.layers):
                cache.update(keys[:, :, :start].expand(rows, -1, -1, -1), values[:, :, :start].expand(rows, -1, -1, -1), index)
        valid = torch.cat([torch.ones(rows, start, dtype=torch.bool, device=device), columns[None, :] >= pads[:, None]], dim=1)
        mask = None  # without padding the model's own causal mask is the right one (prefix included)
        if bool((pads > 0).any()):
            # each row sees the prefix, then its own tokens causally; padding is hidden, and a padding
            # query sees only itself, so no softmax row is empty (NaN)
            own = (columns[None, None, :] <= columns[None, :, None]) & (columns[None, None, :] >= pads[:, None, None])
            own |= torch.eye(width, dtype=torch.bool, device=device)[None]
            allowed = torch.cat([torch.ones(rows, width, start, dtype=torch.bool, device=device), own], dim=2)
            mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
            mask = mask[:, None]
        # logits_to_keep=1: only the last position's vocabulary projection (the rest would be thrown away)
        logits = self._forward([seq.adapter for seq in group], input_ids=inputs, attention_mask=mask,
                               position_ids=position_ids, past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1, :]
        if prefix is None:
            self._remember_prefixes(group, cache, pads)
        for row, seq in enumerate(group):
            seq.length = len(seq.prompt_ids)
            self._accept(seq, self._pick_one(seq, logits[row]) if not seq.sampler.plain else int(logits[row].argmax()))
        keep = [row for row, seq in enumerate(group) if not seq.done]
        if not keep:
            return
        if len(keep) < len(group):
            index = torch.tensor(keep, device=device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            valid = valid[index]
        if self._cache is None:
            self._cache, self._valid = cache, valid
        else:
            self._cache, self._valid = _concat_rows(self._cache, self._valid, cache, valid)
        self._active.extend(group[row] for row in keep)
        self.max_rows_seen = max(self.max_rows_seen, len(self._active))

    def _remember_prefixes(self, group: list[Sequence], cache: Any, pads: torch.Tensor) -> None:
        """Keep the keys and values of what a prompt just prefilled shares with another prompt of its group or
        a recent one (at least MIN_PREFIX tokens): cut from the cache the prefill made, no extra forward."""
        for row, seq in enumerate(group):
            others = [s.prompt_ids for s in group if s is not seq and s.adapter == seq.adapter]
            shared = self.prefixes.shared_length(seq.prompt_ids, others, seq.adapter)
            if (shared < MIN_PREFIX
                    or self.prefixes.lookup(seq.prompt_ids[:shared + 1], seq.adapter, count=False)[1] >= shared):
                continue
            begin = int(pads[row])
            self.prefixes.add(seq.prompt_ids[:shared], [
                (layer.keys[row : row + 1, :, begin : begin + shared].clone(),
                 layer.values[row : row + 1, :, begin : begin + shared].clone()) for layer in cache.layers],
                seq.adapter)

    def _step(self) -> None:
        """One forward over every active row, then one new token for each."""
        model = self.loaded.model
        device = model.device
        rows = len(self._active)
        valid = torch.cat([self._valid, torch.ones(rows, 1, dtype=torch.bool, device=device)], dim=1)
        lengths = torch.tensor([seq.length for seq in self._active], device=device)
        inputs = torch.tensor([[seq.next_token] for seq in self._active], device=device)
        # no holes in any row (one request alone, or rows of equal length): no mask to build at all
        mask = None if bool(valid.all()) else valid.long()
        logits = self._forward(
            [seq.adapter for seq in self._active], input_ids=inputs, attention_mask=mask,
            position_ids=lengths[:, None], past_key_values=self._cache, use_cache=True,
        ).logits[:, -1, :]
        self._valid = valid
        self.steps += 1
        for seq, token in zip(self._active, self._pick(logits)):
            seq.length += 1
            self._accept(seq, token)

    def _release(self, keep: list[int]) -> None:
        if not keep:
            self._cache, self._valid = None, None
            return
        # drop the rows, then the leading columns that no remaining row uses
        index = torch.tensor(keep, device=self.loaded.model.device)
        valid = self._valid.index_select(0, index)
        trim = int(valid.any(dim=0).nonzero()[0])
        self._valid = valid[:, trim:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:, :]
            layer.values = layer.values.index_select(0, index)[:, :, trim:, :]


MIN_PREFIX = 16  # shared tokens worth caching
BASE_ADAPTER = "__base__"  # PEFT's name, in a mixed batch, for rows that use no adapter
MIXED = "\0mixed"  # `_switch` state: every adapter on, each row naming its own (never a version name)


def _unpack_targets(model: Any, targets: Any) -> int:
    """Turn back into `nn.Linear` the packed layers a LoRA adapter with `target_modules` wraps (a list of
    module names, or a regular expression on the full name); returns how many. Names are the model's own
    (PEFT's saved adapter names them without its "base_model.model." wrapper)."""
    def targeted(full_name: str) -> bool:
        if isinstance(targets, str):
            return targets == "all-linear" or re.fullmatch(targets, full_name) is not None
        # as PEFT matches a list: a module's full name, or its last components
        return any(full_name == t or full_name.endswith(f".{t}") for t in targets or ())

    count = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, PackedLinear) and targeted(full):
                setattr(parent, name, child.unpacked())
                count += 1
    return count


def _pack_wrapped(model: Any, rows: int) -> int:
    """Pack the plain `nn.Linear` inside each of PEFT's LoRA layers (its `base_layer`); returns how many
    layers of the model are packed now, wrapped or not."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module.base_layer) is torch.nn.Linear:
            module.base_layer = PackedLinear(module.base_layer, rows)
    return sum(isinstance(module, PackedLinear) for module in model.modules())


@dataclass(eq=False)  # one entry is itself: the same ids may be cached under two adapters
class Prefix:
    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [1, heads, len, dim]
    used: float = 0.0
    adapter: str | None = None  # the LoRA adapter whose weights computed these keys and values


class PrefixCache:
    """Key/value caches of shared prompt prefixes, least recently used dropped first beyond `max_tokens`;
    also remembers the token ids of recent prompts, to see what a new one shares with them. Keyed by
    adapter too: keys and values computed under one LoRA adapter are never another's."""

    def __init__(self, max_tokens: int, remember: int = 32):
        self.max_tokens = max_tokens
        self.entries: list[Prefix] = []
        self.recent: collections.deque[tuple[str | None, list[int]]] = collections.deque(maxlen=remember)
        self.hits = 0

    def lookup(self, ids: list[int], adapter: str | None = None, count: bool = True) -> tuple[Prefix | None, int]:
        """The cached prefix sharing the most leading tokens with `ids` (at least MIN_PREFIX, leaving one
        token to prefill) and how many it shares: a prefix of a cached prefix is a cut of its columns."""
        best, best_shared = None, 0
        for entry in self.entries:
            if entry.adapter != adapter:
                continue
            shared = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if shared >= MIN_PREFIX and shared > best_shared:
                best, best_shared = entry, shared
        if count:
            if best is not None:
                best.used = time.monotonic()
                self.hits += 1
            self.recent.append((adapter, ids))
        return best, best_shared

    def shared_length(self, ids: list[int], others: list[list[int]], adapter: str | None = None) -> int:
        """The longest prefix `ids` shares with one of `others` or a recent prompt of the same adapter (never
        all of `ids`)."""
        recent = [other for used, other in self.recent if used == adapter]
        longest = max((common_prefix(ids, other) for other in [*others, *recent] if other is not ids), default=0)
        return min(longest, len(ids) - 1)

    def add(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]],
            adapter: str | None = None) -> Prefix | None:
        if len(ids) > self.max_tokens:
            return None
        entry = Prefix(tuple(ids), layers, time.monotonic(), adapter)
        self.entries.append(entry)
        while sum(len(e.ids) for e in self.entries) > self.max_tokens:
            self.entries.remove(min(self.entries, key=lambda e: e.used))
        return entry if entry in self.entries else None


def _concat_rows(batch: Any, valid: torch.Tensor, new: Any, new_valid: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Append the rows of cache `new` to cache `batch`, left-padding the shorter one with zeros (columns
    marked not valid)."""
    width, new_width = batch.get_seq_length(), new.get_seq_length()
    for layer, new_layer in zip(batch.layers, new.layers):
        for attr in ("keys", "values"):
            a, b = getattr(layer, attr), getattr(new_layer, attr)
            if new_width < width:
                b = torch.nn.functional.pad(b, (0, 0, width - new_width, 0))
            elif width < new_width:
                a = torch.nn.functional.pad(a, (0, 0, new_width - width, 0))
            setattr(layer, attr, torch.cat([a, b], dim=0))
    if new_width < width:
        new_valid = torch.nn.functional.pad(new_valid, (width - new_width, 0), value=False)
    elif width < new_width:
        valid = torch.nn.functional.pad(valid, (new_width - width, 0), value=False)
    return batch, torch.cat([valid, new_valid], dim=0)
