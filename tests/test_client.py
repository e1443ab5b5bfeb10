"""`forja ask` and `forja chat` against a live server, through Typer's runner; `forja serve` itself."""

import json
import logging
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from forja.cli import app
from forja.config import load_settings
from forja.serve.app import create_app

runner = CliRunner()
KEY = "client-key-0123456789abcdef"


def forja(*args, input=None, env=None):
    return runner.invoke(app, list(args), input=input, env=env)


@pytest.fixture(scope="module")
def server(varied_model_dir, tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp("client-home"), model=str(varied_model_dir),
                             serve={"personas": [{"name": "pirate", "system": "You are a pirate.", "max_tokens": 6}],
                                    "log_prompts": True})
    return start_server(create_app(settings))


@pytest.fixture(scope="module")
def locked(tiny_model_dir, tmp_path_factory, start_server):
    settings = load_settings(home=tmp_path_factory.mktemp("client-locked"), model=str(tiny_model_dir),
                             serve={"api_keys": [{"name": "cli", "key": KEY}]})
    return start_server(create_app(settings))


def test_ask_streams_and_json(server):
    streamed = forja("ask", "Hola", "--url", server.url, "--max-tokens", "12")
    assert streamed.exit_code == 0, streamed.output
    as_json = forja("ask", "Hola", "--url", server.url, "--max-tokens", "12", "--json")
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["id"].startswith("chatcmpl-") and payload["usage"]["completion_tokens"] == 12
    assert streamed.stdout == payload["text"] + "\n"
    persona = forja("ask", "Hola", "--url", server.url, "--model", "pirate", "--json")
    assert json.loads(persona.stdout)["model"] == "pirate"
    piped = forja("ask", "--url", server.url, "--max-tokens", "3", input="¿Qué tal?\n")
    assert piped.exit_code == 0


