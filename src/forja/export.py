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
import sys
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


def export_hf(settings: Settings, name: str, out: Path, *, card: bool = True, evaluation: dict[str, Any] | None = None,
              gate: dict[str, Any] | None = None) -> Path:
    """`name` as a Hugging Face directory (safetensors, config, generation_config.json, tokenizer, chat template),
    a LoRA version merged into its base, for servers that load those (`vllm serve DIR`) and the hub; with
    `card`, a README.md model card (model_card). A version trained with a system prompt gets it as its
    template's default, as in the GGUF. Float32, as trained on a CPU: a server casts it (vLLM's --dtype)."""
    loaded = models.load(name, settings, dtype="float32", merge_adapter=True)
    system = models.trained_system(settings, name)
    if system and loaded.tokenizer.chat_template:
        loaded.tokenizer.chat_template = template_with_system(loaded.tokenizer.chat_template, system)
    generation = loaded.model.generation_config
    # the end of the turn stops generation in transformers' generate and in vLLM, as in forja
    generation.eos_token_id = sorted(loaded.eos_token_ids) if len(loaded.eos_token_ids) > 1 else loaded.tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = loaded.tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    generation.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    if card:
        (tmp / "README.md").write_text(model_card(settings, name, evaluation, gate), encoding="utf-8")
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


# ------------------------------------------------------------------------------------------------ Hugging Face

LICENSES = {"smollm2-135m": "apache-2.0"}  # the bundled models' licenses (their model cards)


def base_model_id(settings: Settings, name: str) -> str:
    """The hub id (or local name) a version was trained from, followed through versions to the first model."""
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        ref = models.resolve(name, settings)
        if ref.kind == "bundled":
            return models.BUNDLED[name][2]
        if ref.kind != "version" or ref.path is None:
            return name if ref.kind == "hub" else Path(name).name
        name = models.read_version(ref.path).get("base", name)
    return name


