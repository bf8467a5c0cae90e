"""Who may call the Latentcast service, and for which cameras.

Authentication (who) happens in a ``grpc.aio`` server interceptor, :class:`BearerTokenInterceptor`:
every call must carry the metadata ``authorization: Bearer <token>`` with a known token, else it
ends with UNAUTHENTICATED before the servicer runs. Authorization (what) happens in the servicer,
which resolves the same metadata to a :class:`Principal` with :meth:`TokenRegistry.principal`
(one definition of the token check, used by both) and asks it:

==========  ============================================================================
role        may
==========  ============================================================================
publish     open ``Stream`` for a camera_id matching one of its globs
subscribe   ``Subscribe`` to cameras matching its globs (a request for "any camera" gets
            only those)
admin       both, for the cameras matching its globs (``"*"``: every camera)
==========  ============================================================================

A refused call ends with PERMISSION_DENIED and changes nothing: a hijacking stream neither ends the
camera's live stream nor touches its sequence state.

Tokens come from ``server.tokens_file`` (YAML; :func:`load_token_file`)::

    tokens:
      - name: gate-3              # for logs and errors (the token itself is never logged)
        sha256: 5e88...           # hex SHA-256 of the token (``latentcast token new`` prints one)
        role: publish             # publish | subscribe | admin
        cameras: ["gate-*"]       # fnmatch globs of camera ids
      - name: dashboard
        token: dev-only-secret    # or the token in clear (tests, development)
        role: subscribe
        cameras: ["*"]

and from ``server.tokens`` (a plain list, as before this file existed): each is an admin of every
camera. Presented tokens are hashed once and compared with every entry's hash with
``hmac.compare_digest``, all entries every time, so the time does not depend on which entry (if
any) matched; one token in two entries is an error (which role would it have?). A served call whose
metadata does not resolve (the interceptor let it through) is :data:`NOBODY`, who may do nothing. The
maintenance server (health, reflection) has no interceptor: probes need no
token. With mTLS the client certificate is checked by the TLS layer before this.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

__all__ = ["AUTH_METADATA_KEY", "ROLES", "BearerTokenInterceptor", "HANDLER_KINDS", "NOBODY", "Principal",
           "TokenEntry", "TokenRegistry", "hash_token", "load_token_file", "new_token", "REJECT_DETAILS"]

AUTH_METADATA_KEY = "authorization"
_SCHEME = "bearer "
ROLES = ("publish", "subscribe", "admin")
# method handler factory by (request streaming, response streaming)
HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}
#: how long a refused streaming call may take to deliver its first message before the refusal: a client writes its
#: first message (the edge: the stream header) as the call opens, and a refusal that overtakes that write leaves the
#: client with gRPC's "Internal error from Core" (INTERNAL) instead of UNAUTHENTICATED
REFUSE_AFTER_FIRST_MESSAGE_S = 1.0

REJECT_DETAILS = {"missing": "missing 'authorization: Bearer <token>' metadata",
                  "malformed": "the authorization metadata must be 'Bearer <token>'",
                  "unknown": "unknown bearer token"}


def hash_token(token: str) -> bytes:
    """The SHA-256 digest a token file stores (as hex) for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a token's name, role and camera globs."""

    name: str
    role: str
    cameras: tuple[str, ...]

    def _matches(self, camera_id: str) -> bool:
        return any(fnmatch.fnmatchcase(camera_id, g) for g in self.cameras)

    def may_publish(self, camera_id: str) -> bool:
        return self.role in ("publish", "admin") and self._matches(camera_id)

    def may_subscribe(self, camera_id: str) -> bool:
        return self.role in ("subscribe", "admin") and self._matches(camera_id)

    def describe(self) -> str:
        return f"token {self.name!r} (role {self.role}, cameras {', '.join(self.cameras) or '(none)'})"


NOBODY = Principal(name="(no valid token)", role="none", cameras=())  # may do nothing: what an unresolved caller is


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token: its digest and what it may do."""

    digest: bytes  # SHA-256 of the token
    principal: Principal


def _entry_error(source: str, i: int, name: str | None, msg: str) -> ValueError:
    who = f"entry {i}" + (f" ({name!r})" if name else "")
    return ValueError(f"{source}: {who}: {msg}")


def _parse_entries(items: Any, source: str) -> list[TokenEntry]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: 'tokens' must be a non-empty list of entries "
                         "(name, sha256 or token, role, cameras)")
    out: list[TokenEntry] = []
    names: set[str] = set()
    for i, e in enumerate(items):
        if not isinstance(e, dict):
            raise _entry_error(source, i, None, f"must be a mapping, got {type(e).__name__}")
        name = e.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _entry_error(source, i, None, "needs a non-empty 'name'")
        unknown = sorted(set(e) - {"name", "sha256", "token", "role", "cameras"})
        if unknown:
            raise _entry_error(source, i, name, f"unknown key(s) {unknown} (valid: name, sha256, token, role, "
                                                "cameras)")
        if name in names:
            raise _entry_error(source, i, name, "duplicate name")
        names.add(name)
        if ("sha256" in e) == ("token" in e):
            raise _entry_error(source, i, name, "needs exactly one of 'sha256' (hex digest) or 'token'")
        if "sha256" in e:
            hx = e["sha256"]
            try:
                digest = bytes.fromhex(hx) if isinstance(hx, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise _entry_error(source, i, name, f"sha256 {str(hx)[:80]!r} is not 64 hex digits")
        else:
            tok = e["token"]
            if not isinstance(tok, str) or not tok or any(c.isspace() for c in tok):
                raise _entry_error(source, i, name, "token must be a non-empty string without whitespace")
            digest = hash_token(tok)
        role = e.get("role")
        if role not in ROLES:
            raise _entry_error(source, i, name, f"role {role!r} is not one of {', '.join(ROLES)}")
        cams = e.get("cameras")
        if isinstance(cams, str):
            cams = [cams]
        if not isinstance(cams, list) or not cams or not all(isinstance(c, str) and c for c in cams):
            raise _entry_error(source, i, name, "cameras must be a non-empty list of camera id globs, "
                                                "e.g. ['gate-*'] or ['*']")
        out.append(TokenEntry(digest=digest, principal=Principal(name=name, role=role, cameras=tuple(cams))))
    return out


def load_token_file(path: str | Path) -> list[TokenEntry]:
    """The entries of a token file (format in the module doc); ValueError naming the file and entry."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"server.tokens_file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"server.tokens_file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"tokens"}:
        raise ValueError(f"server.tokens_file {p} must hold one key, 'tokens', with a list of entries")
    return _parse_entries(data["tokens"], f"server.tokens_file {p}")


