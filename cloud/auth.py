"""Bearer-token authentication for the Latentcast service (a ``grpc.aio`` server interceptor).

Every call must carry the metadata ``authorization: Bearer <token>`` with one of the configured
tokens, else it ends with ``UNAUTHENTICATED`` before the servicer runs. The interceptor is
installed on the Latentcast server only; the maintenance server (health, reflection) has none,
so load balancers and probes need no token. Tokens are compared in constant time and never
logged. With mTLS (``server.tls_client_ca_file``) the client certificate is checked by the TLS
layer before this interceptor sees the call.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger(__name__)

__all__ = ["BearerTokenInterceptor", "AUTH_METADATA_KEY"]

AUTH_METADATA_KEY = "authorization"
_SCHEME = "bearer "


def _abort_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode,
                   details: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that ends the call with ``code``."""

    async def unary_abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def stream_abort(_request: Any, context: grpc.aio.ServicerContext):  # async generator
        await context.abort(code, details)
        yield  # pragma: no cover - unreachable, makes this an async generator

    req_stream = bool(handler and handler.request_streaming)
    resp_stream = bool(handler and handler.response_streaming)
    kw = {}
    if handler is not None:
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if req_stream and resp_stream:
        return grpc.stream_stream_rpc_method_handler(stream_abort, **kw)
    if req_stream:
        return grpc.stream_unary_rpc_method_handler(unary_abort, **kw)
    if resp_stream:
        return grpc.unary_stream_rpc_method_handler(stream_abort, **kw)
    return grpc.unary_unary_rpc_method_handler(unary_abort, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls whose ``authorization`` metadata is not ``Bearer <one of tokens>``.

    ``on_reject`` (optional) is called with a short reason ("missing", "malformed", "unknown")
    for each rejected call, e.g. to count it in metrics.
    """

    def __init__(self, *, tokens: Iterable[str], on_reject: Callable[[str], None] | None = None) -> None:
        self._tokens = tuple(t.encode("utf-8") for t in tokens if t)
        if not self._tokens:
            raise ValueError("BearerTokenInterceptor needs at least one non-empty token")
        self._on_reject = on_reject

    def _check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the call is authorised, else the reason."""
        value = None
        for key, val in metadata or ():
            if key.lower() == AUTH_METADATA_KEY:
                value = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
                break
        if value is None:
            return "missing"
        if not value[: len(_SCHEME)].lower() == _SCHEME:
            return "malformed"
        presented = value[len(_SCHEME):].strip().encode("utf-8")
        ok = False
        for token in self._tokens:  # no early exit: the time does not depend on which token matched
            ok |= hmac.compare_digest(presented, token)
        return None if ok else "unknown"

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
        log.info("rejected %s: %s bearer token", handler_call_details.method, reason)
        handler = await continuation(handler_call_details)
        details = {"missing": "missing 'authorization: Bearer <token>' metadata",
                   "malformed": "the authorization metadata must be 'Bearer <token>'",
                   "unknown": "unknown bearer token"}[reason]
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, details)
