"""A small MCP server of the tests' own (stdio): the shop's order lookup an agent persona calls."""

from typing import Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

app = MCPServer("orders")
ORDERS = {"A17": "shipped on 2026-11-28 by Correos, tracking PK7731", "B02": "waiting for payment"}


@app.tool()
def order_status(order_id: Literal["A17", "B02"]) -> str:
    """The status of a shop order, by its id."""
    return f"order {order_id}: {ORDERS[order_id]}"


@app.tool()
def broken(code: Literal["E1"]) -> str:
    """Always fails (to test how a failing tool reaches the model)."""
    raise ToolError(f"the orders database is down ({code})")


if __name__ == "__main__":
    app.run()
