"""API tokens: where the bearer token comes from and which requests must carry it.

Owns the token file in the data dir (generated once, mode 0600) and the bearer check.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from freshet.settings import Settings
from freshet.serving.errors import HTTPError

log = logging.getLogger("freshet.serving")

TOKEN_FILE = "api-token"
# answered without a token: probes and scrapers carry none
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})


def resolve_token(settings: Settings) -> str:
    """settings.api_token, else the token in <data_dir>/api-token, else a new one written there (0600)."""
    if settings.api_token:
        return settings.api_token
    path = token_path(settings)
    if path.is_file() and (path.stat().st_mode & 0o077) == 0:
        token = path.read_text().strip()
        if token:
            log.info("API token read from %s", path)
            return token
    settings.data_path.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    log.warning("FRESHET_API_TOKEN is not set: generated an API token, written to %s (mode 0600); "
                "send it as 'Authorization: Bearer <token>'", path)
    return token


def token_path(settings: Settings) -> Path:
    """Where the generated API token lives when FRESHET_API_TOKEN is not set (for the CLI to print)."""
    return settings.data_path / TOKEN_FILE


class BearerAuth:
    """Lets a request through when its path is public or it carries `Authorization: Bearer <token>`.

    >>> auth = BearerAuth("s3cret")
    >>> auth.check("/predict", [(b"authorization", b"Bearer s3cret")])
    >>> auth.check("/health", [])
    >>> auth.check("/predict", [(b"authorization", b"Bearer guess")])
    Traceback (most recent call last):
    ...
    freshet.serving.errors.HTTPError: missing or wrong bearer token; send 'Authorization: Bearer <token>'
    """

    __slots__ = ("_expected",)

    def __init__(self, token: str):
        self._expected = ("Bearer " + token).encode()

    def check(self, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        """Raise 401 unless the request may pass; the first Authorization header counts."""
        if path in PUBLIC_PATHS:
            return
        for name, value in headers:
            if name == b"authorization":
                if hmac.compare_digest(value, self._expected):  # constant time: no guessing byte by byte
                    return
                break
        raise HTTPError(401, "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                        headers=[(b"www-authenticate", b"Bearer")])