def test_ask_fails_with_one_line(server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    down = forja("ask", "Hola", "--url", f"http://127.0.0.1:{free}")
    assert down.exit_code == 1
    assert down.stderr.strip().count("\n") == 0 and "cannot reach the forja server" in down.stderr
    unknown = forja("ask", "Hola", "--url", server.url, "--model", "nope")
    assert unknown.exit_code == 1 and "the server answered 404" in unknown.stderr and "nope" in unknown.stderr
    too_long = forja("ask", "hola " * 400, "--url", server.url, "--json")
    assert too_long.exit_code == 1 and "context of 256 tokens" in too_long.stderr


def test_ask_with_api_key(locked):
    refused = forja("ask", "Hola", "--url", locked.url)
    assert refused.exit_code == 1 and "401" in refused.stderr and "API key" in refused.stderr
    assert forja("ask", "Hola", "--url", locked.url, "--api-key", KEY, "--max-tokens", "3").exit_code == 0
    assert forja("ask", "Hola", "--url", locked.url, "--max-tokens", "3", env={"FORJA_API_KEY": KEY}).exit_code == 0


def test_chat_repl_keeps_history_and_switches_persona(server, caplog):
    caplog.set_level(logging.INFO, logger="forja.serve")
    script = "Hola\nY mañana?\n/persona\n/persona pirate\nAhoy\n/persona nope\n/reset\n/bogus\n/exit\nnever sent\n"
    result = forja("chat", "--url", server.url, "--max-tokens", "5", input=script)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "an AI model" in out and "available: " in out and "pirate" in out
    assert "all-MiniLM-L6-v2" not in out  # the embedding model is listed by the server but cannot chat
    assert "(now talking to pirate; new conversation)" in out
    assert "no persona 'nope'" in out and "(conversation forgotten)" in out and "unknown command /bogus" in out
    assert out.rstrip().endswith("bye")
    prompts = [json.loads(r.getMessage().split(" prompt ", 1)[1]) for r in caplog.records if " prompt " in r.getMessage()]
    assert [m["content"] for m in prompts[1]][0] == "Hola" and prompts[1][-1]["content"] == "Y mañana?"
    assert len(prompts[1]) == 3  # question, answer, question: the history went along
    assert prompts[2][0] == {"role": "system", "content": "You are a pirate."} and prompts[2][-1]["content"] == "Ahoy"
    assert len(prompts) == 3  # nothing after /exit


def test_ask_and_chat_send_feedback(server):
    store = server.app.state.forja.store
    fixed = forja("ask", "¿Horario?", "--url", server.url, "--max-tokens", "4", "--feedback", input="f De 7 a 14.\n")
    assert fixed.exit_code == 0, fixed.output
    assert "Was this answer right?" in fixed.stdout and "stored, thank you" in fixed.stdout
    row = store.feedback_rows(limit=1)[0]
    assert (row["rating"], row["correction"]) == ("down", "De 7 a 14.")
    assert row["messages"][-1]["content"] == "¿Horario?"
    good = forja("ask", "Hola", "--url", server.url, "--max-tokens", "4", "--json", "--feedback", input="g\n")
    assert json.loads(good.stdout)["id"] == store.feedback_rows(limit=1)[0]["exchange_id"]  # JSON stays parseable
    assert store.feedback_rows(limit=1)[0]["rating"] == "up"
    skipped = forja("ask", "Hola", "--url", server.url, "--max-tokens", "4", "--feedback", input="\n")
    assert skipped.exit_code == 0 and store.feedback_rows(limit=1)[0]["rating"] == "up"  # Enter sends nothing

    before = len(store.feedback_rows())
    script = "/good\nHola\n/good\n/fix\n/fix Buenos días.\nY luego?\n/bad\n/exit\n"
    result = forja("chat", "--url", server.url, "--max-tokens", "4", input=script)
    assert result.exit_code == 0, result.output
    assert "(no answer to rate yet)" in result.stdout and "usage: /fix" in result.stdout
    rows = store.feedback_rows()[: len(store.feedback_rows()) - before]
    assert [(r["rating"], r["correction"]) for r in rows] == [("down", None), ("down", "Buenos días."), ("up", None)]
    second = store.exchange(rows[0]["exchange_id"])
    assert second.messages[1] == {"role": "assistant", "content": "Buenos días."}  # went on from the correction


def test_chat_fails_when_server_is_down():
    result = forja("chat", "--url", "http://127.0.0.1:9", input="Hola\n")
    assert result.exit_code == 1 and "cannot reach the forja server" in result.stderr


def test_serve_command_runs_the_server(tiny_model_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "forja.cli", "serve", "--model", str(tiny_model_dir),
                                "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        answer = forja("ask", "Hola", "--url", f"http://127.0.0.1:{port}", "--max-tokens", "4", "--json")
        assert answer.exit_code == 0 and json.loads(answer.stdout)["usage"]["completion_tokens"] <= 4
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "chat page /" in process.stderr.read()


def test_serve_refuses_an_unknown_model():
    result = forja("serve", "--model", "no-such-model")
    assert result.exit_code == 1 and "unknown model 'no-such-model'" in result.stderr


def test_bench_serve_measures_server_and_bare_steps(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from forja.cli import app

    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--model", str(tiny_model_dir), "--max-tokens", "8",
                                      "--clients", "3", "--no-compare", "--backend", "pytorch", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    concurrent = figures["backends"]["pytorch"]["concurrent"]
    assert concurrent["errors"] == 0 and concurrent["tokens"] > 0
    assert 0 < concurrent["ttft_p50_first_round_s"] and 0 < concurrent["ttft_p50_later_rounds_s"]
    unguarded = figures["backends"]["pytorch"]["concurrent_unguarded"]  # the rails' cost at N clients, same server
    assert unguarded["errors"] == 0 and unguarded["tokens"] > 0 and unguarded["ttft_p50_s"] > 0
    assert "3 streams, guardrails off: TTFT p50" in result.stdout
    assert figures["bare_step"]["step_ms_1"] > 0 and figures["bare_step"]["step_ms_3"] > 0
    assert "the ceiling of batching here" in result.stdout
    guard = figures["backends"]["pytorch"]["guardrails"]
    assert guard["rounds"] == 3 and guard["total_on_s"] > 0 and guard["total_off_s"] > 0
    assert guard["same_answer"]  # the rails let an ordinary prompt through unchanged
    assert guard["cpu"]["input_ms"] > 0 and guard["cpu"]["output_ms"] > 0
    assert "guardrails on vs off" in result.stdout


def test_bench_serve_measures_a_reference_server_side_by_side(tiny_model_dir, tmp_path):
    """--reference-server starts the given binary with llama-server's arguments on the served GGUF file; a stand-in
    that records them and runs `forja serve` on its port shows the measurement and the side-by-side table."""
    from typer.testing import CliRunner

    from forja.cli import app

    called = tmp_path / "args.json"
    fake = tmp_path / "llama-server"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
open({str(called)!r}, "w").write(json.dumps(args))
port = args[args.index("--port") + 1]
os.execv(sys.executable, [sys.executable, "-m", "forja.cli", "serve", "--model", {str(tiny_model_dir)!r},
                          "--port", port, "--backend", "pytorch"])
""")
    fake.chmod(0o755)
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--model", str(tiny_model_dir), "--max-tokens", "6",
                                      "--clients", "2", "--no-compare", "--backend", "pytorch",
                                      "--reference-server", str(fake), "--json", str(out)])
    assert result.exit_code == 0, result.output
    args = json.loads(called.read_text())
    assert args[args.index("-m") + 1].endswith(".gguf") and args[args.index("-np") + 1] == "2"
    assert "--kv-unified" in args and args[args.index("-c") + 1] == "8192"
    reference = json.loads(out.read_text())["reference_server"]
    assert reference["concurrent"]["errors"] == 0 and reference["concurrent"]["tokens"] > 0
    assert reference["single"]["tokens"] == 6
    assert "llama-server -np 2" in result.stdout and "2 streams: TTFT p50 / p95" in result.stdout
    assert "2 streams, rails off: TTFT p50" in result.stdout and "2 streams: TTFT p50, round 1 / later" in result.stdout
    missing = CliRunner().invoke(app, ["bench", "serve", "--reference-server", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "is not an executable file" in missing.output
