"""The one error type of the HTTP API: an HTTP status, a stable code and a message for people.

Every 4xx/5xx answer of ``medxfer serve`` is ``{"error": {"code": ..., "message": ...}}``. Messages
name the problem and the image by its index in the request, never a file name (names can hold
patient names), a header value or a traceback.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx), ``code`` (snake_case), ``message`` and
    extra response ``headers`` (e.g. ``Retry-After`` on a 503)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
