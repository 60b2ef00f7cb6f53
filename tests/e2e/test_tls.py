"""TLS on the gateway's front ends and mTLS between gateway and workers, on real processes.

A throwaway CA signs a server certificate (for 127.0.0.1 and localhost) and a client one.
One sim worker requires client certificates on gRPC and HTTP; a two-process gateway serves
HTTPS and gRPC over TLS and dials the worker with its client certificate; a second gateway
without one must see the worker as not ready (and refuses callers without a certificate).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from breakwater.client import Client
from breakwater.errors import APIConnectionError
from loadtest.fleet import ADMIN_TOKEN
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import Proc, start_gateway, start_sim_worker, wait_for


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stray_key: Path
    """A key that belongs to no certificate here."""

    def context(self, client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate for `key`, self-signed (the CA) when there is no issuer."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    signer_public = signer.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_public), False)
    )
    if issuer is None:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _ca_and_server(ca_name: str) -> tuple[Issued, Issued]:
    """A new CA and a server certificate it signed for localhost and 127.0.0.1."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(ca_name, ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "localhost",
        server_key,
        (ca, ca_key),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    return (ca, ca_key), (server, server_key)


@pytest.fixture(scope="module")
def pki() -> Iterator[PKI]:
    d = Path(tempfile.mkdtemp(prefix="bw-tls-"))
    try:
        (ca, ca_key), (server, server_key) = _ca_and_server("breakwater test CA")
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _issue(
            "breakwater-gateway", client_key, (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
        )
        p = PKI(
            d,
            d / "ca.pem",
            d / "server.pem",
            d / "server.key",
            d / "client.pem",
            d / "client.key",
            d / "stray.key",
        )
        pem = serialization.Encoding.PEM
        p.ca.write_bytes(ca.public_bytes(pem))
        p.server_cert.write_bytes(server.public_bytes(pem))
        p.client_cert.write_bytes(client.public_bytes(pem))
        _write_key(p.server_key, server_key)
        _write_key(p.client_key, client_key)
        _write_key(p.stray_key, ec.generate_private_key(ec.SECP256R1()))
        yield p
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def worker(pki: PKI) -> Iterator[Proc]:
    """A worker that only talks to callers with a certificate from the CA."""
    w = start_sim_worker(
        "--http-port",
        "0",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
    )
    yield w
    w.stop()


@pytest.fixture(scope="module")
def gateway(pki: PKI, worker: Proc) -> Iterator[Proc]:
    """TLS front ends, mTLS to the worker; two processes, so siblings must get TLS too."""
    g = start_gateway(
        "--worker",
        worker.ready["grpc"],
        "--grpc-port",
        "0",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--upstream-ca",
        str(pki.ca),
        "--upstream-cert",
        str(pki.client_cert),
        "--upstream-key",
        str(pki.client_key),
        processes=2,
    )
    yield g
    g.stop()


def _request(
    url: str,
    context: ssl.SSLContext | None,
    body: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_https_chat_completion_and_plain_http_refused(pki: PKI, gateway: Proc) -> None:
    url = gateway.ready["http"]
    assert url.startswith("https://") and gateway.ready["admin"].startswith("https://")
    ctx = pki.context()
    status, body = _request(url + "/v1/chat/completions", ctx, CHAT)
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"

    # Both processes serve the port over TLS (a sibling must not fall back to plaintext).
    def answering() -> set[int]:
        return {int(_request(url + "/healthz", ctx)[1]["process"]) for _ in range(12)}

    wait_for(lambda: answering() == {0, 1}, timeout=60)

    plain = url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
        _request(plain + "/v1/chat/completions", None, CHAT, timeout=10)
    # An unverified certificate (the system's CAs do not know ours) is refused by the client.
    with pytest.raises(urllib.error.URLError):
        _request(url + "/healthz", ssl.create_default_context(), timeout=10)

    # The SDK: https with a CA file.
    with Client(url, verify=str(pki.ca), max_retries=0, timeout=30) as c:
        reply = c.chat.completions.create(**CHAT)
        assert reply.choices[0].finish_reason == "length"
    with Client(url, max_retries=0, timeout=10) as c, pytest.raises(APIConnectionError):
        c.chat.completions.create(**CHAT)


def test_streams_relayed_to_the_workers_https_port_over_mtls(
    pki: PKI, gateway: Proc, worker: Proc
) -> None:
    """A stream goes to the worker's own HTTPS port (with the gateway's client certificate),
    not over gRPC: the worker's gRPC Generate count does not move, its OpenAI port's does."""

    def generate_calls() -> tuple[int, int]:
        creds = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
        )
        with grpc.secure_channel(worker.ready["grpc"], creds) as ch:
            stats = pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10)
        return int(stats.generate_calls), int(stats.http_generate_calls)

    def listed() -> str:
        req = urllib.request.Request(
            gateway.ready["admin"] + "/admin/workers",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=10, context=pki.context()) as r:
            return str(json.loads(r.read())["workers"][0]["openai_url"])

    assert wait_for(listed, timeout=60) == worker.ready["http"]
    before = generate_calls()
    req = urllib.request.Request(
        gateway.ready["http"] + "/v1/chat/completions",
        data=json.dumps({**CHAT, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    for _ in range(4):  # both gateway processes, most likely
        with urllib.request.urlopen(req, timeout=30, context=pki.context()) as r:
            assert r.status == 200 and r.read().endswith(b"data: [DONE]\n\n")
    assert generate_calls() == (before[0], before[1] + 4)


def test_grpc_generate_over_tls(pki: PKI, gateway: Proc) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(gateway.ready["grpc"], creds) as ch:
        req = pb.GenerateRequest(
            model="sim",
            text="tls",
            sampling=pb.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        )
        responses = list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60))
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    with grpc.insecure_channel(gateway.ready["grpc"]) as ch, pytest.raises(grpc.RpcError) as e:
        list(pb_grpc.InferenceStub(ch).Generate(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_admin_over_tls_and_cache_watch_over_mtls(pki: PKI, gateway: Proc) -> None:
    """The admin listener is TLS too; its view shows the worker ready and its WatchCache
    stream (a separate channel from the calls') established with the same credentials."""

    def workers() -> list[dict[str, Any]]:
        req = urllib.request.Request(
            gateway.ready["admin"] + "/admin/workers",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=10, context=pki.context()) as r:
            return list(json.loads(r.read())["workers"])

    wait_for(lambda: [w["cache"]["reported"] for w in workers()] == [True], timeout=60)


def test_worker_http_port_requires_client_cert(pki: PKI, worker: Proc) -> None:
    url = worker.ready["http"]
    assert url.startswith("https://")
    status, body = _request(url + "/health", pki.context(client_cert=True))
    assert status == 200, body
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
        _request(url + "/health", pki.context(), timeout=10)


def test_https_openai_upstream_with_client_cert(pki: PKI, worker: Proc) -> None:
    """The worker's own HTTPS port as an OpenAI upstream: the gateway's lean HTTP client
    speaks TLS with the --upstream-* files (plain HTTP front end here)."""
    g = start_gateway(
        "--worker",
        worker.ready["http"],
        "--upstream-ca",
        str(pki.ca),
        "--upstream-cert",
        str(pki.client_cert),
        "--upstream-key",
        str(pki.client_key),
    )
    try:
        status, body = _request(g.ready["http"] + "/v1/chat/completions", None, CHAT)
        assert status == 200, body
        stream = {**CHAT, "stream": True}
        req = urllib.request.Request(
            g.ready["http"] + "/v1/chat/completions",
            data=json.dumps(stream).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.read().rstrip().endswith(b"data: [DONE]")
    finally:
        g.stop()


def test_gateway_without_client_cert_sees_worker_not_ready(pki: PKI, worker: Proc) -> None:
    """Verifies the worker but has no certificate for it; and itself requires callers'."""
    g = start_gateway(
        "--worker",
        worker.ready["grpc"],
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        "--upstream-ca",
        str(pki.ca),
    )
    try:
        url = g.ready["http"]
        t0 = time.monotonic()
        status, body = _request(url + "/v1/chat/completions", pki.context(client_cert=True), CHAT)
        assert status in (404, 503), body
        assert time.monotonic() - t0 < 20
        # Callers without a certificate do not get in at all.
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            _request(url + "/healthz", pki.context(), timeout=10)
        assert _request(url + "/healthz", pki.context(client_cert=True))[0] == 200
    finally:
        g.stop()


def _gateway_exit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakwater.cli", "gateway", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_tls_files_stop_the_gateway_with_one_line(pki: PKI) -> None:
    missing = str(pki.dir / "missing.pem")
    r = _gateway_exit("--tls-cert", missing, "--tls-key", str(pki.server_key))
    assert r.returncode != 0 and "BREAKWATER_GATEWAY_READY" not in r.stdout
    assert "Traceback" not in r.stderr and missing in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    r = _gateway_exit("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.stray_key))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does not match" in r.stderr, r.stderr

    r = _gateway_exit("--upstream-ca", missing)
    assert r.returncode != 0 and missing in r.stderr and "Traceback" not in r.stderr


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> bool:
    """Whether `client` accepts `server`'s certificate for localhost (a real handshake, in
    memory)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(20):
        for side in (c, s):
            if done[side]:
                continue
            try:
                side.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError:
                return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return True
    raise AssertionError("the handshake did not finish")


def test_a_workers_own_port_is_trusted_by_the_upstream_ca_alone(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --upstream-ca, a certificate from a CA the system trusts still passes for a
    plain https:// upstream, but not for the OpenAI port a worker reports, which is trusted
    as the worker's gRPC port is: by that CA alone."""
    from gateway.app import make_upstream
    from gateway.registry.base import WorkerInfo
    from gateway.upstream.openai_http import RELAY_KIND
    from serving.tls import ClientTLS

    (public, _), (host, host_key) = _ca_and_server("a public CA")
    (tmp_path / "system.pem").write_bytes(public.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "host.pem").write_bytes(host.public_bytes(serialization.Encoding.PEM))
    _write_key(tmp_path / "host.key", host_key)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system.pem"))  # the system's roots

    def server(cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    tls = ClientTLS(str(pki.ca))
    plain = make_upstream(WorkerInfo("w", "https://localhost:1", "openai-http"), tls)
    relay = make_upstream(WorkerInfo("w", "https://localhost:1", RELAY_KIND), tls)
    by_public_ca = server(tmp_path / "host.pem", tmp_path / "host.key")
    by_upstream_ca = server(pki.server_cert, pki.server_key)
    assert _handshake(plain.pool.ssl, by_public_ca)  # type: ignore[attr-defined]
    assert not _handshake(relay.pool.ssl, by_public_ca)  # type: ignore[attr-defined]
    assert _handshake(plain.pool.ssl, by_upstream_ca)  # type: ignore[attr-defined]
    assert _handshake(relay.pool.ssl, by_upstream_ca)  # type: ignore[attr-defined]
