"""Signed jobs: only a holder of a trusted key can make a worker run anything.

The head node signs each job message with Celery's ``auth`` serializer (RSA-PSS over the
JSON body, ``celery.security``); a worker given a trust store (a directory of PEM
certificates) runs only messages whose signature verifies against one of them, and
refuses every other one in one log line, before Celery sees it (``admit``). Only the
body is signed, so the body carries what the headers would otherwise decide: the node
(slot) it is for, checked against the queues this worker consumes, and the task id,
checked against the message's own; a replayed message is dropped by the job's record
and its ``.done`` like any redelivery. The trust store is re-read when its directory
changes: rotate by adding the new certificate, switching the head to the new key, and
removing the old certificate once the jobs it signed have run.

Remote control is signed the same way, each party with its own key
(``worker_tasks.mailbox``): the head signs its commands, a worker its replies with its
node's key (``cluster up`` makes one on each node); a worker verifies against the head's
certificates (its trust store), the head and Flower against the nodes'. Events and results
stay JSON: they make nothing run.

Each process registers the serializer once, for its part (``Part``): the head signs with
its key and reads replies against the nodes' certificates; a worker signs with its node's
key and takes what the head's certificates verify; an observer (Flower, a plain ``celery
inspect``) signs nothing, so a job it sends is unsigned and refused.

| variable            | side   | meaning                                                  |
|---------------------|--------|----------------------------------------------------------|
| SC_SIGNING_KEY      | both   | this party's private key (PEM, RSA, mode 0600): the      |
|                     |        | head's signs jobs and commands, a node's its replies     |
| SC_SIGNING_CERT     | both   | its certificate (PEM), which the other side trusts       |
| SC_NODE_CERTS       | head   | the nodes' certificates (default: KEYS_DIR/nodes)        |
| SC_KEYS_DIR         | head   | where ``cluster init`` keeps head.key and head.crt, used |
|                     |        | when the two above are unset (~/.config/scripts-coordinator) |
| SC_TRUSTED_CERTS    | worker | a directory of certificates: only their jobs run         |
| SC_REQUIRE_SIGNED   | worker | 1: refuse to start without a trust store                 |
| SC_UNSIGNED         | both   | 1: jobs travel unsigned, deliberately (says so)          |
"""

from __future__ import annotations

import base64
import datetime
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Celery's name for its signing serializer, and the content type its messages carry.
AUTH_SERIALIZER = "auth"
SIGNED_CONTENT_TYPE = "application/data"
DIGEST = "sha256"
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


def signing_files() -> tuple[str, str] | None:
    """The head's key and certificate (``$SC_SIGNING_KEY``/``$SC_SIGNING_CERT``, else those
    ``cluster init`` made), unless signing is deliberately off."""
    key, cert = os.environ.get(KEY_VARIABLE), os.environ.get(CERT_VARIABLE)
    if unsigned():
        return None
    if not key:
        made_key, made_cert = head_key_files()
        if made_key.exists() and made_cert.exists():
            return str(made_key), str(made_cert)
        return None
    if not cert:
        raise SigningError(f"${KEY_VARIABLE} is set but ${CERT_VARIABLE} is not: the "
                           f"workers verify against the certificate")
    return key, cert


class Part(enum.Enum):
    """What a process is to signing: which key it signs with, which certificates it trusts."""

    HEAD = "head"  # signs jobs and commands (the head's key); verifies the nodes' replies
    WORKER = "worker"  # signs replies (its node's key); takes what the head's key signed
    OBSERVER = "observer"  # signs nothing; verifies the nodes' replies (Flower)


@dataclass(frozen=True)
class Registration:
    """What this process registered: its part, whether it signs, and the certificates it
    verifies against (None: none)."""

    part: Part
    signs: bool
    store: str | None


_registration: list[Registration] = []  # this process's, once registered


def node_key_files() -> tuple[str, str] | None:
    """A worker's own key and certificate (``$SC_SIGNING_KEY``/``$SC_SIGNING_CERT``); never
    the head's key from the keys directory, even on the head's machine."""
    key, cert = os.environ.get(KEY_VARIABLE), os.environ.get(CERT_VARIABLE)
    if unsigned() or not key:
        return None
    if not cert:
        raise SigningError(f"${KEY_VARIABLE} is set but ${CERT_VARIABLE} is not: the head "
                           f"verifies this node's replies against the certificate")
    return key, cert


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


def register(part: Part) -> bool:
    """Register Celery's signing serializer with ``part``'s key and certificates (each where
    configured); True when this process signs what it publishes."""
    from celery.security.serialization import register_auth

    if part is Part.HEAD:
        files, store = signing_files(), node_certs()
    elif part is Part.WORKER:
        files, store = node_key_files(), trust_store()
    else:
        files, store = None, node_certs()
    if part is Part.WORKER and store is not None and not Path(store).is_dir():
        raise SigningError(f"${TRUST_VARIABLE}={store} is not a directory of certificates")
    key = cert = None
    if files is not None:
        try:
            key, cert = Path(files[0]).read_text(), Path(files[1]).read_text()
        except OSError as err:
            raise SigningError(f"cannot read the signing key or certificate: {err}") from None
    try:
        register_auth(key=key, cert=cert, store=store, digest=DIGEST)
    except Exception as err:  # celery.exceptions.SecurityError, ValueError of a bad PEM
        raise SigningError(f"signing set-up failed: {err}") from None
    _registration[:] = [Registration(part, files is not None, store)]
    return files is not None


