"""The HTTP server: OpenAI-compatible API, the classic /predict, /health and the web chat page.

`forja serve` runs it; `create_app` in app.py builds the FastAPI application.
"""
