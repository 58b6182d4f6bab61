"""Signed jobs: only a holder of a trusted key can make a worker run anything.

Three rooms: the key files (``worker_tasks.keys``: where each party's key and certificates
are), this one (Celery's ``auth`` serializer registered for this process's part, its state
in ``STATE``; reading a signed payload), and admission (``worker_tasks.admission``: which
messages a worker lets Celery see).

The head node signs each job message with Celery's ``auth`` serializer (RSA-PSS over the
JSON body, ``celery.security``); a worker given a trust store (a directory of PEM
certificates) runs only messages whose signature verifies against one of them, and
refuses every other one in one log line, before Celery sees it
(``worker_tasks.admission``). Only the
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
import enum
import os
from dataclasses import dataclass
from pathlib import Path

# The key files' names and variables, known through this module too (it was their owner).
from worker_tasks.keys import (  # noqa: F401
    CERT_DAYS,
    CERT_VARIABLE,
    HEAD_KEY_NAME,
    KEY_BITS,
    KEY_VARIABLE,
    KEYS_DIR_VARIABLE,
    NODE_CERTS_DIR,
    NODE_CERTS_VARIABLE,
    NODE_KEY_NAME,
    NODE_KEYS_DIR,
    REQUIRE_VARIABLE,
    TRUST_VARIABLE,
    UNSIGNED_VARIABLE,
    SigningError,
    ensure_head_key,
    ensure_keypair,
    ensure_node_key,
    flag,
    head_key_files,
    key_files_from_env,
    keys_dir,
    make_keypair,
    node_certs,
    node_key_files,
    signing_files,
    trust_store,
    unsigned,
)

# Celery's name for its signing serializer, and the content type its messages carry.
AUTH_SERIALIZER = "auth"
SIGNED_CONTENT_TYPE = "application/data"
DIGEST = "sha256"


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


@dataclass
class SigningState:
    """This process's signing, once set up: what it registered, and the stamp of the trust
    store it last loaded (a change re-registers: a rotation)."""

    registration: Registration | None = None
    store_stamp: int | None = None


STATE = SigningState()


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
    STATE.registration = Registration(part, files is not None, store)
    return files is not None


def registration() -> Registration:
    """This process's registration; a process that registered nothing is an observer (a
    plain ``celery inspect`` or Flower): it signs nothing."""
    if STATE.registration is None:
        register(Part.OBSERVER)
    assert STATE.registration is not None
    return STATE.registration


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


def reload_if_changed(store: str) -> None:
    """Re-read the trust store when a certificate was added or removed (a rotation)."""
    try:
        stamp = os.stat(store).st_mtime_ns
    except OSError:
        return
    if STATE.store_stamp != stamp:
        register(Part.WORKER)
        STATE.store_stamp = stamp