class TokenRegistry:
    """The accepted tokens; resolves the ``authorization`` metadata to a :class:`Principal`."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        if not entries:
            raise ValueError("a TokenRegistry needs at least one token")
        seen: dict[bytes, str] = {}
        for e in entries:  # one token, two entries: which role and cameras would it have?
            if e.digest in seen:
                raise ValueError(f"server.tokens / server.tokens_file: entries {seen[e.digest]!r} and "
                                 f"{e.principal.name!r} hold the same token; give each entry its own token")
            seen[e.digest] = e.principal.name
        self.entries = tuple(entries)

    @classmethod
    def from_config(cls, *, tokens: Iterable[str] = (), tokens_file: str = "") -> TokenRegistry | None:
        """``server.tokens`` (each an admin of every camera) plus ``server.tokens_file``; None when both
        are empty (authentication off)."""
        entries = [TokenEntry(digest=hash_token(t), principal=Principal(name=f"server.tokens[{i}]", role="admin",
                                                                        cameras=("*",)))
                   for i, t in enumerate(tokens) if t]
        if tokens_file:
            entries += load_token_file(tokens_file)
        return cls(entries) if entries else None

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> tuple[Principal | None, str]:
        """(principal, "") for a known token, else (None, reason): "missing", "malformed" or "unknown"."""
        value = None
        for key, val in metadata or ():
            if key.lower() == AUTH_METADATA_KEY:
                value = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
                break
        if value is None:
            return None, "missing"
        if value[: len(_SCHEME)].lower() != _SCHEME:
            return None, "malformed"
        digest = hash_token(value[len(_SCHEME):].strip())
        found = None
        for e in self.entries:  # every entry, no early exit: the time does not tell which matched
            ok = hmac.compare_digest(digest, e.digest)
            found = e.principal if ok and found is None else found
        return (found, "") if found is not None else (None, "unknown")

    def principal(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal | None:
        return self.authenticate(metadata)[0]


async def _first_message(requests: Any) -> None:
    """Wait (at most :data:`REFUSE_AFTER_FIRST_MESSAGE_S`) for a refused call's first message and drop it, so that
    the client's first write lands before the refusal and the client reads UNAUTHENTICATED."""
    try:
        await asyncio.wait_for(requests.__anext__(), REFUSE_AFTER_FIRST_MESSAGE_S)
    except (asyncio.TimeoutError, StopAsyncIteration, grpc.RpcError):
        pass


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls whose ``authorization`` metadata is not ``Bearer <a known token>`` (UNAUTHENTICATED).

    ``registry`` holds the tokens (or ``tokens``: a plain list, each an admin of every camera).
    ``on_reject`` (optional) is called with a short reason ("missing", "malformed", "unknown") for each
    rejected call, e.g. to count it in metrics. Subclasses may override :meth:`log_refusal` to log the peer.
    """

    def __init__(self, *, registry: TokenRegistry | None = None, tokens: Iterable[str] = (),
                 on_reject: Callable[[str], None] | None = None) -> None:
        if registry is None:
            registry = TokenRegistry.from_config(tokens=tokens)
        if registry is None:
            raise ValueError("BearerTokenInterceptor needs at least one non-empty token")
        self.registry = registry
        self._on_reject = on_reject

    def _check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the call is authenticated, else the reason."""
        principal, reason = self.registry.authenticate(metadata)
        return None if principal is not None else reason

    def log_refusal(self, context: grpc.aio.ServicerContext, method: str, reason: str) -> None:
        """Log a refused call; the default logs at INFO without the peer (subclasses may add it)."""
        log.info("rejected %s: %s bearer token", method, reason)

    async def refuse(self, context: grpc.aio.ServicerContext, method: str, reason: str) -> None:
        """End a refused call (UNAUTHENTICATED) after :meth:`log_refusal`."""
        self.log_refusal(context, method, reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REJECT_DETAILS[reason])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        reason = self._check(handler_call_details.invocation_metadata)
        if reason is None:
            return await continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(reason)
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        refuse = self.refuse

        req_stream = bool(handler and handler.request_streaming)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
            if req_stream:
                await _first_message(request)
            await refuse(context, method, reason)

        async def stream(request: Any, context: grpc.aio.ServicerContext):  # async generator
            await unary(request, context)
            yield  # pragma: no cover - unreachable, makes this an async generator

        resp_stream = bool(handler and handler.response_streaming)
        kw = {}
        if handler is not None:
            kw = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        return HANDLER_KINDS[(req_stream, resp_stream)](stream if resp_stream else unary, **kw)
