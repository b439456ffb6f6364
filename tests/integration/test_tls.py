"""TLS on both transports, and mutual TLS between the learner and the server (issue 18).

The CA and every certificate are made here with `cryptography`; nothing leaves loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flywheel_client import FlywheelClient, Unavailable, tls_credentials
from flywheel_learner.config import LearnerConfig
from flywheel_learner.loop import Learner
from tests.support import FLYWHEEL, ServerProcess

pytestmark = pytest.mark.integration


class Authority:
    """A CA that signs server and client certificates, written as PEM files under `root`."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = root / f"{name}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, key: object
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        """(certificate, key) files for `name`: a server on 127.0.0.1, or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(subject, self.cert.subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert, key_file = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert.write_bytes(
            builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(root, "flywheel-ca"), Authority(root, "rogue-ca")
    server_cert, server_key = ca.issue("server", server=True)
    learner_cert, learner_key = ca.issue("learner", server=False)
    stranger_cert, stranger_key = rogue.issue("stranger", server=False)
    return {
        "ca": ca.pem, "server_cert": server_cert, "server_key": server_key,
        "learner_cert": learner_cert, "learner_key": learner_key,
        "stranger_cert": stranger_cert, "stranger_key": stranger_key,
    }  # fmt: skip


def context(pki: dict[str, Path], client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if client:
        ctx.load_cert_chain(pki[f"{client}_cert"], pki[f"{client}_key"])
    return ctx


def test_both_transports_speak_tls(tiny_model, tmp_path, pki):
    server = ServerProcess(
        tiny_model,
        tmp_path / "data",
        args=["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])],
        tls=context(pki),
    ).start()
    try:
        body = {"prompt": "add: 1 + 1", "max_tokens": 2}
        with httpx.Client(verify=context(pki), timeout=60) as https:
            assert https.post(f"{server.http}/v1/completions", json=body).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nowhere
            httpx.post(server.http.replace("https", "http") + "/v1/completions", json=body)
        with FlywheelClient(server.grpc, credentials=tls_credentials(pki["ca"])) as client:
            assert len(client.generate("x", max_tokens=1).completions) == 1
        with FlywheelClient(server.grpc, timeout=5) as plain, pytest.raises(Unavailable):
            plain.generate("x", max_tokens=1)
        # the CLI's flags
        cli = [FLYWHEEL, "policies", "--server", server.grpc]
        ok = subprocess.run([*cli, "--tls-ca", str(pki["ca"])], capture_output=True, text=True)
        assert ok.returncode == 0 and "policy-v0" in ok.stdout, ok.stderr
    finally:
        server.stop()


def test_mutual_tls_lets_in_the_learner_and_no_stranger(tiny_model, tmp_path, pki):
    args = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
            "--tls-client-ca", str(pki["ca"])]  # fmt: skip
    server = ServerProcess(tiny_model, tmp_path / "data", args=args, tls=context(pki, "learner"))
    server.start()
    try:
        config = LearnerConfig(
            server=server.grpc, model_dir=tiny_model, work_dir=tmp_path / "learner",
            tls_ca=pki["ca"], tls_cert=pki["learner_cert"], tls_key=pki["learner_key"],
        )  # fmt: skip
        learner = Learner(config)  # checks the base model over the mutual-TLS channel
        try:
            assert learner.client.server_info().base_model == learner.base_model
        finally:
            learner.close()
        for who in (None, "stranger"):
            creds = tls_credentials(
                pki["ca"],
                pki[f"{who}_cert"] if who else None,
                pki[f"{who}_key"] if who else None,
            )
            with (
                FlywheelClient(server.grpc, credentials=creds, timeout=5) as client,
                pytest.raises(Unavailable),
            ):
                client.server_info()
        with httpx.Client(verify=context(pki, "learner"), timeout=60) as https:
            assert https.get(f"{server.http}/v1/models").status_code == 200
        with pytest.raises(httpx.HTTPError), httpx.Client(verify=context(pki), timeout=10) as https:
            https.get(f"{server.http}/v1/models")
    finally:
        server.stop()


def test_tls_flags_are_checked(tiny_model, tmp_path, pki):
    def serve(*flags: str) -> subprocess.CompletedProcess[str]:
        command = [FLYWHEEL, "serve", "--model", str(tiny_model), "--data-dir", str(tmp_path)]
        return subprocess.run([*command, *flags], capture_output=True, text=True, timeout=120)

    half = serve("--tls-cert", str(pki["server_cert"]))
    assert half.returncode != 0 and "--tls-cert and --tls-key together" in half.stderr
    up = subprocess.run(
        [FLYWHEEL, "up", "--model", str(tiny_model), "--data-dir", str(tmp_path),
         "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert up.returncode != 0 and "flywheel learn --tls-ca" in up.stdout + up.stderr
