"""The runtime's bearer token: where it comes from and how a request's header is checked."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from clora.constants import TOKEN_ENV, TOKEN_FILE_ENV


class TokenMissing(RuntimeError):
    """No token was configured and insecure mode was not asked for."""


def load_token(environ: dict[str, str] | None = None) -> str:
    """The token from CLORA_RUNTIME_TOKEN, else from the file CLORA_RUNTIME_TOKEN_FILE names.

    A Secret mounted as a file is the usual source in a pod; surrounding whitespace (the trailing
    newline editors and `echo` add) is not part of the token.
    """
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    if not token and env.get(TOKEN_FILE_ENV):
        path = Path(env[TOKEN_FILE_ENV])
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise TokenMissing(f"cannot read {TOKEN_FILE_ENV}={path}: {e.strerror}") from e
    if not token:
        raise TokenMissing(
            f"no API token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} "
            "(or pass --insecure-no-auth for a local experiment on a trusted machine)"
        )
    if not all("!" <= c <= "~" for c in token):
        # An HTTP header carries bytes, not text: no client could send a token with other characters.
        source = TOKEN_ENV if env.get(TOKEN_ENV, "").strip() else TOKEN_FILE_ENV
        raise TokenMissing(
            f"the API token from {source} must be printable ASCII without spaces (characters ! to ~),"
            " as an HTTP header carries it; generate one with e.g. `openssl rand -hex 32`"
        )
    return token


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries exactly this bearer token.

    The comparison is constant-time so response timing tells nothing about how much of a guess
    was right; the scheme name is case-insensitive (RFC 6750).
    """
    if not authorization:
        return False
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode("utf-8"), token.encode("utf-8"))
