"""Forja: fine-tune a small language model on your own data, serve it, and learn from feedback."""

__version__ = "0.1.0"