def registration() -> Registration:
    """This process's registration; a process that registered nothing is an observer (a
    plain ``celery inspect`` or Flower): it signs nothing."""
    if not _registration:
        register(Part.OBSERVER)
    return _registration[0]


def unpack(payload: bytes | str) -> tuple[str, bytes, str, str]:
    """The signer's certificate id, the body, its content type and encoding inside a signed
    message's body (Celery's ``SecureSerializer`` packing), unverified."""
    from celery.security.serialization import DEFAULT_SEPARATOR

    raw = base64.b64decode(payload)
    signer, _signature, content_type, encoding, body = raw.split(DEFAULT_SEPARATOR, 4)
    return (base64.b64decode(signer).decode(errors="replace"), body, content_type.decode(),
            encoding.decode())


def read_unverified(payload: bytes | str) -> tuple[bytes, str, str]:
    """The body, content type and encoding of a signed message, unverified: for a head that
    knows no node's certificate (it takes unsigned replies as well)."""
    return unpack(payload)[1:]


def signer_name(payload: bytes | str) -> str:
    """Whose key signed a message: its certificate's subject (a node's label, for the keys
    ``ensure_node_key`` makes). Celery names a certificate ``<issuer> <serial>``, and ours
    are self-signed, so the issuer is the subject."""
    return unpack(payload)[0].rpartition(" ")[0]


def status_line() -> str:
    """What ``status`` says of this process's signing."""
    if unsigned():
        return f"signing off ({UNSIGNED_VARIABLE}=1): any client of the broker can run jobs"
    if signing_files():
        store = node_certs()
        if store is None:
            return ("jobs and commands are signed with this head node's key; the workers' "
                    "replies are taken unverified (no node certificates: cluster up makes "
                    "them)")
        count = sum(1 for _ in Path(store).iterdir())
        return (f"jobs and commands are signed with this head node's key; replies verified "
                f"against {count} node certificate(s) in {store}")
    return (f"signing off: no key (${KEY_VARIABLE}); workers that require signatures "
            f"refuse these jobs")


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


_loaded_store: list[int] = []  # the trust store's directory mtime when last loaded


def reload_if_changed(store: str) -> None:
    """Re-read the trust store when a certificate was added or removed (a rotation)."""
    try:
        stamp = os.stat(store).st_mtime_ns
    except OSError:
        return
    if _loaded_store != [stamp]:
        register(Part.WORKER)
        _loaded_store[:] = [stamp]


def admit(message: Any, queues: set[str]) -> str | None:
    """Why this worker refuses ``message`` before Celery sees it, or None to take it.

    With a trust store: the message must be signed by a trusted key, for the task that
    runs jobs, for a queue this worker consumes, under the task id it was signed with. An
    admitted message's body is replaced by the verified JSON: its pool process, forked
    before the trust store last changed, decodes it without verifying again.
    """
    store = trust_store()
    content_type = getattr(message, "content_type", None)
    if store is None:
        if content_type == SIGNED_CONTENT_TYPE:
            return ("signed, and this worker has no trust store to verify it: start it with "
                    "--trusted-certs DIR (cluster deploy installs the head's certificate)")
        return None
    from worker_tasks.spec import RUN_JOB_TASK

    try:
        reload_if_changed(store)
    except SigningError as err:  # a bad file dropped into the store: nothing verifies
        return f"the trust store cannot be read ({err})"
    if content_type != SIGNED_CONTENT_TYPE:
        return f"not signed (content type {content_type}): only signed jobs run here"
    try:
        body = message.decode()
    except Exception as err:  # celery's SecurityError and whatever a forged body raises
        return f"its signature does not verify: {err}"
    headers = getattr(message, "headers", None) or {}
    if headers.get("task") != RUN_JOB_TASK:
        return f"signed, but for task {headers.get('task')!r}, not {RUN_JOB_TASK}"
    job = body[0][0] if isinstance(body, list | tuple) and body and body[0] else None
    if not isinstance(job, dict):
        return "signed, but its body holds no job"
    if job.get("task_id") != headers.get("id"):
        return f"signed for task id {job.get('task_id')!r}, sent as {headers.get('id')!r}"
    from worker_tasks.spec import InvalidMessage, JobSpec

    try:
        queue = JobSpec.from_message(job).queue
    except InvalidMessage as err:
        return f"signed, but not a valid job: {err}"
    if queue not in queues:
        return f"signed for queue {queue}, which this worker does not consume (re-routed)"
    from kombu.serialization import dumps

    message.content_type, message.content_encoding, message.body = dumps(body, "json")
    return None
