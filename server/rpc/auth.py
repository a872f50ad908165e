"""Bearer-token authentication and the tenant of each call.

Tokens come from ``--auth-tokens-file`` (lines ``token tenant``; ``#`` comments; reloaded
on SIGHUP) and/or ``Q8KV_AUTH_TOKENS`` (the same pairs, separated by commas or newlines).
With neither, authentication is off and every caller is tenant "". Tokens are compared as
SHA-256 digests with ``hmac.compare_digest`` against every entry (no early exit), and never
logged. The health service stays open so probes need no secret.

A call without a valid token is refused from its metadata alone, before gRPC reads its
request. A stream re-checks its token at every message once the table was reloaded: a
token removed (or moved to another tenant) ends the streams it opened, unapplied.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from contextvars import ContextVar
from pathlib import Path

import grpc

from ..observability.logs import event

log = logging.getLogger("q8kv.auth")

# The calling tenant, set by the front door (front.py) for the duration of each RPC.
current_tenant: ContextVar[str] = ContextVar("q8kv_tenant", default="")

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_TENANT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def parse_tokens(text: str, source: str) -> dict[bytes, str]:
    """'token tenant' pairs -> {sha256(token): tenant}; ValueError names the bad line."""
    table: dict[bytes, str] = {}
    for number, raw in enumerate(re.split(r"[\n,]", text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _TENANT.match(parts[1]) or len(parts[0]) < 8:
            # Never echo the line: it holds a secret.
            raise ValueError(
                f"{source} entry {number}: expected 'token tenant' (token >= 8 characters, "
                f"tenant of [A-Za-z0-9._:@-]), got {len(parts)} fields"
            )
        table[hashlib.sha256(parts[0].encode()).digest()] = parts[1]
    return table


class TokenTable:
    def __init__(self, path: str | None, env_value: str | None) -> None:
        self.path = Path(path) if path else None
        self.env_value = env_value
        self._table = self._read()
        # Bumped by every reload that took effect: open streams re-check their token only
        # when it changed.
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.env_value)

    def _read(self) -> dict[bytes, str]:
        table = parse_tokens(self.env_value or "", "Q8KV_AUTH_TOKENS")
        if self.path is not None:
            table.update(parse_tokens(self.path.read_text(), str(self.path)))
        return table

    def reload(self) -> None:
        """Re-read the file (SIGHUP); on any error keep the table in force."""
        try:
            table = self._read()
        except (OSError, ValueError) as exc:
            event(log, "auth_reload_failed", level=logging.ERROR, error=str(exc))
            return
        self._table = table
        self.generation += 1
        event(log, "auth_reloaded", tokens=len(table), tenants=len(set(table.values())))

    def tenant_for(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, tenant in self._table.items():  # no early exit: time independent of match
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry of the call's metadata."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Grant:
    """One call's token and tenant; re-validated when the table changed since the last
    check, so a revoked (or reassigned) token ends the streams it opened."""

    def __init__(self, tokens: TokenTable, token: str, tenant: str, method: str) -> None:
        self.tokens, self.token, self.tenant, self.method = tokens, token, tenant, method
        self.generation = tokens.generation

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.generation == self.tokens.generation:
            return
        self.generation = self.tokens.generation
        if self.tokens.tenant_for(self.token) != self.tenant:
            event(log, "auth_revoked_stream", tenant=self.tenant, method=self.method)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: expected a current token, got one revoked or reassigned "
                "since this stream opened",
            )


async def authenticate(
    tokens: TokenTable, method: str, context: grpc.aio.ServicerContext
) -> Grant:
    """The caller's grant, from the call's metadata; UNAUTHENTICATED without a known
    token (the caller's request has not been read yet: see front.py)."""
    token = bearer_token(context.invocation_metadata())
    tenant = tokens.tenant_for(token) if token else None
    if tenant is None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "authorization: expected 'Bearer <token>' metadata, got none"
            if token is None
            else "authorization: unknown token",
        )
    return Grant(tokens, token, tenant, method)
