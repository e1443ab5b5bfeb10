"""One system prompt everywhere: a question reaches the model as the same tokens in training, through the
server's request path, in evaluation and from the exported Ollama Modelfile and GGUF template."""

import asyncio
import json
import re
import shutil

import gguf
import httpx
import pytest
from typer.testing import CliRunner

from forja import evaluate as ev
from forja import models
from forja.cli import app
from forja.config import load_settings
from forja.evaluate import TestCase
from forja.export import export_gguf, write_modelfile
from forja.models import with_system
from forja.serve.app import create_app
from forja.train import IGNORE, dialogue_example

TRAINED = "Eres el panadero de Forja. Responde en español."
TEMPLATE_DEFAULT = "You are a helpful assistant."  # what conftest's ChatML template puts in without a system turn
QUESTION, ANSWER = "¿A qué hora abrís?", "De 7 a 14 h."


def make_version(settings, source, name, system):
    target = settings.versions_dir / name
    shutil.copytree(source, target)
    (target / "version.json").write_text(json.dumps({"name": name, "base": str(source), "method": "full",
                                                     "system": system}))


@pytest.fixture(scope="module")
def home(tiny_model_dir, tmp_path_factory, start_server):
    """Two versions of the tiny model, one trained with a system prompt and one with the template's default,
    a persona on the first; the first is active, and a server that follows the registry answers for all."""
    settings = load_settings(home=tmp_path_factory.mktemp("system-home"), model=str(tiny_model_dir),
                             serve={"personas": [{"name": "tienda", "system": "Eres la tienda.", "model": "v-system"}]})
    make_version(settings, tiny_model_dir, "v-system", TRAINED)
    make_version(settings, tiny_model_dir, "v-default", None)
    models.promote(settings, "v-system")
    server = start_server(create_app(settings))
    return settings, server


def trained_prompt(tokenizer, system):
    """The ids training puts before the answer it learns: the row with the system turn put in, rendered
    and labelled by train.dialogue_example."""
    row = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    example = dialogue_example(tokenizer, with_system(row, system))
    first_learned = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    return example.input_ids[:first_learned]


def render_ollama(template, messages):
    """What Ollama renders from the Go template for these messages: `.System` is the system messages joined,
    `.Messages` all of them. Knows only the actions CHATML_TEMPLATE uses (if, range, end, ne, fields) and `{{-`."""
    root: list = []
    stack = [root]
    end = 0
    for action in re.finditer(r"\{\{(-?)\s*(.*?)\s*\}\}", template, re.S):
        text = template[end:action.start()]
        stack[-1].append(text.rstrip() if action.group(1) else text)
        end = action.end()
        words = action.group(2)
        if words == "end":
            stack.pop()
        elif words.startswith(("if ", "range ")):
            stack[-1].append((words, []))
            stack.append(stack[-1][-1][1])
        else:
            stack[-1].append((words, None))
    stack[-1].append(template[end:])

    def run(nodes, dot):
        out = ""
        for node in nodes:
            if isinstance(node, str):
                out += node
                continue
            words, body = node
            if body is None:
                out += dot[words.removeprefix(".")]
            elif words.startswith("range "):
                out += "".join(run(body, item) for item in dot[words.split()[1].removeprefix(".")])
            elif words.startswith("if ne "):
                field, value = words.split()[2:]
                out += run(body, dot) if dot[field.removeprefix(".")] != json.loads(value) else ""
            elif dot[words.split()[1].removeprefix(".")]:
                out += run(body, dot)
        return out

    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return run(root, {"System": system, "Messages": turns})


def ollama_prompt(settings, name, tokenizer, tmp_path):
    """The Modelfile's SYSTEM, and the ids Ollama gives the model for the question (it puts SYSTEM first
    when the client sends no system message)."""
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    text = write_modelfile(settings, gguf_file, name).read_text()
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    rendered = render_ollama(template, [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])
    return system, tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name, system", [("v-system", TRAINED), ("v-default", None)])
def test_a_question_is_prompted_alike_in_training_serving_eval_and_the_modelfile(home, name, system, tmp_path):
    settings, server = home
    state = server.app.state.forja
    # the request path: the active version when the request names no model, else the version named
    target = asyncio.run(state.target(None if name == "v-system" else name))
    assert target.engine.name == name
    tokenizer = target.engine.tokenizer
    prompts = {"training": trained_prompt(tokenizer, system)}
    prompts["serving"] = target.engine.tokenize(target.messages([{"role": "user", "content": QUESTION}]))
    [evaluated] = ev._targets([name], settings)
    prompts["evaluation"] = target.engine.tokenize(ev._conversation(TestCase(QUESTION, ANSWER), evaluated, {}, settings))
    modelfile_system, prompts["ollama"] = ollama_prompt(settings, name, tokenizer, tmp_path)

    texts = {place: tokenizer.decode(ids) for place, ids in prompts.items()}
    assert len(set(texts.values())) == 1, texts
    assert len({tuple(ids) for ids in prompts.values()}) == 1
    assert f"<|im_start|>system\n{system or TEMPLATE_DEFAULT}<|im_end|>" in texts["training"]
    assert modelfile_system == (system or TEMPLATE_DEFAULT)  # without one, the template's own default text
    # and over HTTP the server counts exactly those tokens
    reply = httpx.post(server.url + "/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1}).json()
    assert reply["usage"]["prompt_tokens"] == len(prompts["training"])


def test_a_client_or_persona_system_prompt_replaces_the_trained_one(home):
    state = home[1].app.state.forja
    question = [{"role": "user", "content": QUESTION}]
    own = [{"role": "system", "content": "Sé breve."}, *question]
    assert asyncio.run(state.target("v-system")).messages(own) == own
    assert asyncio.run(state.target("tienda")).messages(question)[0] == {"role": "system", "content": "Eres la tienda."}


def test_exported_gguf_template_defaults_to_the_trained_system_prompt(home, tmp_path):
    settings, server = home
    tokenizer = models.load_tokenizer("v-system", settings)
    path = export_gguf(settings, "v-system", "f32", tmp_path / "v.gguf")
    template = gguf.GGUFReader(str(path)).get_field("tokenizer.chat_template").contents()
    question = [{"role": "user", "content": QUESTION}]
    rendered = tokenizer.apply_chat_template(question, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == trained_prompt(tokenizer, TRAINED)
    own = [{"role": "system", "content": "Sé breve."}, *question]  # a client's own system prompt still wins
    assert (tokenizer.apply_chat_template(own, chat_template=template, tokenize=False)
            == tokenizer.apply_chat_template(own, tokenize=False))


def test_forja_generate_prompts_a_version_with_its_trained_system(home, monkeypatch):
    settings, _ = home
    monkeypatch.setenv("FORJA_HOME", str(settings.home))
    result = CliRunner().invoke(app, ["generate", QUESTION, "--model", "v-system", "--max-new-tokens", "1", "--json"])
    assert result.exit_code == 0, result.output
    tokenizer = models.load_tokenizer("v-system", settings)
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] == len(trained_prompt(tokenizer, TRAINED))
