"""Key material for signing: where each party's key and certificates are, and making them.

The head signs with its key (``$SC_SIGNING_KEY``, else the pair ``cluster init`` made in
the keys directory); a node signs its control replies with its own (made on the node by
``cluster up``); a worker verifies the head's jobs against its trust store, the head and
Flower verify replies against the nodes' certificates. The variables are listed in
``worker_tasks.signing``, which registers Celery's serializer with these files.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

KEY_VARIABLE = "SC_SIGNING_KEY"
CERT_VARIABLE = "SC_SIGNING_CERT"
TRUST_VARIABLE = "SC_TRUSTED_CERTS"
REQUIRE_VARIABLE = "SC_REQUIRE_SIGNED"
UNSIGNED_VARIABLE = "SC_UNSIGNED"
KEYS_DIR_VARIABLE = "SC_KEYS_DIR"
NODE_CERTS_VARIABLE = "SC_NODE_CERTS"
# In the keys directory: the nodes' certificates, one per node (cluster up fetches them).
NODE_CERTS_DIR = "nodes"
# On a node, in its state directory: keys/node.key and keys/node.crt (cluster up makes them).
NODE_KEYS_DIR = "keys"
NODE_KEY_NAME = "node"
# The head's key and certificate in the keys directory: head.key, head.crt.
HEAD_KEY_NAME = "head"
# RSA key size: Celery's serializer takes RSA only; 2048 bits sign in about 0.25 ms.
KEY_BITS = 2048
# A generated certificate is valid this long (days).
CERT_DAYS = 3650


class SigningError(Exception):
    """Signing is configured wrong (a missing key, an unreadable trust store); one line."""


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def unsigned() -> bool:
    """Jobs travel unsigned on purpose (``SC_UNSIGNED=1``)."""
    return flag(UNSIGNED_VARIABLE)


def trust_store() -> str | None:
    """The worker's trust store, unless signing is deliberately off."""
    return None if unsigned() else (os.environ.get(TRUST_VARIABLE) or None)


def keys_dir() -> Path:
    """Where ``cluster init`` makes the head's key (``$SC_KEYS_DIR``, else the user's
    config directory)."""
    configured = os.environ.get(KEYS_DIR_VARIABLE)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "scripts-coordinator"


def head_key_files() -> tuple[Path, Path]:
    return keys_dir() / f"{HEAD_KEY_NAME}.key", keys_dir() / f"{HEAD_KEY_NAME}.crt"


def ensure_keypair(directory: Path, name: str, common_name: str | None = None
                   ) -> tuple[Path, Path, bool]:
    """NAME.key and NAME.crt in ``directory`` (mode 0700), made when absent (True), never
    replaced."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    if key.exists() and cert.exists():
        return key, cert, False
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    key, cert = make_keypair(directory, name, common_name)
    return key, cert, True


def ensure_head_key() -> tuple[Path, Path, bool]:
    """The head's key and certificate in ``keys_dir()``, made when absent (True)."""
    return ensure_keypair(keys_dir(), HEAD_KEY_NAME)


def ensure_node_key(state_dir: Path, label: str) -> tuple[Path, Path, bool]:
    """A node's own key and certificate (subject: its label) in its state directory, made
    on the node when absent (True); the key never leaves it."""
    return ensure_keypair(state_dir / NODE_KEYS_DIR, NODE_KEY_NAME, label)


def node_certs() -> str | None:
    """The directory of the nodes' certificates the head verifies replies against, when it
    holds any (``$SC_NODE_CERTS``, else ``KEYS_DIR/nodes``)."""
    if unsigned():
        return None
    directory = Path(os.environ.get(NODE_CERTS_VARIABLE) or keys_dir() / NODE_CERTS_DIR)
    try:
        return str(directory) if any(directory.iterdir()) else None
    except OSError:
        return None


def make_keypair(directory: Path, name: str, common_name: str | None = None
                 ) -> tuple[Path, Path]:
    """A new RSA key (mode 0600) and a self-signed certificate for it (subject
    ``common_name``, default ``name``), in ``directory`` as NAME.key and NAME.crt."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def key_files_from_env(verifier: str) -> tuple[str, str] | None:
    """``$SC_SIGNING_KEY`` and ``$SC_SIGNING_CERT`` when the key is set (None when it is not);
    ``verifier`` says who checks signatures against the certificate, for the error when the
    certificate is missing."""
    key, cert = os.environ.get(KEY_VARIABLE), os.environ.get(CERT_VARIABLE)
    if not key:
        return None
    if not cert:
        raise SigningError(f"${KEY_VARIABLE} is set but ${CERT_VARIABLE} is not: {verifier} "
                           f"against the certificate")
    return key, cert


def signing_files() -> tuple[str, str] | None:
    """The head's key and certificate (``$SC_SIGNING_KEY``/``$SC_SIGNING_CERT``, else those
    ``cluster init`` made), unless signing is deliberately off."""
    if unsigned():
        return None
    given = key_files_from_env("the workers verify")
    if given is not None:
        return given
    made_key, made_cert = head_key_files()
    return (str(made_key), str(made_cert)) if made_key.exists() and made_cert.exists() else None


def node_key_files() -> tuple[str, str] | None:
    """A worker's own key and certificate (``$SC_SIGNING_KEY``/``$SC_SIGNING_CERT``); never
    the head's key from the keys directory, even on the head's machine."""
    if unsigned():
        return None
    return key_files_from_env("the head verifies this node's replies")
