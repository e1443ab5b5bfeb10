"""The built-in tools a persona may name: calculator (arithmetic parsed, never eval'd), current_time,
knowledge_search (the persona's collections, guarded, with citations), http_get (off by default; allowed
hosts only, size and time limits) and python (off by default; a process of its own with time, memory and
network limits, pandas at hand). Each takes the model's JSON arguments and returns text for the model;
a problem is a ToolFailed whose message the model reads as the observation."""

from __future__ import annotations

import ast
import asyncio
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from forja.config import ForjaError, HttpGetSettings, PythonToolSettings


class ToolFailed(ForjaError):
    """What went wrong in a tool, said to the model as the result of its call."""


SPECS: dict[str, dict[str, Any]] = {
    "calculator": {
        "description": "Exact arithmetic: + - * / // % ** and parentheses, sqrt, abs, round, min, max, log, exp, "
                       "sin, cos, tan, pi, e. Use it for any sum, product, percentage or unit conversion.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                         "description": "For example 437 * 58"}},
                       "required": ["expression"], "additionalProperties": False}},
    "current_time": {
        "description": "The current date and time, in a time zone (IANA name such as Europe/Madrid; UTC if none).",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                       "additionalProperties": False}},
    "knowledge_search": {
        "description": "Search the documents this assistant knows (manuals, policies, price lists) and get the "
                       "passages that answer a question, numbered so the answer can cite them as [1], [2].",
        "parameters": {"type": "object", "properties": {"query": {"type": "string",
                                                                    "description": "What to look for"}},
                       "required": ["query"], "additionalProperties": False}},
    "http_get": {
        "description": "Fetch a web page (text) from an allowed site.",
        "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"],
                       "additionalProperties": False}},
    "python": {
        "description": "Run Python code (pandas available) and get what it prints. Files given to this assistant "
                       "are in the working directory.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"],
                       "additionalProperties": False}},
}

# ------------------------------------------------------------------------------------------------ calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000
MAX_DIGITS = 400
MAX_EXPRESSION_CHARS = 500


def calculator(arguments: dict[str, Any]) -> str:
    expression = str(arguments.get("expression", "")).strip()
    if not expression:
        raise ToolFailed("give an expression, for example 437 * 58")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolFailed(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    if "," in text and not re.search(r"\b(min|max|round)\s*\(", text):
        text = text.replace(",", ".")  # a decimal comma: 3,5 * 2
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolFailed(f"{expression!r} is not an arithmetic expression") from None
    try:
        value = _value(tree.body)
    except ZeroDivisionError:
        raise ToolFailed("division by zero") from None
    except (OverflowError, ValueError) as exc:
        raise ToolFailed(f"cannot compute {expression!r}: {exc}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    shown = repr(value) if isinstance(value, float) else str(value)
    return f"{expression} = {shown}"


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"an exponent above {MAX_EXPONENT}")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, int) and len(str(abs(result))) > MAX_DIGITS:
            raise ValueError(f"a result of more than {MAX_DIGITS} digits")
        return result
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        return _FUNCTIONS[node.func.id](*(_value(arg) for arg in node.args))
    raise ValueError(f"{ast.unparse(node)!r} is not arithmetic (numbers, + - * / // % **, and "
                     f"{', '.join(sorted(_FUNCTIONS))})")


# ------------------------------------------------------------------------------------------------ time


def current_time(arguments: dict[str, Any]) -> str:
    name = str(arguments.get("timezone") or "UTC").strip()
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolFailed(f"unknown time zone {name!r}; use an IANA name such as Europe/Madrid or "
                         "America/Mexico_City") from None
    now = datetime.now(zone)
    return f"{now.strftime('%A %Y-%m-%d %H:%M:%S')} ({name}, UTC{now.strftime('%z')[:3]}:{now.strftime('%z')[3:]})"


# ------------------------------------------------------------------------------------------------ http_get


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == a.lower() or (a.startswith(".") and (host.endswith(a.lower()) or host == a.lower()[1:]))
               for a in allowed)