def model_card(settings: Settings, name: str, evaluation: dict[str, Any] | None = None,
               gate: dict[str, Any] | None = None) -> str:
    """README.md of an HF directory: front matter (base model, license, datasets by hash) and what is known of
    the version: how it was trained, its eval table and gate result when a pipeline measured them."""
    import yaml

    root = name
    while (path := models.version_dir(settings, root)) is not None:
        root = models.read_version(path).get("base", root)
        if root == name:
            break
    version = models.version_dir(settings, name)
    meta = models.read_version(version) if version is not None else {}
    front: dict[str, Any] = {"base_model": base_model_id(settings, name), "license": LICENSES.get(root, "other"),
                             "library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": ["forja", *([meta["method"]] if meta.get("method") else [])]}
    if meta.get("data_hash"):
        front["datasets"] = [f"sha256:{meta['data_hash']}"]  # private data: named by its content hash
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", ""]
    if meta:
        lines += [f"Fine-tuned with [forja](https://github.com/) from `{meta.get('base')}` ({meta.get('method')}), "
                  f"created {meta.get('created_at')}, forja {meta.get('forja_version')}.", ""]
        if meta.get("system"):
            lines += ["Trained with this system prompt (the chat template's default here):", "", f"> {meta['system']}", ""]
        numbers = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if numbers:
            lines += ["| training | value |", "|---|---|", *[f"| {k} | {v:.4g} |" for k, v in numbers.items()], ""]
    else:
        lines += [f"Exported by forja from `{name}`.", ""]
    if evaluation and evaluation.get("means"):
        lines += [f"## Evaluation ({evaluation.get('cases')} questions of {Path(str(evaluation.get('testset'))).name})", "",
                  "| metric | mean |", "|---|---|", *[f"| {m} | {v:.3f} |" for m, v in evaluation["means"].items()], ""]
    if gate is not None:
        checks = ", ".join(f"{m} ≥ {c['fail_under']:g}" for m, c in (gate.get("checks") or {}).items()) or "no thresholds"
        lines += [f"Gate: {'passed' if gate.get('passed') else 'failed'} ({checks}).", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("ORG/{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("ORG/{name}")', "```", "",
              f"or serve it: `vllm serve ORG/{name}` (OpenAI-compatible, /v1/chat/completions).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ cog (Replicate)

# predict.py of a cog package: it runs in Replicate's container, where forja is not installed, so it is written
# out whole here and loads the weights with transformers (or llama-cpp-python for a GGUF) itself.
COG_PREDICT = '''"""Replicate / cog predictor for __NAME__, written by `forja export --format cog`.

setup() loads the weights once; predict() answers one prompt, streaming the text as it is generated."""

import threading
from pathlib import Path

from cog import BasePredictor, ConcatenateIterator, Input

WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULTS = __DEFAULTS__  # the persona's system prompt and sampling, as forja served it


class Predictor(BasePredictor):
    def setup(self) -> None:
        gguf = sorted(WEIGHTS.glob("*.gguf"))
        if gguf:
            from llama_cpp import Llama

            self.llama = Llama(model_path=str(gguf[0]), n_ctx=0, verbose=False)  # 0: the context it was trained for
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.llama = None
        self.tokenizer = AutoTokenizer.from_pretrained(WEIGHTS)
        self.model = AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32).eval()

    def predict(
        self,
        prompt: str = Input(description="The user's message."),
        system: str = Input(description="System prompt (empty: the one the model was trained with).", default=""),
        max_tokens: int = Input(description="Most tokens in the answer.", default=DEFAULTS["max_tokens"], ge=1, le=4096),
        temperature: float = Input(description="0 answers greedily.", default=DEFAULTS["temperature"], ge=0.0, le=2.0),
        top_p: float = Input(description="Nucleus sampling mass.", default=DEFAULTS["top_p"], ge=0.01, le=1.0),
    ) -> ConcatenateIterator[str]:
        messages = [{"role": "system", "content": system or DEFAULTS["system"]}] if (system or DEFAULTS["system"]) else []
        messages.append({"role": "user", "content": prompt})
        if self.llama is not None:
            stream = self.llama.create_chat_completion(messages=messages, max_tokens=max_tokens, stream=True,
                                                       temperature=temperature, top_p=top_p)
            for chunk in stream:
                text = chunk["choices"][0]["delta"].get("content")
                if text:
                    yield text
            return
        import torch
        from transformers import TextIteratorStreamer

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        kwargs = {**ids, "max_new_tokens": max_tokens, "streamer": streamer, **sampling,
                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        worker = threading.Thread(target=lambda: torch.no_grad()(self.model.generate)(**kwargs))
        worker.start()
        for text in streamer:
            if text:
                yield text
        worker.join()
'''


def _pins(names: list[str]) -> list[str]:
    """name==installed version for each distribution, as this machine runs it."""
    import importlib.metadata

    pins = []
    for name in names:
        try:  # a local build tag (torch 2.13.0+cpu) is not on PyPI: the release it is a build of is
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            raise ExportError(f"{name} is not installed here, so its version cannot be pinned; install it "
                              "(make install) and export again") from None
    return pins


def _persona_defaults(settings: Settings, name: str, persona: str | None) -> dict[str, Any]:
    chosen = next((p for p in settings.serve.personas if p.name == persona), None) if persona else None
    if persona and chosen is None:
        known = ", ".join(p.name for p in settings.serve.personas) or "none configured"
        raise ExportError(f"no persona {persona!r} in the config (personas: {known})")
    defaults = settings.generate
    pick = lambda value, default: value if value is not None else default  # noqa: E731
    return {"system": (chosen.system if chosen else None) or models.trained_system(settings, name) or defaults.system or "",
            "temperature": pick(chosen.temperature if chosen else None, defaults.temperature),
            "top_p": pick(chosen.top_p if chosen else None, defaults.top_p),
            "max_tokens": pick(chosen.max_tokens if chosen else None, min(defaults.max_new_tokens, 4096))}


def export_cog(settings: Settings, name: str, out: Path, *, engine: str = "pytorch", quant: str = "q8_0",
               persona: str | None = None) -> list[Path]:
    """A cog directory (`cog predict`, `cog push r8.im/USER/NAME`): cog.yaml, predict.py, the weights (merged
    safetensors, or a GGUF for llama.cpp with engine "llamacpp") and a README with the steps."""
    if engine not in ("pytorch", "llamacpp"):
        raise ExportError(f"unknown engine {engine!r}; choose pytorch or llamacpp")
    defaults = _persona_defaults(settings, name, persona)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if engine == "llamacpp":
        (out / "weights").mkdir()
        cached = cache_path(settings, name, quant)
        if not cached.is_file():
            export_gguf(settings, name, quant, cached)
        shutil.copy(cached, out / "weights" / "model.gguf")
        requirements = _pins(["llama-cpp-python"])
        system_packages = ["build-essential"]  # llama-cpp-python compiles llama.cpp when no wheel fits
    else:
        export_hf(settings, name, out / "weights", card=False)
        requirements = _pins(["torch", "transformers", "tokenizers", "safetensors", "accelerate"])
        system_packages = ["libgomp1"]  # torch's OpenMP runtime
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    cog_yaml = ("# cog.yaml written by `forja export --format cog` (https://cog.run/yaml)\n"
                "build:\n  gpu: false  # true for a GPU machine on Replicate (then a CUDA build of torch is installed)\n"
                f'  python_version: "{sys.version_info.major}.{sys.version_info.minor}"\n'
                "  python_requirements: requirements.txt\n"
                "  system_packages:\n" + "".join(f'    - "{p}"\n' for p in system_packages) +
                'predict: "predict.py:Predictor"\n')
    (out / "cog.yaml").write_text(cog_yaml)
    predict = COG_PREDICT.replace("__NAME__", name).replace("__DEFAULTS__", repr(defaults))
    (out / "predict.py").write_text(predict, encoding="utf-8")
    readme = f"""# {name} on Replicate (cog)

Written by `forja export --format cog --model {name}`{' --engine llamacpp' if engine == 'llamacpp' else ''}.
`weights/` holds {'a ' + quant + ' GGUF run by llama.cpp' if engine == 'llamacpp' else 'the merged weights (safetensors)'};
`predict.py` loads them once in `setup()` and streams each answer.

Try it locally (needs Docker and [cog](https://cog.run)):

    cog predict -i prompt="¿A qué hora abrís?" -i max_tokens=64

Publish it (create the model at https://replicate.com/create first, then `cog login`):

    cog push r8.im/USER/{name.lower()}

and call it:

    curl -s -X POST https://api.replicate.com/v1/models/USER/{name.lower()}/predictions \\
      -H "Authorization: Bearer $REPLICATE_API_TOKEN" -H "Content-Type: application/json" \\
      -d '{{"input": {{"prompt": "Hola"}}}}'

Inputs: prompt, system (empty: `{defaults['system'][:60]}`), max_tokens ({defaults['max_tokens']}),
temperature ({defaults['temperature']}), top_p ({defaults['top_p']}).
Without Docker, cog's own server runs it as the container does:

    pip install -r requirements.txt cog=={COG_VERSION}
    COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=5000 python -m cog.server.http
    curl -s -X POST localhost:5000/predictions -H 'Content-Type: application/json' -d '{{"input": {{"prompt": "Hola"}}}}'
"""
    (out / "README.md").write_text(readme, encoding="utf-8")
    return [out]


COG_VERSION = "0.23.1"  # the cog SDK the package was tested with (tests/test_export.py runs its server)


def _installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ Docker

DOCKERFILE = """# forja serving {name}: written by `forja export --format docker`.
#   docker compose up          (or: docker build -t forja-{tag} . && docker run -p 8000:8000 forja-{tag})
# The version is baked in at /models/{stem} (merged weights); to mount it instead, drop the COPY of model/
# and mount the directory read-only at /models/{stem} (see compose.yaml).
# Environment (every setting of forja.yaml can be given as FORJA_SECTION__FIELD):
#   FORJA_HOME            database, caches, feedback (a volume: /data)
#   FORJA_CONFIG          the settings file (/app/forja.yaml: model, personas, host and port)
#   FORJA_DATABASE_URL    PostgreSQL instead of SQLite, e.g. postgresql+psycopg://forja:forja@db/forja
#   FORJA_THREADS         CPU threads for torch (default: torch decides)
#   FORJA_SERVE__API_KEYS keys clients must send (JSON list), else anyone who reaches the port is answered
FROM python:{python}-slim

ENV PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PYTHONPATH=/app \\
    FORJA_HOME=/data \\
    FORJA_CONFIG=/app/forja.yaml

RUN useradd --create-home --uid 1000 forja \\
    && mkdir -p /data \\
    && chown forja:forja /data

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY forja/ /app/forja/
COPY forja.yaml /app/forja.yaml
COPY model/ /models/{stem}/

USER 1000:1000
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \\
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "forja.cli"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
"""

COMPOSE = """# forja serving {stem}: `docker compose up` (add `--profile postgres` and/or `--profile monitoring`).
# written by `forja export --format docker`
services:
  forja:
    build: .
    image: forja-{tag}
    ports:
      - "8000:8000"
    environment:
      FORJA_THREADS: "2"
      # with --profile postgres:
      # FORJA_DATABASE_URL: postgresql+psycopg://forja:forja@db:5432/forja
    volumes:
      - forja-data:/data
      # the version mounted instead of baked in:
      # - ./model:/models/{stem}:ro
    restart: unless-stopped

  db:
    image: postgres:17-alpine
    profiles: ["postgres"]
    environment:
      POSTGRES_USER: forja
      POSTGRES_PASSWORD: forja
      POSTGRES_DB: forja
    volumes:
      - db-data:/var/lib/postgresql/data
    restart: unless-stopped

  prometheus:
    image: prom/prometheus:v3.5.0
    profiles: ["monitoring"]
    ports:
      - "9090:9090"
    volumes:
      - ./prometheus.yml:/etc/prometheus/prometheus.yml:ro
    restart: unless-stopped

volumes:
  forja-data:
  db-data:
"""

PROMETHEUS = """# scraped by the prometheus service of compose.yaml; with API keys set, add the admin key:
# authorization: {{credentials: YOUR_ADMIN_KEY}}
scrape_configs:
  - job_name: forja
    metrics_path: /metrics
    static_configs:
      - targets: ["forja:8000"]
"""

# forja's runtime dependencies that a serving container does not need (training, tests, llama.cpp's compiler)
NOT_IN_CONTAINER = {"llama-cpp-python"}


def export_docker(settings: Settings, name: str, out: Path, *, persona: str | None = None) -> list[Path]:
    """A Docker build directory serving `name` with forja: Dockerfile (slim Python, non-root user, the version
    baked in, HEALTHCHECK on /health), compose.yaml (optional PostgreSQL and Prometheus), forja's code and a
    pinned requirements.txt."""
    import importlib.metadata

    import yaml

    import forja

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    export_hf(settings, name, out / "model", card=False)
    shutil.copytree(Path(forja.__file__).resolve().parent, out / "forja",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wanted = [re.split(r"[=<>;\[ ]", r, maxsplit=1)[0] for r in importlib.metadata.requires("forja") or []
              if "extra ==" not in r]
    pins = _pins([w for w in wanted if w not in NOT_IN_CONTAINER] + (["psycopg", "psycopg-binary"] if _installed("psycopg") else []))
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    stem = re.sub(r"[^\w.-]+", "_", Path(name).name.removesuffix(".gguf"))
    served = f"/models/{stem}"
    config: dict[str, Any] = {"model": served, "serve": {"host": "0.0.0.0", "port": 8000, "backend": "pytorch"}}
    if persona:
        chosen = next((p for p in settings.serve.personas if p.name == persona), None)
        if chosen is None:
            raise ExportError(f"no persona {persona!r} in the config")
        config["serve"]["personas"] = [chosen.model_copy(update={"model": served}).model_dump(exclude_defaults=True)]
    elif models.trained_system(settings, name):
        config["generate"] = {"system": models.trained_system(settings, name)}
    (out / "forja.yaml").write_text("# the settings inside the container (FORJA_* variables override them)\n"
                                    + yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tag = re.sub(r"[^a-z0-9.-]+", "-", stem.lower()).strip("-.") or "model"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (out / "Dockerfile").write_text(DOCKERFILE.format(name=name, stem=stem, tag=tag, python=python))
    (out / "compose.yaml").write_text(COMPOSE.format(name=name, stem=stem, tag=tag))
    (out / "prometheus.yml").write_text(PROMETHEUS)
    (out / ".dockerignore").write_text("**/__pycache__\n*.pyc\n")
    return [out]


# ------------------------------------------------------------------------------------------------ systemd

SERVICE = """# forja serving on a VPS: written by `forja export --format systemd`.
# sudo cp forja.service forja-retrain.service forja-retrain.timer /etc/systemd/system/
# sudo systemctl daemon-reload && sudo systemctl enable --now forja.service forja-retrain.timer
[Unit]
Description=forja: the OpenAI-compatible server of {name}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
WorkingDirectory={home}
Environment=FORJA_HOME={home}
{config}
# serves the active version, following promotions (`forja models promote {name}` makes it this one)
ExecStart={python} -m forja.cli serve --host 127.0.0.1 --port {port}
Restart=on-failure
RestartSec=5
NoNewPrivileges=true
ProtectSystem=strict
ReadWritePaths={home}
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""

RETRAIN_SERVICE = """# Retrain from the week's feedback: the new version is promoted only when it passes the gate, and the one
# before stays in FORJA_HOME (roll back with `forja models rollback`); `forja gc` keeps every version in the
# active history. Started by forja-retrain.timer; run it by hand with `systemctl start forja-retrain`.
[Unit]
Description=forja: retrain {name}'s successor from feedback
After=network-online.target

[Service]
Type=oneshot
User={user}
WorkingDirectory={home}
Environment=FORJA_HOME={home}
{config}
ExecStart={python} -m forja.cli train --from-feedback --quiet
# a server following the active version switches at its next request; nothing to restart
SuccessExitStatus=2
Nice=10
"""

RETRAIN_TIMER = """[Unit]
Description=forja: retrain from feedback every week

[Timer]
OnCalendar=weekly
RandomizedDelaySec=1h
Persistent=true

[Install]
WantedBy=timers.target
"""


def export_systemd(settings: Settings, name: str, out: Path, *, user: str = "forja") -> list[Path]:
    """forja.service (`forja serve` on the active version), and forja-retrain.service with a weekly timer that
    retrains from feedback (`forja train --from-feedback`, promoted only past the gate)."""
    out.mkdir(parents=True, exist_ok=True)
    from forja.config import config_path

    config = config_path()
    values = {"name": name, "user": user, "home": settings.home.resolve(), "python": sys.executable,
              "port": settings.serve.port,
              "config": f"Environment=FORJA_CONFIG={config.resolve()}" if config else "# Environment=FORJA_CONFIG=/etc/forja/forja.yaml"}
    written = []
    for file, text in (("forja.service", SERVICE), ("forja-retrain.service", RETRAIN_SERVICE),
                       ("forja-retrain.timer", RETRAIN_TIMER)):
        (out / file).write_text(text.format(**values))
        written.append(out / file)
    return written


# ------------------------------------------------------------------------------------------------ the verb

FORMATS = ("gguf", "ollama", "hf", "cog", "docker", "systemd")


def export(settings: Settings, name: str, fmt: str, quant: str, out_dir: Path, persona: str | None = None, *,
           engine: str = "pytorch", evaluation: dict[str, Any] | None = None,
           gate: dict[str, Any] | None = None) -> list[Path]:
    """`forja export`: the GGUF (and for `ollama` its Modelfile), the merged `hf` directory with its model card,
    or a deployment package (cog, docker, systemd) in out_dir; `all` writes every one."""
    if fmt == "all":
        return [path for each in FORMATS
                for path in export(settings, name, each, quant, out_dir, persona, engine=engine, evaluation=evaluation, gate=gate)]
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]} (or all)")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", Path(name).name.removesuffix(".gguf"))
    if fmt == "hf":
        return [export_hf(settings, name, out_dir / stem, evaluation=evaluation, gate=gate)]
    if fmt in PACKAGES:
        return package(settings, name, fmt, out_dir / fmt, persona=persona, engine=engine, quant=quant)
    target = out_dir / f"{stem}-{quant}.gguf"
    cached = cache_path(settings, name, quant)
    if not cached.is_file():
        export_gguf(settings, name, quant, cached)
    shutil.copy(cached, target)
    written = [target]
    if fmt == "ollama":
        written.append(write_modelfile(settings, target, name, persona))
    return written


PACKAGES = ("cog", "docker", "systemd")


def package(settings: Settings, name: str, fmt: str, out: Path, *, persona: str | None = None,
            engine: str = "pytorch", quant: str = "q8_0") -> list[Path]:
    """A deployment package of `name` in `out`: cog, docker or systemd."""
    if fmt == "cog":
        return export_cog(settings, name, out, engine=engine, quant=quant, persona=persona)
    if fmt == "docker":
        return export_docker(settings, name, out, persona=persona)
    if fmt == "systemd":
        return export_systemd(settings, name, out)
    raise ExportError(f"unknown package {fmt!r}; choose {', '.join(PACKAGES)}")


# ------------------------------------------------------------------------------------------------ the hub

HUB_CHECK_SECONDS = 5.0  # an unreachable hub is reported this soon, before anything is exported


def push_to_hub(settings: Settings, name: str, target: str, *, private: bool = True,
                log: Any = lambda line: None) -> str:
    """`forja push NAME --to hub:ORG/REPO`: the HF directory of `name` (with its model card) uploaded with
    huggingface_hub; an unreachable hub or a missing token fails at once, in one line. Returns the repo's URL."""
    import httpx

    repo = target.removeprefix("hub:")
    if not target.startswith("hub:") or not models.HUB_ID.match(repo):
        raise ExportError(f"--to {target!r}: write hub:ORG/REPO (a Hugging Face model repository)")
    models.resolve(name, settings)
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    try:
        httpx.head(endpoint, timeout=HUB_CHECK_SECONDS)
    except httpx.HTTPError as exc:
        raise ExportError(f"the Hugging Face hub at {endpoint} cannot be reached ({type(exc).__name__}: {exc}); "
                          "check the network (or HF_ENDPOINT) and push again") from None
    token = get_token()
    if not token:
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    folder = settings.cache_dir / "push" / re.sub(r"[^\w.-]+", "_", name)
    log(f"exporting {name} to {folder}")
    export_hf(settings, name, folder)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        log(f"uploading {_dir_mib(folder):.0f} MiB to {repo}")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message=f"forja push {name}")
    except HfHubHTTPError as exc:
        raise ExportError(f"the hub refused the upload to {repo}: {str(exc).splitlines()[0]}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return f"{endpoint}/{repo}"


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
