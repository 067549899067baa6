"""TLS, mutual TLS and a bearer token towards the policy.

The token file is read again when it changes (Kubernetes rotates projected
service-account tokens in place), so a rotation needs no restart; a token
file that cannot be read later keeps the last token and logs why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("milter_bridge.upstream")

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Tls:
    """What the channel needs: None fields mean grpc's defaults (system roots, no client cert)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def options(self) -> list[tuple[str, object]]:
        # The name the server's certificate must carry, when it is not the target's host.
        return (
            []
            if self.server_name is None
            else [("grpc.ssl_target_name_override", self.server_name)]
        )


def load_tls(*, ca: str | None, cert: str | None, key: str | None, server_name: str | None) -> Tls:
    """Reads the files named in the configuration (already checked to be PEM at start)."""

    def read(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return Tls(ca=read(ca), cert=read(cert), key=read(key), server_name=server_name)


class BearerToken:
    """``authorization: Bearer <token>`` for every call, from a file watched for changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._metadata: Metadata = ()
        self.metadata()

    def metadata(self) -> Metadata:
        try:
            stat = Path(self.path).stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
            if stamp != self._stamp:
                token = Path(self.path).read_text().strip()
                self._metadata = (("authorization", f"Bearer {token}"),)
                self._stamp = stamp
        except OSError as exc:
            log.warning("--upstream-token-file %s: %s; keeping the last token", self.path, exc)
        return self._metadata


def no_metadata() -> Metadata:
    return ()
