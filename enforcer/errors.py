"""The enforcer's error vocabulary: the base exception every refusal derives from.

An :class:`EnforcerError` carries the HTTP status the client gets; subclasses add what their
step knows.
"""

from __future__ import annotations


class EnforcerError(Exception):
    """A refusal with the HTTP status the client gets."""

    status: int


class UpstreamError(EnforcerError):
    """The app could not be reached or answered garbage; ``kind`` labels the metric."""

    def __init__(self, kind: str, status: int) -> None:
        self.kind = kind
        self.status = status
        super().__init__(kind)
