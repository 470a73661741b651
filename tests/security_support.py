"""Helpers of the security tests: secret forms, whole-Redis dumps, a Flower process, a test CA."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ops.stack import _stop, free_port

__all__ = [
    "FlowerProcess",
    "find_secret",
    "make_tls_files",
    "redis_dump",
    "secret_forms",
]


def secret_forms(secret: str) -> list[bytes]:
    """The secret, its first 12 characters, and its base64 form at every byte alignment.

    A value embedded in a base64 blob (a Celery message body) shows a different
    base64 text depending on its offset modulo 3; each alignment's fully determined
    characters are searched, in standard and url-safe alphabets.
    """
    raw = secret.encode()
    forms = [raw, raw[:12], base64.b64encode(raw).rstrip(b"=")]
    for skip in range(3):
        chunk = raw[skip:]
        chunk = chunk[: len(chunk) // 3 * 3]
        forms += [base64.b64encode(chunk), base64.urlsafe_b64encode(chunk)]
    return list(dict.fromkeys(forms))


def find_secret(blob: bytes, secret: str) -> list[bytes]:
    """The forms of ``secret`` found in ``blob`` (empty when clean)."""
    return [form for form in secret_forms(secret) if form in blob]


def _decoded_bodies(value: bytes) -> list[bytes]:
    """Kombu messages keep their body base64-encoded: decode it so it is searched too."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(doc, list):  # unacked entries are [message, exchange, routing_key]
        doc = doc[0] if doc else None
    if isinstance(doc, dict) and isinstance(doc.get("body"), str):
        with contextlib.suppress(ValueError):
            return [base64.b64decode(doc["body"])]
    return []


def redis_dump(r: redis.Redis) -> Iterator[tuple[bytes, bytes, bytes]]:
    """``(key, type, everything it holds)`` for every key of every type in the database."""
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        values: list[bytes] = []
        if kind == b"string":
            values = [r.get(key) or b""]
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                values += [k, v]
        elif kind == b"list":
            values = list(r.lrange(key, 0, -1))
        elif kind == b"set":
            values = list(r.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for entry_id, fields in r.xrange(key):
                values.append(entry_id)
                for k, v in fields.items():
                    values += [k, v]
        elif kind == b"none":
            continue  # expired between SCAN and TYPE
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} for {key!r}")
        extra = [body for v in values for body in _decoded_bodies(v)]
        yield key, kind, b"\n".join([key, *values, *extra])


@dataclass
class FlowerProcess:
    """``actorq flower`` with basic auth, as a child process stopped by pid."""

    env: dict[str, str]
    log_path: Path
    user: str = "ops"
    password: str = "flower-pass"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    fetched: dict[str, bytes] = field(default_factory=dict)

    def start(self, timeout: float = 60.0) -> FlowerProcess:
        from ops.flower import FlowerOptions, flower_command

        self.port = self.port or free_port()
        # The product's launcher (``actorq flower``), so the scan covers what it shows.
        args, env = flower_command(
            FlowerOptions(
                port=self.port, address="127.0.0.1", basic_auth=[f"{self.user}:{self.password}"]
            ),
            env={**os.environ, **self.env},
        )
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited with {self.proc.returncode}: {self.log_path}")
            try:
                self.get("/healthcheck")
                return self
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower not up after {timeout}s") from None
                time.sleep(0.2)

    def get(self, path: str, *, auth: bool = True, timeout: float = 20.0) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body: bytes = reply.read()
        self.fetched[path] = body
        return body

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, 10)
            self.proc = None


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1: ``(ca, cert, key)`` PEM paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "actorq test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "server.pem", "server.key"))
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path
