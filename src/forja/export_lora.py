"""A trained LoRA version → a GGUF LoRA adapter, which llama.cpp applies on its base's GGUF at run time
(`llama_adapter_lora_init`): the llama.cpp backend serves several assistants of one base on one copy of
its weights. `forja serve` writes it when it first serves the version (cached by fingerprint).

The file is what llama.cpp's adapter loader reads: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and for each adapted weight `<its GGUF name>.lora_a` [r, in] and `.lora_b` [out, r]
(PEFT's own shapes; llama.cpp scales B·A by alpha / r, as PEFT does). Rows of q and k are reordered as the
base's GGUF reorders them for llama.cpp's rotary layout, so B·A adds to the weight the file holds.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from forja import models
from forja.config import ForjaError, Settings


class LoraExportError(ForjaError):
    """A LoRA version that cannot be written as a GGUF adapter; one line for the user."""


def lora_cache_path(settings: Settings, name: str) -> Path:
    tag = models.fingerprint(name, settings).split("@")[1]
    stem = re.sub(r"[^\w.-]+", "_", name)
    return settings.cache_dir / "gguf" / f"{stem}-{tag}-lora-f32.gguf"


def served_lora_gguf(settings: Settings, name: str) -> Path:
    """The GGUF adapter the llama.cpp backend loads for the LoRA version `name`, written once (cached)."""
    path = lora_cache_path(settings, name)
    if not path.is_file():
        export_lora_gguf(settings, name, path)
    return path


def export_lora_gguf(settings: Settings, name: str, out: Path) -> Path:
    """Write the adapter of LoRA version `name` as a GGUF LoRA adapter at `out` (float32: it is small)."""
    directory = models.version_dir(settings, name)
    if directory is None or not (directory / "adapter_config.json").is_file():
        raise LoraExportError(f"{name} is not a trained LoRA version (no adapter_config.json in its directory)")
    base = models.read_version(directory).get("base")
    if not base:
        raise LoraExportError(f"{directory / models.VERSION_FILE} names no base model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        write_lora_gguf(directory, base_config(settings, base), tmp, name=name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def base_config(settings: Settings, base: str) -> Any:
    """The transformers config of a base model, without loading its weights."""
    from transformers import AutoConfig

    ref = models.resolve(base, settings)
    if ref.kind == "hub":
        return AutoConfig.from_pretrained(ref.name, local_files_only=True)
    directory = ref.path if ref.kind == "version" else models.local_dir(ref, settings)
    return AutoConfig.from_pretrained(str(directory))


def lora_scaling(config: dict[str, Any]) -> float:
    """PEFT's multiplier of B·A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def write_lora_gguf(adapter_dir: Path, config: Any, path: Path, *, name: str = "") -> None:
    """PEFT adapter files (adapter_config.json, adapter_model.safetensors) of a Llama model → one GGUF adapter."""
    import gguf
    from safetensors.torch import load_file

    if config.model_type != "llama":
        raise LoraExportError(f"{adapter_dir}: a {config.model_type!r} base; GGUF adapters are written for "
                              "Llama-architecture models (SmolLM, Llama, Mistral-style)")
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern") or adapter.get("use_dora") \
            or adapter.get("modules_to_save"):
        raise LoraExportError(f"{adapter_dir}: per-layer ranks, DoRA or modules_to_save have no GGUF adapter form")
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoraExportError(f"{weights_file} is missing; retrain the version")
    weights = load_file(str(weights_file))
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name or adapter_dir.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp multiplies B·A by alpha / r (r read from the tensors): this alpha gives PEFT's scaling
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_scaling(adapter) * adapter["r"]))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise LoraExportError(f"{weights_file}: unexpected tensor {key}")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    for module, pair in sorted(pairs.items()):
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or set(pair) != {"A", "B"}:
            raise LoraExportError(f"{weights_file}: no GGUF weight for the adapter of {module}")
        a, b = pair["A"].float(), pair["B"].float()
        if module.endswith("self_attn.q_proj"):
            b = interleave_heads(b, config.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            b = interleave_heads(b, config.num_key_value_heads)
        writer.add_tensor(f"{target}.lora_a", a.contiguous().numpy())
        writer.add_tensor(f"{target}.lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def interleave_heads(rows: Any, heads: int) -> Any:
    """The rows of a q or k projection (or of its LoRA B) in llama.cpp's rotary order: each head's two
    halves [x0..x(d/2-1), y0..] become interleaved pairs [x0, y0, x1, y1, ...], as in the base's GGUF."""
    count, cols = rows.shape
    return rows.reshape(heads, 2, count // heads // 2, cols).transpose(1, 2).reshape(count, cols)
