"""The errors of `forja knowledge`, below the index and its two stores so that both can raise them."""

from __future__ import annotations

from forja.config import ForjaError


class KnowledgeError(ForjaError):
    """A collection or path that `forja knowledge` cannot use."""


class UnknownCollection(KnowledgeError):
    """No collection has this name."""
