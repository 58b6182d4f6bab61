"""Moving files between the head node and a node over SFTP, whole or not at all.

Pushing compares each file's SHA-256 with the node's copy (one ``find |
sha256sum`` round trip) and sends only what differs; fetching skips a file
already present with the same size. Both write to a temporary name and
rename it into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shlex
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import paramiko

from coordinator.cluster.remote import NodeError, RemoteNode

# Read files in blocks of this size when hashing (bytes).
HASH_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_relative(relative: str) -> str:
    """A path that stays inside the directory it is relative to, or ``NodeError``."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\n" in relative:
        raise NodeError(f"{relative!r} is not a path inside the node's configured directories; "
                        f"refused")
    return str(path)


@dataclass
class PushReport:
    """What a push did: files sent, files already identical on the node."""

    sent: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    bytes_sent: int = 0

    def line(self) -> str:
        moved = ", ".join(self.sent[:5]) + (f", ... (+{len(self.sent) - 5})"
                                            if len(self.sent) > 5 else "")
        sent = f"sent {len(self.sent)} files ({self.bytes_sent:,} bytes)"
        return f"{sent}: {moved}; {len(self.unchanged)} unchanged" if self.sent else (
            f"nothing to send; {len(self.unchanged)} files unchanged")


def remote_hashes(remote: RemoteNode, root: str) -> dict[str, str]:
    """relative path -> SHA-256 of every file under ``root`` on the node (empty if none)."""
    quoted = shlex.quote(root)
    result = remote.shell(f"cd {quoted} 2>/dev/null || exit 0; "
                          f"find . -type f -print0 | xargs -0 -r sha256sum --")
    if not result.ok:
        raise NodeError(f"could not list {root} on the node: {result.last_line()}")
    hashes: dict[str, str] = {}
    for line in result.stdout.splitlines():
        digest, _, name = line.partition("  ")
        if digest.startswith("\\") or not name:
            continue  # a name with a newline or backslash: re-sent every time, harmless
        hashes[name.removeprefix("./")] = digest
    return hashes


def push(remote: RemoteNode, files: Mapping[str, Path], root: str) -> PushReport:
    """Copy ``files`` (relative path on the node -> local file) under ``root`` on the node.

    Only files whose content differs from the node's copy move; permission bits
    are kept (an executable script stays executable).
    """
    report = PushReport()
    relatives = {check_relative(rel): local for rel, local in files.items()}
    current = remote_hashes(remote, root)
    changed = {rel: local for rel, local in sorted(relatives.items())
               if current.get(rel) != file_sha256(local)}
    report.unchanged = sorted(set(relatives) - set(changed))
    if not changed:
        return report
    directories = sorted({posixpath.dirname(posixpath.join(root, rel)) for rel in changed})
    made = remote.run(["mkdir", "-p", "--", *directories])
    if not made.ok:
        raise NodeError(f"could not create {directories[0]} on the node: {made.last_line()}")
    sftp = remote.sftp()
    try:
        for rel, local in changed.items():
            target = posixpath.join(root, rel)
            tmp = posixpath.join(posixpath.dirname(target),
                                 f".{posixpath.basename(target)}.sc-tmp")
            try:
                sftp.put(str(local), tmp)
                sftp.chmod(tmp, stat.S_IMODE(local.stat().st_mode))
                sftp.posix_rename(tmp, target)
            except (OSError, paramiko.SSHException) as err:
                raise NodeError(f"could not write {target} on the node: {err}") from None
            report.sent.append(rel)
            report.bytes_sent += local.stat().st_size
    finally:
        sftp.close()
    return report


@dataclass(frozen=True)
class Fetch:
    """One file to bring home: its path on the node and where it goes on the head node."""

    remote: str
    local: Path


def fetch_file(sftp: paramiko.SFTPClient, item: Fetch) -> bool:
    """Bring one file home unless the same size is already there; True if it moved.

    Raises ``FileNotFoundError`` if the node has no such file, ``OSError`` otherwise.
    """
    size = sftp.stat(item.remote).st_size
    if item.local.is_file() and item.local.stat().st_size == size:
        return False
    item.local.parent.mkdir(parents=True, exist_ok=True)
    tmp = item.local.with_name(f".{item.local.name}.{os.getpid()}.fetch")
    try:
        sftp.get(item.remote, str(tmp))
        os.replace(tmp, item.local)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def tree_files(root: Path, excludes: Iterable[str] = ()) -> dict[str, Path]:
    """relative POSIX path -> file, for every file under ``root`` not excluded.

    Hidden entries, ``__pycache__`` and compiled files are always left out;
    ``excludes`` are glob patterns matched against each relative path and name.
    """
    patterns = [".*", "__pycache__", "*.pyc", "*.egg-info", *excludes]
    found: dict[str, Path] = {}
    for directory, subdirs, names in os.walk(root, followlinks=False):
        here = Path(directory)
        subdirs[:] = sorted(name for name in subdirs
                            if not excluded(here / name, root, patterns))
        for name in sorted(names):
            path = here / name
            if path.is_file() and not excluded(path, root, patterns):
                found[path.relative_to(root).as_posix()] = path
    return found


def excluded(path: Path, root: Path, patterns: list[str]) -> bool:
    relative = PurePosixPath(path.relative_to(root).as_posix())
    return any(relative.match(pattern) or PurePosixPath(path.name).match(pattern)
               for pattern in patterns)
