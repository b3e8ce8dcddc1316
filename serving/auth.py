"""API credentials and scopes: which bearer token may call which endpoint.

Owns the three credentials (features, predict, admin), their token files in the data dir
(generated once, mode 0600) and the check that answers 401 (no or unknown token) or 403 (wrong scope).
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

# What each credential may do. The admin credential holds every scope: operators also read and predict.
FEATURES, PREDICT, ADMIN = "features", "predict", "admin"
SCOPES = (FEATURES, PREDICT, ADMIN)
GRANTS = {FEATURES: frozenset({FEATURES}), PREDICT: frozenset({PREDICT}),
          ADMIN: frozenset({FEATURES, PREDICT, ADMIN})}
# the setting and the generated file of each credential
SETTING = {FEATURES: "api_token_features", PREDICT: "api_token_predict", ADMIN: "api_token"}
TOKEN_FILE = {FEATURES: "api-token-features", PREDICT: "api-token-predict", ADMIN: "api-token"}
# answered without a token: probes and scrapers carry none (/ready says more to the admin scope)
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
ANY = "any"  # the docs and unknown paths: any valid credential
NONE: frozenset[str] = frozenset()


def required_scope(path: str) -> str | None:
    """The scope a path needs: None when public, ANY when any credential will do.

    >>> required_scope("/predict"), required_scope("/models/fraud/promote"), required_scope("/ready")
    ('predict', 'admin', None)
    """
    if path in PUBLIC_PATHS:
        return None
    if path == "/get-online-features":
        return FEATURES
    if path == "/predict":
        return PREDICT
    if path == "/models" or path.startswith("/models/"):
        return ADMIN
    return ANY


def resolve_credentials(settings: Settings) -> dict[str, str]:
    """The token of every scope: its setting, else its file in the data dir, else a new one written there (0600)."""
    return {scope: _resolve(settings, scope) for scope in SCOPES}


def resolve_token(settings: Settings) -> str:
    """The admin token (FRESHET_API_TOKEN or <data_dir>/api-token): every scope."""
    return _resolve(settings, ADMIN)


def _resolve(settings: Settings, scope: str) -> str:
    configured = getattr(settings, SETTING[scope])
    if configured:
        return configured
    path = token_path(settings, scope)
    if path.is_file() and (path.stat().st_mode & 0o077) == 0:
        token = path.read_text().strip()
        if token:
            log.info("%s token read from %s", scope, path)
            return token
    settings.data_path.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    log.warning("FRESHET_%s is not set: generated the %s token, written to %s (mode 0600); "
                "send it as 'Authorization: Bearer <token>'", SETTING[scope].upper(), scope, path)
    return token


def token_path(settings: Settings, scope: str = ADMIN) -> Path:
    """Where the generated token of a scope lives when its setting is empty (for the CLI to print)."""
    return settings.data_path / TOKEN_FILE[scope]


class ScopedAuth:
    """Lets a request through when its path is public or its bearer token holds the scope the path needs.

    `check` returns the scopes the request's credential holds (none for an anonymous probe).

    >>> auth = ScopedAuth({"admin": "a-token", "predict": "p-token", "features": "f-token"})
    >>> sorted(auth.check("/predict", [(b"authorization", b"Bearer p-token")]))
    ['predict']
    >>> auth.check("/health", [])
    frozenset()
    >>> auth.check("/models/fraud/promote", [(b"authorization", b"Bearer p-token")])
    Traceback (most recent call last):
    ...
    freshet.serving.errors.HTTPError: this endpoint needs the 'admin' scope (FRESHET_API_TOKEN); the credential sent holds 'predict'
    >>> auth.check("/predict", [(b"authorization", b"Bearer guess")])
    Traceback (most recent call last):
    ...
    freshet.serving.errors.HTTPError: missing or wrong bearer token; send 'Authorization: Bearer <token>'
    """

    __slots__ = ("_credentials",)

    def __init__(self, tokens: dict[str, str]):
        missing = [s for s in SCOPES if not tokens.get(s)]
        if missing:
            raise ValueError(f"no token for scope(s) {', '.join(missing)}")
        if len({tokens[s] for s in SCOPES}) != len(SCOPES):
            raise ValueError("the features, predict and admin tokens must differ from each other")
        self._credentials = [(("Bearer " + tokens[s]).encode(), GRANTS[s]) for s in SCOPES]

    def scopes(self, headers: list[tuple[bytes, bytes]]) -> frozenset[str]:
        """The scopes of the request's bearer token (the first Authorization header counts); none if unknown."""
        for name, value in headers:
            if name == b"authorization":
                granted = NONE
                for expected, scopes in self._credentials:
                    # constant time, and every credential compared: no guessing byte by byte or by timing
                    if hmac.compare_digest(value, expected):
                        granted = scopes
                return granted
        return NONE

    def check(self, path: str, headers: list[tuple[bytes, bytes]]) -> frozenset[str]:
        """The request's scopes; raise 401 without a valid token, 403 when it lacks the path's scope."""
        needed = required_scope(path)
        granted = self.scopes(headers)
        if needed is None:
            return granted
        if not granted:
            raise HTTPError(401, "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                            headers=[(b"www-authenticate", b"Bearer")])
        if needed != ANY and needed not in granted:
            held = "', '".join(s for s in SCOPES if s in granted)
            raise HTTPError(403, f"this endpoint needs the {needed!r} scope (FRESHET_{SETTING[needed].upper()}); "
                                 f"the credential sent holds '{held}'",
                            headers=[(b"www-authenticate", f'Bearer scope="{needed}"'.encode())])
        return granted
