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

Control commands and events stay JSON: they cannot make a worker run a job (the commands
that would change what it consumes are refused, ``worker_tasks.control``).

| variable            | side   | meaning                                                  |
|---------------------|--------|----------------------------------------------------------|
| SC_SIGNING_KEY      | head   | its private key (PEM, RSA, mode 0600): jobs are signed   |
| SC_SIGNING_CERT     | head   | its certificate (PEM), which the workers trust           |
| SC_KEYS_DIR         | head   | where ``cluster init`` keeps head.key and head.crt, used |
|                     |        | when the two above are unset (~/.config/scripts-coordinator) |
| SC_TRUSTED_CERTS    | worker | a directory of certificates: only their jobs run         |
| SC_REQUIRE_SIGNED   | worker | 1: refuse to start without a trust store                 |
| SC_UNSIGNED         | both   | 1: jobs travel unsigned, deliberately (says so)          |
"""

from __future__ import annotations

import datetime
import os
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


def ensure_head_key() -> tuple[Path, Path, bool]:
    """The head's key and certificate in ``keys_dir()``, made when absent (True), never
    replaced."""
    key, cert = head_key_files()
    if key.exists() and cert.exists():
        return key, cert, False
    keys_dir().mkdir(parents=True, exist_ok=True)
    keys_dir().chmod(0o700)
    key, cert = make_keypair(keys_dir(), HEAD_KEY_NAME)
    return key, cert, True


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


def register() -> bool:
    """Register Celery's signing serializer with this process's key and trust store (each
    where configured); True when this process signs what it publishes."""
    from celery.security.serialization import register_auth

    files = signing_files()
    store = trust_store()
    if store is not None and not Path(store).is_dir():
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
    return files is not None


def status_line() -> str:
    """What ``status`` says of this process's signing."""
    if unsigned():
        return f"signing off ({UNSIGNED_VARIABLE}=1): any client of the broker can run jobs"
    if signing_files():
        return "jobs are signed with this head node's key"
    return (f"signing off: no key (${KEY_VARIABLE}); workers that require signatures "
            f"refuse these jobs")


def make_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new RSA key (mode 0600) and a self-signed certificate for it, in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
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
        register()
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
