"""TLS from certificate files: the gateway's and the worker's listeners, and the gateway's
connections to workers.

Both sides read PEM files named on the command line. Files are loaded once at start, so a
missing file or a key that does not match its certificate stops the process with one line
saying which (`TLSConfigError`), rather than failing each handshake later. Listeners accept
TLS 1.2 and newer (gRPC's own floor is also 1.2). With a client CA, a listener requires a
certificate signed by it (mTLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc


class TLSConfigError(Exception):
    """A TLS file is missing, unreadable or does not fit (a one-line message for operators)."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} {path!r}: {e.strerror or e}") from None


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, what: str) -> None:
    """Load a certificate and its key into `ctx`, saying which file is wrong if one is."""
    _read(cert, f"{what} certificate")  # a clear "no such file" before OpenSSL's terser one
    _read(key, f"{what} key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        mismatch = "MISMATCH" in str(e)
        reason = "the key does not match the certificate" if mismatch else f"not PEM ({e})"
        raise TLSConfigError(f"{what} certificate {cert!r} / key {key!r}: {reason}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, what: str) -> None:
    _read(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TLSConfigError(f"{what} {ca!r}: not a PEM certificate bundle ({e})") from None


@dataclass(frozen=True)
class ServerTLS:
    """A listener's certificate and key and, for mTLS, the CA its callers must present a
    certificate from."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_files(
        cls, cert: str | None, key: str | None, client_ca: str | None = None, flag: str = "--tls"
    ) -> ServerTLS | None:
        """None when no certificate is configured; raises TLSConfigError if the files are
        incomplete or do not load."""
        if not cert and not key:
            if client_ca:
                raise TLSConfigError(f"{flag}-client-ca needs {flag}-cert and {flag}-key")
            return None
        if not cert or not key:
            raise TLSConfigError(f"{flag}-cert and {flag}-key go together")
        tls = cls(cert, key, client_ca or None)
        tls.ssl_context()  # validates every file now
        return tls

    def ssl_context(self) -> ssl.SSLContext:
        """For aiohttp listeners."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(ctx, self.cert, self.key, "TLS")
        if self.client_ca:
            _load_ca(ctx, self.client_ca, "TLS client CA")
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For `add_secure_port`."""
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=_read(self.client_ca, "TLS client CA") if self.client_ca else None,
            require_client_auth=bool(self.client_ca),
        )


@dataclass(frozen=True)
class ClientTLS:
    """How the gateway dials upstreams over TLS: the CA that signs their certificates
    (None: the system's roots) and, for mTLS, this side's certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_files(
        cls, ca: str | None, cert: str | None, key: str | None, flag: str = "--upstream"
    ) -> ClientTLS | None:
        """None when nothing is configured (workers are dialled in plaintext)."""
        if not ca and not cert and not key:
            return None
        if bool(cert) != bool(key):
            raise TLSConfigError(f"{flag}-cert and {flag}-key go together")
        tls = cls(ca or None, cert or None, key or None)
        tls.ssl_context()  # validates every file now
        return tls

    def ssl_context(self, system_roots: bool = True) -> ssl.SSLContext:
        """For https:// upstreams: the system's roots and the CA, or the CA alone when not
        `system_roots` (a worker's own OpenAI port, trusted as its gRPC port is)."""
        if self.ca and not system_roots:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies peer and host name
        else:
            ctx = ssl.create_default_context(cafile=None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca:
            _load_ca(ctx, self.ca, "upstream CA")
        if self.cert and self.key:
            _load_chain(ctx, self.cert, self.key, "upstream client")
        return ctx

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        root = _read(self.ca, "upstream CA") if self.ca else None
        key = _read(self.key, "upstream client key") if self.key else None
        chain = _read(self.cert, "upstream client certificate") if self.cert else None
        return grpc.ssl_channel_credentials(root, key, chain)


def aio_channel(
    address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A channel to a worker: over TLS when the gateway was given upstream TLS files, else
    plaintext. Every gateway-to-worker channel (calls, health probes, cache watches) is made
    here, so all of them present the same credentials."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.grpc_credentials(), options=options)
