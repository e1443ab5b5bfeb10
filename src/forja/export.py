"""Model versions → files other tools run: GGUF for llama.cpp / Ollama / LM Studio, quantized with
llama.cpp's own quantizer, an Ollama Modelfile, and a merged Hugging Face directory (vLLM, TGI, SGLang).

The GGUF is written from the version's merged weights with the `gguf` package's writer and its
tensor-name table (HF `model.layers.3.self_attn.q_proj` → `blk.3.attn_q`), so the file carries the
tokenizer, the chat template and the end-of-turn token and stops where the PyTorch version stops.
A version trained with a system prompt gets it as its template's default, in the GGUF and the Modelfile.
Exports are cached under FORJA_HOME/cache/gguf by the version's fingerprint: serving a version with
the llama.cpp backend exports it once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from forja import models
from forja.config import ForjaError, Settings

# what `--quant` accepts → llama.cpp's file type (None: written directly by the gguf writer)
QUANTS: dict[str, str | None] = {
    "f32": None,
    "f16": None,
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
META_SUFFIX = ".json"  # next to every exported file: what it was made from, and how well it agrees


class ExportError(ForjaError):
    """A model that cannot be exported as asked; one line for the user."""


def cache_path(settings: Settings, name: str, quant: str) -> Path:
    tag = models.fingerprint(name, settings).split("@")[1]
    stem = re.sub(r"[^\w.-]+", "_", Path(name).name.removesuffix(".gguf"))
    return settings.cache_dir / "gguf" / f"{stem}-{tag}-{quant}.gguf"


def gguf_source(settings: Settings, kind: str) -> str:
    """serve.gguf_source for a model of this kind: auto exports the bundled model and keeps a .gguf you name."""
    source = settings.serve.gguf_source
    return source if source != "auto" else "export" if kind == "bundled" else "original"


def served_gguf(settings: Settings, name: str, quant: str) -> Path:
    """The GGUF file the llama.cpp backend serves for a model reference: a .gguf as it is unless
    serve.gguf_source says to export it (gguf_source), anything else exported (once, cached) at `quant`."""
    ref = models.resolve(name, settings)
    if ref.kind in ("bundled", "gguf") and gguf_source(settings, ref.kind) == "original":
        assert ref.path is not None
        return ref.path
    path = cache_path(settings, name, quant)
    if not path.is_file():
        export_gguf(settings, name, quant, path)
    return path


def export_gguf(settings: Settings, name: str, quant: str = "q8_0", out: Path | None = None) -> Path:
    """Write `name` (a LoRA version is merged first) as a GGUF file at `quant`; returns its path."""
    if quant not in QUANTS:
        raise ExportError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    out = Path(out) if out is not None else cache_path(settings, name, quant)
    loaded = models.load(name, settings, dtype="float32", merge_adapter=True)
    config = loaded.model.config
    if config.model_type != "llama":
        raise ExportError(f"{name} is a {config.model_type!r} model; GGUF export supports Llama-architecture models "
                          "(SmolLM, Llama, Mistral-style) for now")
    out.parent.mkdir(parents=True, exist_ok=True)
    float_path = out if QUANTS[quant] is None else out.with_name(out.name + ".f16.tmp")
    tmp = float_path.with_name(float_path.name + ".part")
    try:
        write_gguf(loaded, tmp, f32=quant == "f32", tokenizer_pre=_source_pre(name, settings),
                   system=models.trained_system(settings, name))
        os.replace(tmp, float_path)
        if QUANTS[quant] is not None:
            quantize(float_path, out, quant)
    finally:
        tmp.unlink(missing_ok=True)
        if float_path != out:
            float_path.unlink(missing_ok=True)
    meta = {"model": name, "fingerprint": models.fingerprint(name, settings), "quant": quant,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bytes": out.stat().st_size}
    Path(str(out) + META_SUFFIX).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def export_hf(settings: Settings, name: str, out: Path) -> Path:
    """`name` as a Hugging Face directory (safetensors, config, tokenizer, chat template), a LoRA version
    merged into its base, for servers that load those (`vllm serve DIR`). A version trained with a system
    prompt gets it as its template's default, as in the GGUF. Float32, as trained on a CPU: a server casts it
    (vLLM's --dtype)."""
    loaded = models.load(name, settings, dtype="float32", merge_adapter=True)
    system = models.trained_system(settings, name)
    if system and loaded.tokenizer.chat_template:
        loaded.tokenizer.chat_template = template_with_system(loaded.tokenizer.chat_template, system)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def write_gguf(loaded: models.LoadedModel, path: Path, *, f32: bool = False, tokenizer_pre: str = "gpt-2",
               system: str | None = None) -> None:
    """Architecture, tokenizer and tensors of a Llama model in transformers' layout → one GGUF file;
    `system` (the version's trained system prompt) becomes the chat template's default."""
    import gguf
    import numpy as np
    import torch

    config, tokenizer = loaded.model.config, loaded.tokenizer
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(loaded.ref.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre, system)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = loaded.model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses the embedding matrix as the output layer when there is none
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}; this Llama variant is not supported")
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            data = _rope_layout(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _rope_layout(data, config.num_key_value_heads)
        array = data.numpy()
        if array.ndim > 1 and not f32:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_layout(weight: Any, heads: int) -> Any:
    """transformers rotates the two halves of each head; llama.cpp rotates interleaved pairs: reorder
    each head's rows from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...]."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str, system: str | None) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM and Llama 3 use) with its specials and template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_eot_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            setter(int(token_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        template = tokenizer.chat_template
        writer.add_chat_template(template if system is None else template_with_system(template, system))


def template_with_system(template: str, system: str) -> str:
    """A Jinja chat template that puts `system` first in a conversation that starts without a system turn,
    as training did (`models.with_system`), instead of the template's own default: clients that render
    the GGUF's template and send no system message prompt the model as it was trained."""
    literal = json.dumps(system, ensure_ascii=False)  # a JSON string is also a Jinja string literal
    return ("{%- if messages and messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)


def _source_pre(name: str, settings: Settings) -> str:
    """The pre-tokenizer of the GGUF the model came from (e.g. "smollm"), followed through versions."""
    import gguf

    seen = set()
    while name not in seen:
        seen.add(name)
        ref = models.resolve(name, settings)
        if ref.kind in ("bundled", "gguf") and ref.path is not None:
            field = gguf.GGUFReader(str(ref.path)).get_field("tokenizer.ggml.pre")
            return str(field.contents()) if field is not None else "gpt-2"
        if ref.kind != "version" or ref.path is None:
            return "gpt-2"
        name = models.read_version(ref.path).get("base", "")
    return "gpt-2"


def quantize(source: Path, out: Path, quant: str) -> None:
    """llama.cpp's own quantizer (through llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("quantizing needs llama-cpp-python (installed by `make install`); "
                          "or export with --quant f16") from None
    from forja.engine.llamacpp import route_llama_log

    route_llama_log()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])  # type: ignore[arg-type]
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(out.name + ".part")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp could not quantize {source.name} to {quant} (status {status})")
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------------ fidelity

AGREEMENT_PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a bakery in Madrid.",
    "¿Qué es una panadería?",
    "Explain how rain forms.",
    "Dame tres consejos para dormir mejor.",
    "What is 12 times 12?",
]


def agreement(settings: Settings, name: str, gguf_file: Path, tokens: int = 32) -> dict[str, Any]:
    """Greedy answers of the GGUF under llama.cpp against the PyTorch model (float32) on fixed prompts:
    how many are identical over `tokens` tokens, and the mean share of each answer that agrees.
    Written next to the file, so `forja models` shows it."""
    from forja.engine import SamplingParams, answer_all
    from forja.engine.llamacpp import LlamaCppEngine
    from forja.engine.pytorch import PyTorchEngine
    from forja.engine.text import chat_messages

    params = SamplingParams(max_new_tokens=tokens)
    prompts = [chat_messages(p) for p in AGREEMENT_PROMPTS]
    # one prompt at a time on both sides, each prefilled whole, the PyTorch weights as loaded (not packed for
    # oneDNN): what is measured is the file, not how a batch, a cached prefix or a kernel rounds
    reference_engine = PyTorchEngine(models.load(name, settings, dtype="float32"), max_batch_size=1,
                                     max_queue=len(prompts), pack=False, prefix_tokens=0)
    try:
        reference = [a.text for a in answer_all(reference_engine, prompts, params)]
        tokenizer = reference_engine.tokenizer
    finally:
        reference_engine.close()
    engine = LlamaCppEngine(gguf_file, tokenizer, name=gguf_file.name, max_batch_size=1, kv_tokens=4096,
                            threads=settings.threads, max_queue=len(prompts))
    try:
        answers = [a.text for a in answer_all(engine, prompts, params)]
    finally:
        engine.close()
    shares = []
    for ours, theirs in zip(answers, reference):
        common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        shares.append(common / max(len(theirs), 1) if ours != theirs else 1.0)
    result = {"prompts": len(AGREEMENT_PROMPTS), "tokens": tokens, "identical": sum(s == 1.0 for s in shares),
              "mean_agreeing_share": round(sum(shares) / len(shares), 3)}
    meta_file = Path(str(gguf_file) + META_SUFFIX)
    if not meta_file.is_file():  # a file forja did not write (the bundled GGUF): its record goes in the cache
        meta_file = settings.cache_dir / "gguf" / f"{gguf_file.stem}-original.gguf{META_SUFFIX}"
        meta_file.parent.mkdir(parents=True, exist_ok=True)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {
        "model": name, "quant": "original", "file": str(gguf_file), "bytes": gguf_file.stat().st_size}
    meta["agreement"] = result
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ Ollama

# Ollama passes system messages both joined in .System and among .Messages: the loop skips them.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""
SYSTEM_MARK = "FORJA-SYSTEM-PROMPT"  # stands for a system turn when reading a template's default off it


def template_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template puts in when a conversation has none: what its rendering of
    one user turn holds where a given system turn would be. None when it puts none in."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)  # noqa: E731
    user = {"role": "user", "content": "Hola"}
    head, found, tail = render([{"role": "system", "content": SYSTEM_MARK}, user]).partition(SYSTEM_MARK)
    plain = render([user])
    if not found or len(plain) <= len(head) + len(tail) or not (plain.startswith(head) and plain.endswith(tail)):
        return None
    return plain[len(head):len(plain) - len(tail)]


def write_modelfile(settings: Settings, gguf_file: Path, name: str, persona: str | None = None) -> Path:
    """An Ollama Modelfile next to the GGUF: the chat template, its stop tokens, sampling and the system
    prompt (`ollama create NAME -f Modelfile`). Ollama adds a system turn only from SYSTEM, so SYSTEM is
    the persona's system prompt, else the version's trained one, else generate.system, else the one the
    chat template puts in by default (no SYSTEM where it puts none)."""
    loaded_tokenizer = models.load_tokenizer(name, settings) if models.resolve(name, settings).kind != "gguf" else None
    template = getattr(loaded_tokenizer, "chat_template", "") or ""
    if "<|im_start|>" not in template and loaded_tokenizer is not None:
        raise ExportError(f"{name}'s chat template is not ChatML; write the Ollama TEMPLATE by hand")
    chosen = None
    if persona:
        chosen = next((p for p in settings.serve.personas if p.name == persona), None)
        if chosen is None:
            known = ", ".join(p.name for p in settings.serve.personas) or "none configured"
            raise ExportError(f"no persona {persona!r} in the config (personas: {known})")
    defaults = settings.generate
    lines = [f"# Made by forja from {name}", f"FROM ./{gguf_file.name}", f'TEMPLATE """{CHATML_TEMPLATE}"""',
             'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"',
             f"PARAMETER temperature {chosen.temperature if chosen and chosen.temperature is not None else defaults.temperature}",
             f"PARAMETER top_p {chosen.top_p if chosen and chosen.top_p is not None else defaults.top_p}",
             f"PARAMETER num_predict {chosen.max_tokens if chosen and chosen.max_tokens else defaults.max_new_tokens}"]
    system = ((chosen.system if chosen else None) or models.trained_system(settings, name) or defaults.system
              or template_system(loaded_tokenizer))
    if system:
        lines.append('SYSTEM """' + system.replace('"""', "'''") + '"""')
    path = gguf_file.with_name("Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def export(settings: Settings, name: str, fmt: str, quant: str, out_dir: Path, persona: str | None = None) -> list[Path]:
    """`forja export`: the GGUF (and for `ollama` its Modelfile), or the merged `hf` directory, in out_dir."""
    if fmt not in ("gguf", "ollama", "hf"):
        raise ExportError(f"unknown format {fmt!r}; choose gguf, ollama or hf")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", Path(name).name.removesuffix(".gguf"))
    if fmt == "hf":
        return [export_hf(settings, name, out_dir / stem)]
    target = out_dir / f"{stem}-{quant}.gguf"
    cached = cache_path(settings, name, quant)
    if not cached.is_file():
        export_gguf(settings, name, quant, cached)
    shutil.copy(cached, target)
    written = [target]
    if fmt == "ollama":
        written.append(write_modelfile(settings, target, name, persona))
    return written
