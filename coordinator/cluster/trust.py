"""The head node's side of signing, as the cluster verbs see it: its key (``cluster init``),
the certificate ``cluster deploy`` installs on the nodes, and the line ``cluster status``
prints. Keys themselves are ``worker_tasks.keys``'s."""

from __future__ import annotations

from pathlib import Path

from worker_tasks import signing


def head_key() -> tuple[Path, Path, bool] | None:
    """The head's key and certificate, made when absent (True); None when jobs travel
    unsigned on purpose (``SC_UNSIGNED=1``)."""
    if signing.unsigned():
        return None
    return signing.ensure_head_key()


def head_certificate() -> Path | None:
    """The certificate the nodes trust (never the key), or None when unsigned."""
    files = signing.signing_files()
    return Path(files[1]) if files else None


def trust_line() -> str:
    """What signing is here, in one line (or why it is broken)."""
    try:
        return signing.status_line()
    except signing.SigningError as err:
        return str(err)


UNSIGNED_VARIABLE = signing.UNSIGNED_VARIABLE