async def http_get(arguments: dict[str, Any], settings: HttpGetSettings) -> str:
    import httpx

    from forja.data.documents import blocks_text, html_blocks

    url = str(arguments.get("url", "")).strip()
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ToolFailed(f"{url!r} is not an http(s) URL")
    if not host_allowed(parsed.hostname, settings.allow_hosts):
        raise ToolFailed(f"{parsed.hostname} is not an allowed host (serve.tools.http_get.allow_hosts: "
                         f"{', '.join(settings.allow_hosts) or 'none'})")
    body = bytearray()
    try:
        async with httpx.AsyncClient(timeout=settings.timeout_seconds, follow_redirects=False) as client:
            async with client.stream("GET", url, headers={"User-Agent": "forja-agent"}) as response:
                async for block in response.aiter_bytes():
                    body += block
                    if len(body) >= settings.max_bytes:
                        break
                status, kind = response.status_code, response.headers.get("content-type", "")
    except httpx.HTTPError as exc:
        raise ToolFailed(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
    text = bytes(body[: settings.max_bytes]).decode("utf-8", errors="replace")
    if "html" in kind:
        text = blocks_text(html_blocks(text))
    cut = " (cut at serve.tools.http_get.max_bytes)" if len(body) >= settings.max_bytes else ""
    return f"HTTP {status} {url}{cut}\n{text}"


# ------------------------------------------------------------------------------------------------ python

# Runs first in the child: its own limits, no new processes, no files outside its working directory and the
# Python installation, and (unless allowed) no sockets. An audit hook cannot be removed by the code after it.
PRELUDE = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({file_bytes}, {file_bytes}))
_READABLE = tuple(os.path.realpath(p) + os.sep for p in {readable!r})
_WORK = os.path.realpath(os.getcwd()) + os.sep
_NETWORK = {network}

def _guard(event, args):
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "pty.spawn"):
        raise PermissionError("the python tool runs no other programs")
    if not _NETWORK and event in ("socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
        raise PermissionError("the python tool has no network (serve.tools.python.network)")
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        writing = isinstance(args[1], str) and any(c in args[1] for c in "wax+")
        if not (path + os.sep).startswith(_WORK) and (writing or not (path + os.sep).startswith(_READABLE)):
            raise PermissionError(f"the python tool reads only its working directory ({{os.fsdecode(args[0])}})")

sys.addaudithook(_guard)
del resource
"""
OUTPUT_BYTES = 1_000_000  # read from a run at most (it is cut to serve.tools.max_result_chars anyway)


def _readable() -> list[str]:
    """What code may read besides its working directory: the Python installation (its modules: pandas...)."""
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), sysconfig.get_paths()["stdlib"],
             "/usr/share/zoneinfo", "/etc/localtime", "/dev/null", "/dev/urandom", "/proc/self", "/sys/devices/system/cpu"}
    return sorted(p for p in paths if p)


async def python(arguments: dict[str, Any], settings: PythonToolSettings, files: list[Path]) -> str:
    code = str(arguments.get("code", ""))
    if not code.strip():
        raise ToolFailed("give the code to run")
    with tempfile.TemporaryDirectory(prefix="forja-python-") as work:
        for path in files:
            shutil.copy(path, Path(work) / path.name)
        prelude = PRELUDE.format(memory=settings.memory_mb * 2**20, cpu=math.ceil(settings.timeout_seconds) + 1,
                                 network=settings.network, readable=_readable(), file_bytes=64 * 2**20)
        script = Path(work) / ".run.py"
        script.write_text(prelude + "\n" + textwrap.dedent(code), encoding="utf-8")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", str(script), cwd=work, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": work, "MPLBACKEND": "Agg"})

        async def read() -> bytes:
            assert process.stdout is not None
            output = bytearray()
            while len(output) < OUTPUT_BYTES:
                block = await process.stdout.read(65536)
                if not block:
                    break
                output += block
            if len(output) >= OUTPUT_BYTES:  # it goes on printing: enough was read
                _kill(process)
            await process.wait()
            return bytes(output[:OUTPUT_BYTES])

        try:
            output = await asyncio.wait_for(read(), settings.timeout_seconds)
        except asyncio.TimeoutError:
            _kill(process)
            await process.wait()
            raise ToolFailed(f"the code ran longer than {settings.timeout_seconds:g} s and was stopped") from None
        except asyncio.CancelledError:
            _kill(process)
            raise
    text = output.decode("utf-8", errors="replace").replace(str(script), "<code>")
    if process.returncode and len(output) < OUTPUT_BYTES:
        raise ToolFailed(f"the code failed (exit {process.returncode}):\n{text.strip()[-2000:]}")
    return text.strip() or "(the code printed nothing; print() what you need)"


def _kill(process: Any) -> None:
    """The run and anything it started (its own session)."""
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
