"""The server side of the bridge's TLS, mutual TLS and bearer token.

    ServerTls.from_files("tls.crt", "tls.key")                 # TLS
    ServerTls.from_files("tls.crt", "tls.key", "bridges-ca.crt")  # and client certificates required
    BearerTokenCheck("/run/secrets/bridge-token")              # authorization: Bearer <token>

grpc.health.v1 stays open without a token: Kubernetes probes send none.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio

log = logging.getLogger("milter_policy")

__all__ = ["BearerTokenCheck", "ServerTls"]

_OPEN_PREFIX = "/grpc.health.v1.Health/"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the stubs


@dataclass(frozen=True)
class ServerTls:
    """The policy's certificate and key; ``client_ca`` set: bridges must present a certificate
    that chains to it (mutual TLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> ServerTls:
        """Read PEM files: certificate (chain), private key, and the bridges' CA if any."""
        ca = None if client_ca is None else Path(client_ca).read_bytes()
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), ca)

    def credentials(self) -> grpc.ServerCredentials:
        """The grpc server credentials (client certificates required when client_ca is set)."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


class BearerTokenCheck(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    The token file is read again when it changes, so a rotation needs no restart."""

    def __init__(self, token_file: str) -> None:
        self.path = Path(token_file)
        self._stamp: tuple[int, int] | None = None
        self._expected = b""
        self._load()

    def _load(self) -> bytes:
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_ino) != self._stamp:
                self._expected = b"Bearer " + self.path.read_bytes().strip()
                self._stamp = (stat.st_mtime_ns, stat.st_ino)
        except OSError as exc:
            log.warning("token file %s: %s; keeping the last token", self.path, exc)
        return self._expected

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._load()):
            return handler
        log.warning("refused %s: missing or wrong bearer token", method)
        return _refusing(handler)


def _refusing(handler: Any) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
