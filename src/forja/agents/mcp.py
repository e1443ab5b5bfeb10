"""MCP servers (serve.mcp_servers) held open for the server's life with the official `mcp` Client: a stdio
command or a streamable HTTP URL, connected and its tools listed at start, each in a task of its own (the
client's context is entered and left in one task); a server that cannot start is reported, and a persona's
call to it answers the model with that reason."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from forja.agents.builtin import ToolFailed
from forja.config import McpServer

log = logging.getLogger("forja.agents")


class McpHub:
    def __init__(self, servers: dict[str, McpServer]):
        self.servers = servers
        self.clients: dict[str, Any] = {}
        self.tools: dict[str, list[Any]] = {}  # each server's tools as it listed them (name, description, schema)
        self.errors: dict[str, str] = {}
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Connect every server and list its tools (each within its timeout_seconds)."""
        ready = {name: asyncio.Event() for name in self.servers}
        self._tasks = [asyncio.create_task(self._hold(name, config, ready[name]), name=f"mcp-{name}")
                       for name, config in self.servers.items()]
        for name, config in self.servers.items():
            try:
                await asyncio.wait_for(ready[name].wait(), config.timeout_seconds)
            except asyncio.TimeoutError:
                self.errors.setdefault(name, f"did not answer within {config.timeout_seconds:g} s")
        for name, error in self.errors.items():
            log.error("MCP server %s is not available: %s", name, error)

    async def _hold(self, name: str, config: McpServer, ready: asyncio.Event) -> None:
        from mcp import Client, StdioServerParameters

        target: Any = config.url or StdioServerParameters(command=config.command[0], args=config.command[1:],
                                                          env=config.env or None)
        try:
            async with Client(target) as client:
                listed = await client.list_tools()
                self.clients[name], self.tools[name] = client, list(listed.tools)
                ready.set()
                await self._closing.wait()
        except Exception as exc:  # noqa: BLE001 - a server that cannot start is reported, never fatal
            self.errors[name] = f"{type(exc).__name__}: {exc}"
        finally:
            self.clients.pop(name, None)
            ready.set()

    async def call(self, server: str, tool: str, arguments: dict[str, Any]) -> str:
        client = self.clients.get(server)
        if client is None:
            raise ToolFailed(f"the MCP server {server} is not available ({self.errors.get(server, 'stopped')})")
        result = await client.call_tool(tool, arguments)
        text = "\n".join(getattr(part, "text", None) or f"[{getattr(part, 'type', 'content')}]"
                         for part in result.content) or str(getattr(result, "structured_content", "") or "")
        if result.is_error:
            raise ToolFailed(text or f"{tool} failed")
        return text

    async def stop(self) -> None:
        self._closing.set()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:  # noqa: BLE001
                pass
