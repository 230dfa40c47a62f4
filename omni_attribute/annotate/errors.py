"""Errors of the annotation pipeline. Every message says what went wrong and what to do."""

from __future__ import annotations

from ..errors import OmniAttributeError


class AnnotateError(OmniAttributeError):
    """Bad input, configuration or files for annotation."""


class EndpointError(AnnotateError):
    """The chat-completions endpoint refused the run as a whole (wrong key, unknown model, unreachable):
    retrying would not help, so the run stops with this message."""


class AnswerRejected(Exception):
    """A model's answer could not be parsed, repaired or validated; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
