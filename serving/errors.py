"""Errors as HTTP answers: HTTPError (status, message, the request field it concerns).

Owns the JSON error body and the status each error of the read path maps to.
"""

from __future__ import annotations

from typing import Any

import orjson

from freshet.serving.online import RedisUnavailable, RequestError, UnknownFeature

# the content type of every JSON answer, errors included
JSON = b"application/json"


class HTTPError(Exception):
    """An answer other than 200: status, a message, and the request field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: list | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or []

    def body(self) -> bytes:
        doc: dict[str, Any] = {"detail": self.message, "status": self.status}
        if self.field:
            doc["field"] = self.field
        return orjson.dumps(doc)


# what a handler may raise for as_http_error to answer
ANSWERED = (HTTPError, RequestError, UnknownFeature, RedisUnavailable)


def as_http_error(exc: Exception) -> HTTPError:
    """The answer for an error the read path raises: 422 bad field, 404 unknown name, 503 Redis down.

    >>> as_http_error(RequestError("entities.card_id", "must be a list")).body()
    b'{"detail":"must be a list","status":422,"field":"entities.card_id"}'
    """
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, RequestError):
        return HTTPError(422, exc.message, exc.field)
    if isinstance(exc, UnknownFeature):
        return HTTPError(404, str(exc))
    if isinstance(exc, RedisUnavailable):
        return HTTPError(503, f"the online store is unavailable: {exc}", headers=[(b"retry-after", b"1")])
    raise TypeError(exc)
