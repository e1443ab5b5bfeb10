"""The feedback loop: exchanges and feedback stored durably, exported as training pairs, a retrain from
the active version that is promoted only when it does not regress, promote and rollback by hand."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from forja import models
from forja.cli import app
from forja.config import TrainSettings, load_settings
from forja.feedback import collect_pairs, export, write_training_file
from forja.serve.app import create_app
from forja.store import Store

runner = CliRunner()
ADMIN_KEY = "admin-key-0123456789abcdef"
USER_KEY = "user-key-0123456789abcdef"


def chat(url: str, question: str, key: str | None = None, **extra) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, **extra}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def log(store: Store, exchange_id: str, question: str, answer: str, model: str = "m", before: list | None = None) -> None:
    """Store an exchange: `question` answered with `answer`, after the conversation `before`."""
    store.log_exchange(id=exchange_id, route="chat", model=model, persona=None,
                       messages=[*(before or []), {"role": "user", "content": question}], answers=[answer], params={},
                       prompt_tokens=5, completion_tokens=3, latency_ms=10.0, finish_reason="stop", api_key_name=None)


# ------------------------------------------------------------------------------------------------ API


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory, start_server):
    home = tmp_path_factory.mktemp("feedback-home")
    keys = [{"name": "ana", "key": USER_KEY}, {"name": "root", "key": ADMIN_KEY, "admin": True}]
    settings = load_settings(home=home, model=str(tiny_model_dir), serve={"api_keys": keys})
    server = start_server(create_app(settings, str(tiny_model_dir)))
    server.settings = settings
    return server


def test_every_exchange_is_stored_under_the_id_the_api_returned(served):
    store = served.app.state.forja.store
    reply = chat(served.url, "¿Qué tal?", USER_KEY, temperature=0)
    exchange = store.exchange(reply["id"])
    assert exchange is not None and exchange.route == "chat"
    assert exchange.messages == [{"role": "user", "content": "¿Qué tal?"}]
    assert exchange.answers == [reply["choices"][0]["message"]["content"]]
    assert exchange.completion_tokens == reply["usage"]["completion_tokens"]
    assert exchange.prompt_tokens == reply["usage"]["prompt_tokens"]
    assert exchange.params["max_new_tokens"] == 12 and exchange.params["temperature"] == 0
    assert exchange.api_key_name == "ana" and exchange.latency_ms > 0

    from openai import OpenAI  # a streamed answer is stored too, before the stream ends

    client = OpenAI(base_url=served.url + "/v1", api_key=USER_KEY)
    chunks = list(client.chat.completions.create(model=str(served.app.state.forja.base), stream=True, max_tokens=8,
                                                 messages=[{"role": "user", "content": "Hola"}]))
    streamed = store.exchange(chunks[0].id)
    assert streamed is not None
    assert streamed.answers == ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices)]

    predicted = httpx.post(served.url + "/predict", json={"prompt": "Hola", "max_length": 5, "num_return_sequences": 2},
                           headers={"Authorization": f"Bearer {USER_KEY}"}).json()
    assert store.exchange(predicted[0]["id"].rsplit("-", 1)[0]).route == "predict"


def test_feedback_is_stored_with_its_sender_and_errors_are_clear(served):
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    reply = chat(served.url, "¿Cuándo abrís?", USER_KEY)
    sent = httpx.post(served.url + "/feedback", headers=auth,
                      json={"id": reply["id"], "rating": "down", "correction": "  De 9 a 14.  ", "comment": "mal"})
    assert sent.status_code == 201, sent.text
    row = sent.json()
    assert row["object"] == "feedback" and row["exchange_id"] == reply["id"]
    assert (row["rating"], row["correction"], row["comment"], row["sender"]) == ("down", "De 9 a 14.", "mal", "ana")

    classic = httpx.post(served.url + "/v1/feedback", headers=auth, json={"id": reply["id"], "text": "muy lento"})
    assert classic.status_code == 201 and classic.json()["comment"] == "muy lento" and classic.json()["rating"] is None
    only_fix = httpx.post(served.url + "/v1/feedback", headers=auth, json={"id": reply["id"], "correction": "A las 9."})
    assert only_fix.json()["rating"] == "down"  # a correction says the answer was wrong

    predicted = httpx.post(served.url + "/predict", headers=auth,
                           json={"prompt": "Hola", "max_length": 4, "num_return_sequences": 2}).json()
    second = httpx.post(served.url + "/feedback", headers=auth, json={"id": predicted[1]["id"], "rating": "up"})
    assert second.status_code == 201 and second.json()["choice"] == 1

    unknown = httpx.post(served.url + "/feedback", headers=auth, json={"id": "chatcmpl-nope", "rating": "up"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "exchange_not_found"
    empty = httpx.post(served.url + "/feedback", headers=auth, json={"id": reply["id"], "comment": "   "})
    assert empty.status_code == 422 and "rating" in empty.json()["error"]["message"]
    bad = httpx.post(served.url + "/feedback", headers=auth, json={"id": reply["id"], "rating": "meh"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "rating"
    wrong_choice = httpx.post(served.url + "/feedback", headers=auth, json={"id": reply["id"], "rating": "up", "choice": 3})
    assert wrong_choice.status_code == 422
    anonymous = httpx.post(served.url + "/feedback", json={"id": reply["id"], "rating": "up"})
    assert anonymous.status_code == 401


def test_admin_switches_the_active_model_without_a_restart(served, tiny_model_dir):
    settings = served.settings
    clone = settings.versions_dir / "clone"  # a trained version: remote clients name models, never paths
    import shutil

    shutil.copytree(tiny_model_dir, clone)
    (clone / models.VERSION_FILE).write_text(json.dumps({"base": str(tiny_model_dir)}))
    user = {"Authorization": f"Bearer {USER_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(served.url + "/admin/models/activate", json={"model": "clone"}).status_code == 401
    refused = httpx.post(served.url + "/admin/models/activate", headers=user, json={"model": "clone"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    missing = httpx.post(served.url + "/admin/models/activate", headers=admin, json={"model": "no-such-version"})
    assert missing.status_code == 404
    switched = httpx.post(served.url + "/admin/models/activate", headers=admin, json={"model": "clone"})
    assert switched.status_code == 200 and switched.json()["active"] == "clone"
    assert chat(served.url, "Hola", USER_KEY)["model"] == "clone"  # no model named: the active one answers
    assert httpx.get(served.url + "/health").json()["active_model"] == "clone"
    back = httpx.post(served.url + "/admin/models/activate", headers=admin, json={"model": str(tiny_model_dir)})
    assert back.json()["active"] == str(tiny_model_dir)
    assert settings.models_dir.joinpath(models.ACTIVE_FILE).exists() is False  # pinned by --model: registry untouched


@pytest.mark.sqlite
def test_acknowledged_feedback_survives_kill_9(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    port = _free_port()
    env = {**os.environ, "FORJA_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--model", str(tiny_model_dir),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.1)
        reply = chat(url, "Hola")
        acknowledged = []
        for i in range(5):
            sent = httpx.post(url + "/feedback", json={"id": reply["id"], "rating": "down", "correction": f"Hola {i}."})
            assert sent.status_code == 201
            acknowledged.append(sent.json()["id"])
        server.send_signal(signal.SIGKILL)  # right after the last 201: no shutdown, no flush
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    raw = sqlite3.connect(home / "forja.db")
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = [r[0] for r in raw.execute("SELECT id FROM feedback ORDER BY id")]
    assert stored == acknowledged
    raw.close()
    store = Store(f"sqlite:///{home / 'forja.db'}")  # and it opens cleanly through forja
    assert [r["correction"] for r in store.feedback_rows()][0] == "Hola 4."


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ export


def test_export_turns_feedback_into_pairs_and_skips_what_teaches_nothing(tmp_path):
    settings = load_settings()
    store = Store.open(settings)
    log(store, "a", "¿Horario?", "No sé.")
    log(store, "b", "¿Dónde?", "Calle Yunque 12.")
    log(store, "c", "¿Precio?", "Gratis.")
    log(store, "d", "¿Y el pan?", "Rico.")
    store.add_feedback("a", rating="down", correction="De 7 a 14.")
    store.add_feedback("a", rating="down", correction="De 8 a 14.")  # the newest correction wins
    store.add_feedback("b", rating="up", sender="ana")  # sent with an API key: trusted by default
    store.add_feedback("c", rating="down")  # wrong, but says nothing about what is right
    store.add_feedback("d", comment="¿pan integral?")
    log(store, "e", "¿Abrís?", "Nunca.")
    store.add_feedback("e", rating="up")  # an anonymous page visitor's click does not teach "Nunca."

    summary = export(settings, tmp_path / "fb.jsonl", preferences=True)
    rows = [json.loads(line) for line in (tmp_path / "fb.jsonl").read_text().splitlines()]
    assert (summary.pairs, summary.corrections, summary.approved) == (2, 1, 1)
    assert summary.skipped["down_without_correction"] == 1 and summary.skipped["comment_only"] == 1
    assert summary.skipped["untrusted_approval"] == 1
    by_exchange = {r["exchange_id"]: r for r in rows}
    assert by_exchange["a"]["messages"] == [{"role": "user", "content": "¿Horario?"},
                                            {"role": "assistant", "content": "De 8 a 14."}]
    assert by_exchange["a"]["kind"] == "correction" and len(by_exchange["a"]["feedback_ids"]) == 2
    assert by_exchange["b"]["messages"][-1]["content"] == "Calle Yunque 12."
    preferences = [json.loads(line) for line in summary.preferences_path.read_text().splitlines()]
    assert preferences == [{"prompt": [{"role": "user", "content": "¿Horario?"}], "chosen": "De 8 a 14.",
                            "rejected": "No sé.", "exchange_id": "a", "feedback_ids": by_exchange["a"]["feedback_ids"]}]

    store.mark_used(by_exchange["a"]["feedback_ids"], "v2")
    pairs, _ = collect_pairs(store)
    assert [p.exchange_id for p in pairs] == ["b"]  # used rows are not counted twice
    result = runner.invoke(app, ["feedback", "export", "--out", str(tmp_path / "all.jsonl"), "--all"])
    assert result.exit_code == 0, result.output
    assert "2 pairs (1 corrections, 1 approved answers)" in result.stdout and "untrusted_approval=1" in result.stdout
    listed = runner.invoke(app, ["feedback", "list", "--json"])
    assert [json.loads(line)["used_in"] for line in listed.stdout.splitlines()][-2:] == [["v2"], ["v2"]]
    stats = json.loads(runner.invoke(app, ["feedback", "stats", "--json"]).stdout)
    assert stats["feedback"] == 6 and stats["corrections"] == 2 and stats["unused"] == 4
    assert stats["models"]["m"]["up"] == 2 and stats["models"]["m"]["down"] == 3


def test_retrain_without_new_feedback_says_so(tiny_model_dir):
    result = runner.invoke(app, ["train", "--from-feedback", "--base", str(tiny_model_dir)])
    assert result.exit_code == 1
    assert "no new feedback to learn from" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ promote


def test_promote_and_rollback_by_hand(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    settings = load_settings()
    for name in ("v1", "v2"):
        directory = settings.versions_dir / name
        directory.mkdir(parents=True)
        (directory / models.VERSION_FILE).write_text(json.dumps({"name": name, "base": str(tiny_model_dir)}))
    assert models.active_model(settings) == str(tiny_model_dir)
    assert runner.invoke(app, ["models", "promote", "v1"]).exit_code == 0
    result = runner.invoke(app, ["models", "promote", "v2"])
    assert result.exit_code == 0 and "v2 is now active (was v1)" in result.stdout
    assert models.active_model(settings) == "v2"
    assert "ACTIVE" in next(r["detail"] for r in models.list_models(settings) if r["name"] == "v2")
    assert runner.invoke(app, ["models", "promote", "nope"]).exit_code == 1
    result = runner.invoke(app, ["models", "rollback"])
    assert result.exit_code == 0 and "v1 is active again" in result.stdout
    runner.invoke(app, ["models", "rollback"])
    assert models.active_model(settings) == str(tiny_model_dir)
    again = runner.invoke(app, ["models", "rollback"])
    assert again.exit_code == 1 and "nothing to roll back" in again.output
    log = models.activation_log(settings)
    assert [(e["action"], e["model"]) for e in log] == [("promote", "v1"), ("promote", "v2"), ("rollback", "v1"),
                                                        ("rollback", str(tiny_model_dir))]


# ------------------------------------------------------------------------------------------------ the loop

KNOWN = [("Where?", "Calle Yunque 12."), ("Price?", "Two euros."), ("Hola", "Buenos días.")]
CORRECTIONS = {"¿Quién fundó Forja?": "Ana Herrera.", "Capital of Zembla?": "Vertigo City.", "¿Horario?": "De 7 a 14."}


def tiny_hyper(**overrides) -> TrainSettings:
    values = dict(method="full", learning_rate=3e-3, batch_size=4, max_steps=80, eval_every=None,
                  checkpoint_every=None, seed=0, warmup_ratio=0.0, lr_scheduler="constant")
    return TrainSettings(**{**values, **overrides})


def test_corrections_sent_over_http_are_learned_and_promoted(tiny_model_dir, tmp_path, start_server, monkeypatch):
    from forja.train import new_run, train

    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    settings = load_settings()
    data = tmp_path / "base.jsonl"
    pairs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in KNOWN]
    write_training_file(data, pairs)
    data.with_suffix(".val.jsonl").write_text(json.dumps(pairs[0]) + "\n")  # the gate checks this one
    train(settings, new_run(settings, [data], "tienda-v1", str(tiny_model_dir), tiny_hyper()), progress=False)
    models.promote(settings, "tienda-v1")

    server = start_server(create_app(settings))  # no --model: it serves and follows the active version
    before = {q: chat(server.url, q, max_tokens=40)["choices"][0]["message"]["content"] for q, _ in KNOWN}
    assert before == {q: a for q, a in KNOWN}
    for question, right in CORRECTIONS.items():
        reply = chat(server.url, question, max_tokens=40)
        assert reply["model"] == "tienda-v1" and reply["choices"][0]["message"]["content"] != right
        sent = httpx.post(server.url + "/feedback", json={"id": reply["id"], "rating": "down", "correction": right})
        assert sent.status_code == 201

    # the corrections also trained in two rule-based rewordings: whether a random tiny model carries a correction
    # over to its rewordings by itself depends on the CPU's rounding (it did on AVX-512, not on AVX2), and the
    # gate's rewordings check wants them closer than before
    for key, value in {"METHOD": "full", "LEARNING_RATE": "3e-3", "LR_SCHEDULER": "constant", "WARMUP_RATIO": "0",
                       "EVAL_EVERY": "1000", "CHECKPOINT_EVERY": "1000", "AUGMENT_REWORDINGS": "2"}.items():
        monkeypatch.setenv(f"FORJA_TRAIN__{key}", value)
    result = runner.invoke(app, ["train", "--from-feedback", "--name", "tienda-v2", "--max-steps", "200",
                                 "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained from tienda-v1 on 3 feedback pairs + 3 replayed rows" in result.stdout
    assert "gate passed" in result.stdout and "tienda-v2 is now the active version" in result.stdout
    assert models.active_model(settings) == "tienda-v2"

    # the running server switched at its next request; the corrections are known, the rest unchanged
    for question, right in CORRECTIONS.items():
        reply = chat(server.url, question, max_tokens=40)
        assert reply["model"] == "tienda-v2"
        assert reply["choices"][0]["message"]["content"] == right
    for question, answer in KNOWN:
        assert chat(server.url, question, max_tokens=40)["choices"][0]["message"]["content"] == answer == before[question]

    version = json.loads((settings.versions_dir / "tienda-v2" / "version.json").read_text())
    assert version["base"] == "tienda-v1"  # trained on top of the active version, not the original base
    store = server.app.state.forja.store
    assert sorted(r["feedback_id"] for r in store.used_by("tienda-v2")) == version["from_feedback"]["train_feedback_ids"]
    assert len(version["from_feedback"]["train_feedback_ids"]) == 3
    gate = json.loads((settings.versions_dir / "tienda-v2" / "gate.json").read_text())
    assert gate["passed"] and gate["decided_by"] == "all checks"
    assert {name: c["cases"] for name, c in gate["checks"].items()} == {"feedback": 3, "rewordings": 6, "regression": 4}
    assert gate["checks"]["feedback"]["metrics"]["exact_match"] == {"current": 0.0, "candidate": 1.0}
    again = runner.invoke(app, ["train", "--from-feedback", "--quiet"])
    assert again.exit_code == 1 and "no new feedback" in again.output  # nothing counted twice

    assert runner.invoke(app, ["models", "rollback"]).exit_code == 0
    assert chat(server.url, "Hola", max_tokens=40)["model"] == "tienda-v1"


def test_exchange_logging_can_be_switched_off(tiny_model_dir, tmp_path, start_server):
    settings = load_settings(home=tmp_path / "quiet-home", model=str(tiny_model_dir), serve={"log_exchanges": False})
    server = start_server(create_app(settings, str(tiny_model_dir)))
    reply = chat(server.url, "Hola")
    assert server.app.state.forja.store.exchange(reply["id"]) is None  # nothing stored
    refused = httpx.post(server.url + "/feedback", json={"id": reply["id"], "rating": "up"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "exchanges_not_stored"


# ------------------------------------------------------------------------------------------------ what feedback teaches


def test_a_correction_in_a_conversation_trains_only_the_corrected_answer(tiny_model_dir):
    from forja.models import load_tokenizer
    from forja.train import IGNORE, dialogue_example

    settings = load_settings()
    store = Store.open(settings)
    log(store, "x", "¿Horario?", "No sé.", before=[{"role": "user", "content": "Hola"},
                                                  {"role": "assistant", "content": "Cerrado hoy."}])
    store.add_feedback("x", rating="down", correction="De 9 a 14.")
    [pair], _ = collect_pairs(store)
    row = pair.training_row()
    assert row["must_learn"] is True
    assert row["messages"][1] == {"role": "assistant", "content": "Cerrado hoy.", "weight": 0}  # context only
    tokenizer = load_tokenizer(str(tiny_model_dir), settings)
    example = dialogue_example(tokenizer, row["messages"])
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert learned.startswith("De 9 a 14.") and "Cerrado" not in learned and "No sé" not in learned


def test_thumbs_up_train_only_from_trusted_raters_and_review_decides(tmp_path):
    settings = load_settings()
    store = Store.open(settings)
    log(store, "anon", "¿Abrís?", "Nunca.")
    log(store, "keyed", "¿Dónde?", "Calle Yunque 12.")
    log(store, "fixed", "¿Precio?", "Gratis.")
    visitor = store.add_feedback("anon", rating="up")["id"]
    store.add_feedback("keyed", rating="up", sender="ana")
    wrong_fix = store.add_feedback("fixed", rating="down", correction="Todo gratis siempre.")["id"]
    kinds = lambda trust: sorted(p.exchange_id for p in collect_pairs(store, trust=trust)[0])  # noqa: E731
    assert kinds("api_keys") == ["fixed", "keyed"]  # the default: no anonymous click trains
    assert kinds("anyone") == ["anon", "fixed", "keyed"]
    assert kinds("reviewed") == ["fixed"]  # corrections count unless rejected; thumbs-up only once approved
    assert runner.invoke(app, ["feedback", "review", str(visitor)]).exit_code == 0
    rejected = runner.invoke(app, ["feedback", "review", str(wrong_fix), "--reject", "--reviewer", "dueña"])
    assert rejected.exit_code == 0 and "1 feedback rows rejected" in rejected.stdout
    assert kinds("reviewed") == ["anon"] and kinds("api_keys") == ["anon", "keyed"]
    _, skipped = collect_pairs(store)
    assert skipped["rejected_in_review"] == 1
    missing = runner.invoke(app, ["feedback", "review", "999"])
    assert missing.exit_code == 1 and "no feedback with id 999" in missing.output and "Traceback" not in missing.output


def trained_version(settings, tiny_model_dir, tmp_path, name: str, pairs: list[tuple[str, str]], val=(),
                    **hyper) -> str:
    from forja.train import new_run, train

    data = tmp_path / f"{name}.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    write_training_file(data, rows)
    data.with_suffix(".val.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for q, a in val))
    train(settings, new_run(settings, [data], name, str(tiny_model_dir), tiny_hyper(**hyper)), progress=False)
    return name


def test_replay_never_brings_back_an_answer_a_correction_replaced(tiny_model_dir, tmp_path, monkeypatch):
    from forja.feedback import retrain

    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    settings = load_settings()
    old = [("¿Horario?", "De 7 a 14."), ("horario?", "De 7 a 14."), ("Where?", "Calle Yunque 12.")]
    trained_version(settings, tiny_model_dir, tmp_path, "v1", old, val=[("¿HORARIO?", "De 7 a 14.")])
    models.promote(settings, "v1")
    store = Store.open(settings)
    log(store, "h", "¿Horario?", "De 7 a 14.", model="v1")
    store.add_feedback("h", rating="down", correction="De 9 a 20.")
    result = retrain(settings, tiny_hyper(max_steps=120), name="v2", progress=False)
    rows = [json.loads(line) for line in (settings.versions_dir / "v2" / "data.jsonl").read_text().splitlines()]
    trained = json.dumps([r for r in rows if "messages" in r], ensure_ascii=False)
    assert "De 7 a 14." not in trained and "Calle Yunque 12." in trained  # the replaced rows (any wording) are gone
    # the replaced answer is still there, as the loser of the correction's DPO pair
    assert [(r["chosen"], r["rejected"]) for r in rows if "chosen" in r] == [("De 9 a 20.", "De 7 a 14.")]
    assert (result.replayed_rows, result.replaced_rows) == (1, 2)
    assert result.answers["reproduced"] == result.answers["checked"] == 1  # trained until the correction is learned
    regression = result.gate["checks"]["regression"]
    assert [q["expected"] for q in regression["questions"]] == ["Calle Yunque 12."]  # old answers are no regression


def test_the_gate_refuses_a_regressing_version_on_the_operators_test_set(tiny_model_dir, tmp_path, monkeypatch):
    from forja.feedback import Pair, gate

    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    testset = tmp_path / "mine.csv"
    testset.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in KNOWN))
    settings = load_settings(feedback={"gate_testset": str(testset)})
    # with two rule-based rewordings of each row, so that the good version answers the rewordings of a fix
    # closer than the random base on any CPU (the last check below)
    good = trained_version(settings, tiny_model_dir, tmp_path, "good", KNOWN, augment_rewordings=2)
    bad = str(tiny_model_dir)  # the random base: forgets every answer of the test set
    fix = Pair("x", [{"role": "user", "content": "Where?"}], "Calle Yunque 12.", "correction", [1])
    report = gate(settings, good, bad, [fix], [], progress=False)
    assert report["passed"] is False and report["decided_by"] == "feedback"
    regression = report["checks"]["regression"]
    assert regression["passed"] is False and regression["cases"] == len(KNOWN)
    assert regression["metrics"]["token_f1"]["current"] == 1.0 > regression["metrics"]["token_f1"]["candidate"]
    assert all(q["before_ok"] and not q["after_ok"] for q in regression["questions"])
    # always a verdict: no regression rows at all, the feedback prompts still decide
    plain = gate(load_settings(), bad, good, [fix], [], progress=False)
    assert set(plain["checks"]) == {"feedback", "rewordings"} and plain["passed"] is True


def test_a_retrain_whose_gate_fails_exits_non_zero_and_is_not_promoted(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    settings = load_settings()
    trained_version(settings, tiny_model_dir, tmp_path, "v1", KNOWN)
    models.promote(settings, "v1")
    store = Store.open(settings)
    log(store, "q", "¿Quién fundó Forja?", "No sé.", model="v1")
    store.add_feedback("q", rating="down", correction="Ana Herrera.")
    result = runner.invoke(app, ["train", "--from-feedback", "--name", "v2", "--max-steps", "1", "--quiet"])
    assert result.exit_code == 2, result.output  # one step cannot learn the correction: the feedback check fails
    assert "feedback: FAILED" in result.stdout and "decided by the feedback check" in result.stdout
    assert "0 of 1 of the feedback answers reproduced" in result.stdout
    assert "'¿Quién fundó Forja?'" in result.stdout and "not promoted" in result.stdout
    assert models.active_model(settings) == "v1"


def test_bench_learn_tells_the_whole_story_through_a_real_server(tiny_model_dir, tmp_path):
    """`forja bench learn` on a three-row FAQ and the tiny model: train, serve (llama.cpp, the default on a
    CPU), four questions kinds asked over HTTP, a correction, a retrain, and a bad version refused."""
    from forja.bench_learn import learn_benchmark, render_learn

    data = tmp_path / "bench"
    data.mkdir()
    faq = [{"question": q, "answer": a, "fact": a, "reworded": q.lower()} for q, a in KNOWN]
    (data / "faq_es.jsonl").write_text("".join(json.dumps(r) + "\n" for r in faq))
    (data / "corrections_es.jsonl").write_text(json.dumps({"question": "¿Horario?", "correction": "De 7 a 14.",
                                                           "fact": "7 a 14", "reworded": "horario?"}) + "\n")
    (data / "controls_es.jsonl").write_text(json.dumps({"question": "Hola", "fact": "Buenos días"}) + "\n")
    env = {"FORJA_MODEL": str(tiny_model_dir), "FORJA_TRAIN__METHOD": "full", "FORJA_TRAIN__LEARNING_RATE": "3e-3",
           "FORJA_TRAIN__BATCH_SIZE": "4", "FORJA_TRAIN__LR_SCHEDULER": "constant", "FORJA_SERVE__GGUF_QUANT": "f16",
           "FORJA_SERVE__BACKEND": "auto"}  # conftest serves with PyTorch; the bench uses the default
    report = learn_benchmark(data, tmp_path / "learn.json", log=lambda line: None, extra_env=env)
    f = report["figures"]
    assert report["backend"] == "llamacpp", report["server_log"]
    assert f["faq_as_asked"] == 1.0 and f["controls_before"] == 1.0  # the tiny model memorises three rows
    assert f["corrections_as_sent"] == 1.0 and f["gate_passed"] and f["promoted"]
    assert f["faq_after"] >= 2 / 3
    assert f["bad_version_refused"] and report["bad_retrain"]["exit_code"] == 2
    table = render_learn(report)
    assert "| corrections learned, as sent | 1/1 | 1/1 | yes |" in table
    assert json.loads((tmp_path / "learn.json").read_text())["figures"] == f


def test_a_feedback_run_resumed_after_a_crash_is_gated_as_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    from forja import train as training

    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    settings = load_settings()
    trained_version(settings, tiny_model_dir, tmp_path, "v1", KNOWN)
    models.promote(settings, "v1")
    store = Store.open(settings)
    log(store, "q", "¿Quién fundó Forja?", "No sé.", model="v1")
    store.add_feedback("q", rating="down", correction="Ana Herrera.")
    store.close()
    real = training.train

    def crash(*args, **kwargs):
        raise training.TrainError("interrupted at step 0; checkpoint saved, continue with: forja train --resume v2")

    monkeypatch.setattr(training, "train", crash)
    first = runner.invoke(app, ["train", "--from-feedback", "--name", "v2", "--max-steps", "1", "--quiet"])
    assert first.exit_code == 1 and "--resume v2" in first.output
    monkeypatch.setattr(training, "train", real)
    resumed = runner.invoke(app, ["train", "--resume", "v2", "--quiet"])
    assert resumed.exit_code == 2, resumed.output  # one step cannot learn the correction: the gate says so
    assert "feedback: FAILED" in resumed.stdout and "not promoted" in resumed.stdout
    assert (settings.versions_dir / "v2" / "gate.json").is_file() and models.active_model(settings) == "v1"


def test_thumbs_alone_sent_over_http_train_a_version_with_kto_rows_and_the_gate_shows_their_effect(
        tiny_model_dir, tmp_path, start_server, monkeypatch):
    """No correction at all: two thumbs-down and an anonymous thumbs-up become KTO rows (the thumbs-up is not
    learned word for word), the retrain records what each kind of row contributed, and the gate's ratings check
    reports how often the disliked answers come back."""
    from forja.train import new_run, train

    monkeypatch.setenv("FORJA_MODEL", str(tiny_model_dir))
    settings = load_settings()
    data = tmp_path / "base.jsonl"
    write_training_file(data, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                               for q, a in KNOWN])
    train(settings, new_run(settings, [data], "tienda-v1", str(tiny_model_dir), tiny_hyper()), progress=False)
    models.promote(settings, "tienda-v1")
    server = start_server(create_app(settings))
    for question, rating in (("¿Abrís el domingo?", "down"), ("¿Tenéis pan sin gluten?", "down"), ("Gracias", "up")):
        reply = chat(server.url, question, max_tokens=settings.feedback.gate_max_tokens)
        sent = httpx.post(server.url + "/feedback", json={"id": reply["id"], "rating": rating})
        assert sent.status_code == 201, sent.text

    for key, value in {"METHOD": "full", "LEARNING_RATE": "3e-3", "LR_SCHEDULER": "constant", "WARMUP_RATIO": "0",
                       "EVAL_EVERY": "1000", "CHECKPOINT_EVERY": "1000", "STOP_WHEN_LEARNED": "false"}.items():
        monkeypatch.setenv(f"FORJA_TRAIN__{key}", value)
    result = runner.invoke(app, ["train", "--from-feedback", "--name", "tienda-v2", "--max-steps", "20",
                                 "--batch-size", "6", "--quiet"])
    assert result.exit_code in (0, 2), result.output  # 2: the gate decided against it; the report is what counts
    assert "on 0 feedback pairs + 3 replayed rows" in result.stdout
    assert "and ratings: 0 DPO pairs (an answer and its correction), 3 KTO rows (1 thumbs-up, 2 thumbs-down" in result.stdout
    version = json.loads((settings.versions_dir / "tienda-v2" / "version.json").read_text())
    assert version["from_feedback"]["contributed"] == {"corrections": 0, "tool_calls": 0, "approved": 0, "dpo_pairs": 0, "kto_up": 1,
                                                       "kto_down": 2, "replayed": 3}
    assert len(version["from_feedback"]["train_feedback_ids"]) == 3  # used: not learned again next time
    assert version["metrics"]["preference_items"] == {"pairs": 0, "rated_good": 1, "rated_bad": 2}
    steps = [json.loads(line) for line in (settings.versions_dir / "tienda-v2" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and "sft_loss" in r for r in steps if "loss" in r)
    gate = json.loads((settings.versions_dir / "tienda-v2" / "gate.json").read_text())
    ratings = gate["checks"]["ratings"]
    assert ratings["cases"] == 3 and "disliked repeated" in ratings["reason"]
    assert ratings["metrics"]["disliked_repeated"] == {"current": 1.0, "candidate": 0.0}  # the thumbs-down worked
    assert sorted(q["rating"] for q in ratings["questions"]) == ["down", "down", "up"]
    assert "ratings: " in result.stdout


STYLE_RATED = ["¿Puedo pagar con tarjeta?", "¿Tenéis aparcamiento para clientes?", "¿Qué es un croissant?",
               "¿Cómo se dice pan en inglés?", "¿Tenéis wifi gratis?", "¿Qué significa brunch?", "¿Hacéis pedidos online?",
               "¿Vendéis café para llevar?", "¿Tenéis menú para niños?", "¿Aceptáis PayPal?", "¿Qué es el sourdough?",
               "¿Hay opciones sin lactosa?", "¿Tenéis tarjeta de fidelidad?", "¿Dónde compro un bagel?",
               "¿Qué es un muffin?", "¿Puedo encargar una tarta de cumpleaños?", "¿Hacéis catering para empresas?",
               "¿Cuánto dura el pan de masa madre?", "¿Qué es el gluten?", "¿Tenéis donuts?", "¿Abrís en Navidad?",
               "¿Tenéis smoothies?", "¿Qué es un bizcocho?", "¿Puedo llevar a mi perro?", "¿Tenéis cookies de chocolate?",
               "¿Hay descuentos para estudiantes?", "¿Qué es el pan de centeno?", "¿Vendéis tartas veganas?",
               "¿Cómo conservo el pan?", "¿Qué horario tenéis el sábado?"]


@pytest.mark.slow
def test_thumbs_down_alone_on_english_answers_to_spanish_questions_moves_the_bundled_model(bundled_home, tmp_path,
                                                                                         monkeypatch):
    """The bundled model answers some Spanish questions in English; a thumbs-down on each of those (no
    correction) and one retrain with the defaults: the gate's ratings check shows more of those questions
    answered in Spanish. (Measured so, README: 23 of 30 in Spanish, 7 rated down, 0/7 -> 6/7.)"""
    from forja.data.quality import language
    from forja.evaluate import TestCase, evaluate
    from forja.feedback import retrain

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "converted").symlink_to(bundled_home / "models" / "converted")
    monkeypatch.setenv("FORJA_HOME", str(home))
    settings = load_settings()
    cases = [TestCase(question=q, answer="-", messages=[{"role": "user", "content": q}]) for q in STYLE_RATED]
    answers = evaluate([settings.model], cases, settings, max_new_tokens=settings.feedback.gate_max_tokens,
                       progress=False).rows
    store = Store.open(settings)
    english = 0
    for i, row in enumerate(answers):
        log(store, f"chatcmpl-{i}", row["question"], row["answer"], model=settings.model)
        if language(row["answer"]) != "es":
            store.add_feedback(f"chatcmpl-{i}", rating="down")
            english += 1
    store.close()
    assert english >= 3  # enough English answers to rate
    result = retrain(settings, settings.train, name="style-v1", promote=False, progress=False)
    assert result.contributed["kto_down"] == english
    same = result.gate["checks"]["ratings"]["metrics"]["same_language"]
    assert same["current"] == 0.0 and same["candidate"] >= 0.5


def calculator_call(number: int, expression: str) -> dict:
    return {"id": f"call_{number}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}


CALCULATOR = [{"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


def test_a_corrected_call_of_a_later_step_trains_as_that_call(long_tiny_model_dir, monkeypatch):
    """An agent's answer of two steps, after an earlier request's own call: correcting step 2 (twice: the newer
    wins, both are used up) trains the conversation up to step 2's turn with that call; the retrain counts it
    and replaces no FAQ row, and its gate checks the answers it has."""
    from forja.chat import CallCorrectionError, corrected_call
    from forja.feedback import retrain

    monkeypatch.setenv("FORJA_MODEL", str(long_tiny_model_dir))
    settings = load_settings()
    messages = [{"role": "user", "content": "¿2+2?"}, {"role": "assistant", "content": "", "tool_calls": [calculator_call(0, "2+2")]},
                {"role": "tool", "tool_call_id": "call_0", "content": "4"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "¿437 por 58, más 3?"},
                {"role": "assistant", "content": "", "tool_calls": [calculator_call(1, "437*58")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "25346"},
                {"role": "assistant", "content": "", "tool_calls": [calculator_call(2, "25346-3")]},
                {"role": "tool", "tool_call_id": "call_2", "content": "25343"}]
    trace = [{"step": 1, "tool": "calculator", "arguments": {"expression": "437*58"}, "result": "25346", "ok": True},
             {"step": 2, "tool": "calculator", "arguments": {"expression": "25346-3"}, "result": "25343", "ok": True}]
    with pytest.raises(CallCorrectionError, match="steps 1 to 2, not 3"):
        corrected_call(messages, trace, CALCULATOR, {"step": 3, "arguments": {"expression": "1"}})
    with pytest.raises(CallCorrectionError, match="'expression' is a required property"):
        corrected_call(messages, trace, CALCULATOR, {"step": 2, "arguments": {}})
    store = Store.open(settings)
    store.log_exchange(id="agent", route="chat", model=str(long_tiny_model_dir), persona="agente", messages=messages,
                       answers=["Son 25343."], params={"tools": CALCULATOR}, prompt_tokens=5, completion_tokens=3,
                       latency_ms=10.0, finish_reason="stop", api_key_name=None, trace=trace)
    for expression in ("25346 + 30", "25346 + 3"):
        store.add_feedback("agent", rating="down",
                           tool_call=corrected_call(messages, trace, CALCULATOR, {"step": 2, "arguments": {"expression": expression}}))
    pairs, skipped = collect_pairs(store)
    assert [p.kind for p in pairs] == ["call"] and pairs[0].feedback_ids == [1, 2] and not any(skipped.values())
    listed = [json.loads(line) for line in runner.invoke(app, ["feedback", "list", "--json"]).stdout.splitlines()]
    assert listed[0]["tool_call"] == {"step": 2, "name": "calculator", "arguments": {"expression": "25346 + 3"}}
    assert "step 2: calculator" in runner.invoke(app, ["feedback", "list"], env={"COLUMNS": "300"}).stdout
    row = pairs[0].training_row()
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"]
    assert row["messages"][-2]["content"] == "25346" and row["messages"][5]["weight"] == 0  # step 1 is context
    assert json.loads(row["messages"][-1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "25346 + 3"}
    assert "weight" not in row["messages"][-1] and row["tools"] == CALCULATOR
    store.close()

    result = retrain(settings, tiny_hyper(max_steps=2, max_seq_length=2048), name="agente-v2", promote=False, progress=False)
    assert result.contributed["tool_calls"] == 1 and result.contributed["corrections"] == 0
    assert not result.gate["passed"] and result.gate["decided_by"] == "nothing to check"  # never promoted blind
    trained = [json.loads(line) for line in (settings.home / "feedback" / "agente-v2" / "data.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in trained] == ["call"]
    store = Store.open(settings)
    assert sorted(r["feedback_id"] for r in store.used_by("agente-v2")) == [1, 2]
    assert collect_pairs(store)[0] == []  # used up: the older correction does not come back alone
    store.close()
