"""TLS and mutual TLS with certificates this test makes (openssl CLI: the
``cryptography`` package is not a dependency): a CA, a server certificate for 127.0.0.1 and
localhost (SAN), a client certificate, and a rogue CA's client certificate."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import pytest
from harness.geometry import GEOM
from harness.server import ServerProcess
from harness.tensors import qkv

from q8kv.client import Client, Q8KVError

TOKEN = "tls-token-0123456789"


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_leaf(directory, name: str, ca: str, usage: str, san: str | None = None) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else "")
    )
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext.name,
            "-out", f"{name}.pem", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "server", "ca", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    make_leaf(d, "client", "ca", "clientAuth")
    make_leaf(d, "rogue-client", "rogue-ca", "clientAuth")
    return {name: str(d / name) for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
             "rogue-client.pem", "rogue-client.key", "rogue-ca.pem")}


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def tls_server(start_server, pki):
    """Factory: a TLS server (its health wait talks TLS: with a client certificate where
    ``client_cert``)."""

    def start(*flags: str, client_cert: bool = False) -> ServerProcess:
        creds = grpc.ssl_channel_credentials(
            read(pki["ca.pem"]),
            read(pki["client.key"]) if client_cert else None,
            read(pki["client.pem"]) if client_cert else None,
        )
        return start_server("--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                            *flags, credentials=creds,
                            env={"Q8KV_AUTH_TOKENS": f"{TOKEN} tls-tenant"})

    return start


def round_trip(client: Client) -> None:
    s = client.create_session(**GEOM)
    q, k, v = qkv(np.random.default_rng(0), 4, GEOM)
    out = s.append_and_attend(0, q, k, v)
    assert out.shape == q.shape and np.isfinite(out).all()
    keys, _ = s.dequantize(0)
    assert keys.shape == (2, 4, 64)
    s.delete()


def refused(client: Client) -> Q8KVError:
    with pytest.raises(Q8KVError) as err:
        client.list_sessions()
    return err.value


def test_tls_with_the_clients_ca_bundle(tls_server, pki):
    srv = tls_server()
    with Client(srv.address, tls=pki["ca.pem"], token=TOKEN, timeout=10) as c:
        round_trip(c)
    # Also by name: the certificate covers localhost as well as 127.0.0.1.
    with Client(f"localhost:{srv.port}", tls=pki["ca.pem"], token=TOKEN, timeout=10) as c:
        assert c.health() == "SERVING"
    # TLS does not replace the token.
    with Client(srv.address, tls=pki["ca.pem"], timeout=10) as c:
        assert refused(c).code == grpc.StatusCode.UNAUTHENTICATED
    # A plaintext client gets no answer from a TLS port, health included.
    with Client(srv.address, token=TOKEN, timeout=5) as c:
        assert refused(c).code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Q8KVError):
            c.health()
    # A client that trusts another CA (or only the system roots) refuses the server.
    for trust in (pki["rogue-ca.pem"], True):
        with Client(srv.address, tls=trust, token=TOKEN, timeout=5) as c:
            assert refused(c).code == grpc.StatusCode.UNAVAILABLE
    assert srv.proc.poll() is None


def test_mutual_tls(tls_server, pki):
    srv = tls_server("--tls-client-ca", pki["ca.pem"], client_cert=True)
    mine = (pki["ca.pem"], pki["client.pem"], pki["client.key"])
    with Client(srv.address, tls=mine, token=TOKEN, timeout=10) as c:
        round_trip(c)
    # Without a client certificate, with one of another CA, or in plaintext: refused.
    rogue = (pki["ca.pem"], pki["rogue-client.pem"], pki["rogue-client.key"])
    for tls in (pki["ca.pem"], rogue, None):
        with Client(srv.address, tls=tls, token=TOKEN, timeout=5) as c:
            assert refused(c).code == grpc.StatusCode.UNAVAILABLE, tls
    # The server certificate signed by the CA is not a client certificate.
    wrong_usage = (pki["ca.pem"], pki["server.pem"], pki["server.key"])
    with Client(srv.address, tls=wrong_usage, token=TOKEN, timeout=5) as c:
        assert refused(c).code == grpc.StatusCode.UNAVAILABLE
    assert srv.proc.poll() is None
    with Client(srv.address, tls=mine, token=TOKEN, timeout=10) as c:
        assert c.list_sessions() == []
