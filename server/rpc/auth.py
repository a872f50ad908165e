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

from .interceptors import handler_kind, rebuild, stream_responses, unread
from .logs import event

log = logging.getLogger("q8kv.auth")

# The calling tenant, set by the interceptor for the duration of each RPC.
current_tenant: ContextVar[str] = ContextVar("q8kv_tenant", default="")

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_TENANT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def tenant_of_call(context: grpc.aio.ServicerContext) -> str:
    return current_tenant.get()


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


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class _Grant:
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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses from the call's metadata, before gRPC reads the request: an unauthenticated
    caller cannot make the server receive (and hold) a message of up to the size limit."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in OPEN_METHODS:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        tenant = self.tokens.tenant_for(token) if token else None
        if tenant is None:
            reason = (
                "authorization: expected 'Bearer <token>' metadata, got none"
                if token is None
                else "authorization: unknown token"
            )
            return unread(handler, _deny(reason))
        kind = handler_kind(handler)
        grant = _Grant(self.tokens, token, tenant, method)
        return rebuild(handler, _as_tenant(kind, getattr(handler, kind), grant))


def _deny(reason: str):
    # A coroutine that never touches the request iterator: nothing of the body is read.
    async def deny(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return deny


def _as_tenant(kind: str, inner, grant: _Grant):
    async def checked(requests, context):
        async for request in requests:
            await grant.check(context)  # before the message reaches the service
            yield request

    async def responses(result, context):
        async for response in stream_responses(result):
            await grant.check(context)
            yield response

    async def unary_unary(request, context):
        current_tenant.set(grant.tenant)
        return await inner(request, context)

    async def unary_stream(request, context):
        current_tenant.set(grant.tenant)
        async for response in responses(inner(request, context), context):
            yield response

    async def stream_unary(requests, context):
        current_tenant.set(grant.tenant)
        return await inner(checked(requests, context), context)

    async def stream_stream(requests, context):
        current_tenant.set(grant.tenant)
        async for response in responses(inner(checked(requests, context), context), context):
            yield response

    return {
        "unary_unary": unary_unary, "unary_stream": unary_stream,
        "stream_unary": stream_unary, "stream_stream": stream_stream,
    }[kind]
