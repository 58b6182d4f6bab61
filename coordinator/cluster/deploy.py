"""Putting what jobs need onto the nodes: scripts, data, and this project itself.

Scripts go to each node's ``scripts_dir``, data to its ``workdir`` (at the same
relative path as on the head node); nothing is ever written outside those two
directories. ``--project`` installs this project on the node from a wheel built
on the head node, so both sides run the same message contract, with the extras
the inventory names for the node (``worker`` by default, ``gpu`` on GPU nodes).
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import posixpath
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from coordinator.cluster.remote import NodeError, RemoteNode
from coordinator.cluster.sync import push, tree_files
from coordinator.errors import InvalidJobsError
from coordinator.options import DEFAULT_CHUNK_DIR, DEFAULT_OUTPUT_DIR

if TYPE_CHECKING:
    from coordinator.cluster.group import Cluster, NodeOutcome

# Seconds a node may take to install the project (pip resolving and downloading).
INSTALL_TIMEOUT_S = 900.0
# How long building the wheel on the head node may take (seconds).
BUILD_TIMEOUT_S = 300.0


def data_files(paths: Iterable[str], workdir: Path) -> dict[str, Path]:
    """relative path -> local file for each ``--data`` file or directory (under ``workdir``)."""
    files: dict[str, Path] = {}
    base = workdir.resolve()
    for given in paths:
        local = (workdir / given).resolve()
        if Path(given).is_absolute() or not local.is_relative_to(base):
            raise InvalidJobsError(
                f"--data {given}: give a path inside the working directory {base}; it lands at "
                f"the same relative path under each node's workdir")
        if local.is_dir():
            for relative, path in tree_files(local).items():
                files[posixpath.join(local.relative_to(base).as_posix(), relative)] = path
        elif local.is_file():
            files[local.relative_to(base).as_posix()] = local
        else:
            raise InvalidJobsError(f"--data {given}: no such file or directory")
    return files


# What a scripts directory may hold that is not scripts, never shipped with them: the
# inventory, key material and env files (passwords), outputs and Step 3 data.
NOT_SCRIPTS = {
    "the inventory": ("cluster.toml",),
    "key files": ("id_rsa*", "id_ed25519*", "id_ecdsa*", "id_dsa*", "*.pem", "*.key", "*.env"),
    "outputs and data (deploy data with --data)": (
        DEFAULT_OUTPUT_DIR, DEFAULT_CHUNK_DIR, "demo", "survivors*.json", "train_history*.json",
        "*_jobs.json", "run_summary.json", "joblog"),
}


def scripts_files(scripts_dir: Path, excludes: Iterable[str] = (),
                  inventory: Path | None = None) -> tuple[dict[str, Path], list[str]]:
    """The files to deploy from ``scripts_dir`` and one line per kind of file left out
    (``NOT_SCRIPTS``, and the ``inventory`` in use wherever it is named); no files is for
    the caller to judge (a ``--project`` deploy needs none)."""
    if not scripts_dir.is_dir():
        raise InvalidJobsError(f"--scripts-dir {scripts_dir}: not a directory")
    everything = tree_files(scripts_dir, excludes)
    files = tree_files(scripts_dir, [*excludes, *(pattern for patterns in NOT_SCRIPTS.values()
                                                  for pattern in patterns)])
    if inventory is not None:
        files = {name: path for name, path in files.items()
                 if path.resolve() != inventory.resolve()}
    left_out = sorted(set(everything) - set(files))
    skipped = []
    for kind, patterns in NOT_SCRIPTS.items():
        names = [name for name in left_out
                 if any(fnmatch.fnmatch(part, pattern) for part in PurePosixPath(name).parts
                        for pattern in patterns)]
        if kind == "the inventory" and inventory is not None:
            names += [name for name in left_out if name not in names
                      and everything[name].resolve() == inventory.resolve()]
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                            else "")
            skipped.append(f"left out {kind}: {shown}")
    return files, skipped


def deploy_trust(remote: RemoteNode, cert: Path) -> str:
    """The head's certificate (never its key) into the node's trust store."""
    return "trust: " + push(remote, {cert.name: cert}, remote.node.trust_dir).line()


def deploy_redis_ca(remote: RemoteNode, ca: Path) -> str:
    """The CA of the broker's TLS certificate, for the node's rediss:// connections."""
    return "redis CA: " + push(remote, {REDIS_CA_NAME: ca}, remote.node.state_dir).line()


# The broker's CA on a node, in its state directory (``cluster up`` points SC_REDIS_CA at it).
REDIS_CA_NAME = "redis-ca.crt"


def deploy_scripts(remote: RemoteNode, files: dict[str, Path]) -> str:
    return "scripts: " + push(remote, files, remote.node.config.scripts_dir).line()


def deploy_data(remote: RemoteNode, files: dict[str, Path]) -> str:
    return "data: " + push(remote, files, remote.node.config.workdir).line()


def project_source() -> Path:
    """The source tree this running copy of the project came from (it has pyproject.toml)."""
    import coordinator

    root = Path(coordinator.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise InvalidJobsError(
            "--project: this installation has no source tree to build from; give a wheel: "
            "--project dist/scripts_coordinator-<version>-py3-none-any.whl")
    return root


def build_wheel(source: Path, out_dir: Path) -> Path:
    """Build this project's wheel (no dependencies) on the head node.

    With the build tools already installed here (offline); if they are missing or
    too old, pip fetches them into an isolated build environment.
    """
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
               "--wheel-dir", str(out_dir), str(source)]
    # setuptools builds in the source tree (build/, *.egg-info): two builds of one tree at
    # once trample each other, so they take turns.
    name = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    with (Path(tempfile.gettempdir()) / f"sc-wheel-build-{name}.lock").open("a") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        done = subprocess.run([*command, "--no-build-isolation"], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S, check=False)
    wheels = sorted(out_dir.glob("scripts_coordinator-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InvalidJobsError(f"--project: building the wheel from {source} failed: {tail[0]}")
    return wheels[-1]


def project_wheel(given: str | None, work: Path) -> Path:
    """The wheel ``--project`` installs: the one given, or one built from the source tree."""
    if given:
        wheel = Path(given)
        if not wheel.is_file() or wheel.suffix != ".whl":
            raise InvalidJobsError(f"--project {given}: not a wheel file")
        return wheel
    return build_wheel(project_source(), work)


def install_project(remote: RemoteNode, wheel: Path) -> str:
    """Install the wheel with the node's configured Python, with the node's ``extras``
    (default ``worker``: Numba; ``gpu``: CuPy), dependencies as pip resolves them there."""
    node = remote.node
    python = node.config.python
    if not remote.run(["test", "-x", python]).ok:
        raise NodeError(f"Python missing on the node: {python} not found (create it there, e.g. "
                        f"python3 -m venv {venv_of(python)})")
    wheels_dir = posixpath.join(node.state_dir, "wheels")
    push(remote, {wheel.name: wheel}, wheels_dir)
    remote_wheel = posixpath.join(wheels_dir, wheel.name)
    extras = node.config.extras
    with_extras = f"{remote_wheel}[{','.join(extras)}]" if extras else remote_wheel
    shown = f"{wheel.name}[{','.join(extras)}]" if extras else wheel.name
    # First the dependencies and extras (as pip resolves them on the node), then this build.
    for args in (["install", "--quiet", with_extras],
                 ["install", "--quiet", "--force-reinstall", "--no-deps", remote_wheel]):
        result = remote.run([python, "-m", "pip", *args], timeout=INSTALL_TIMEOUT_S)
        if not result.ok:
            raise NodeError(f"pip install of {shown} failed on the node: "
                            f"{result.last_line()}")
    check = remote.coordinator("--version")
    if not check.ok:
        raise NodeError(f"installed, but `{python} -m coordinator` fails: {check.last_line()}")
    return f"project: installed {shown} ({check.stdout.strip()})"


def venv_of(python: str) -> str:
    """``/opt/x/.venv/bin/python`` -> ``/opt/x/.venv`` (for the hint), else the bin's parent."""
    return posixpath.dirname(posixpath.dirname(python)) or "/opt/venv"


def with_workdir(work: Path | None = None) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="sc-deploy-", dir=work)


class Deployment:
    """What ``cluster deploy`` puts on every node, gathered once on the head.

    Parameters:
        scripts_dir, excludes, inventory: the scripts to push (the inventory file and
            ``excludes`` are left out); ignored with ``no_scripts``.
        data: files or directories to push into each node's workdir.
        project: None (no install), ``""`` (a wheel built from this source tree) or a
            wheel file.
        certificate, redis_ca: the head's certificate and the broker's CA, when set.
    """

    def __init__(self, scripts_dir: Path, excludes: Iterable[str], inventory: Path,
                 data: list[str] | None, project: str | None, no_scripts: bool,
                 certificate: Path | None, redis_ca: Path | None) -> None:
        self.notes: list[str] = []  # lines to print before anything is sent
        self.scripts: dict[str, Path] | None = None
        if not no_scripts:
            scripts, skipped = scripts_files(scripts_dir, excludes, inventory)
            self.notes += [f"scripts: {line}" for line in skipped]
            if scripts:
                self.scripts = scripts
            elif project is None and not data:
                raise InvalidJobsError(f"--scripts-dir {scripts_dir}: no files to deploy")
            else:
                self.notes.append(f"scripts: none in {scripts_dir}; deploying only the "
                                  f"{'project' if project is not None else 'data'}")
        self.data = data_files(data, Path.cwd()) if data else None
        self.project = project
        self.certificate = certificate
        self.redis_ca = redis_ca

    def onto(self, cluster: Cluster) -> list[NodeOutcome]:
        """Everything onto every node of ``cluster`` in parallel (the wheel is built first,
        once): one outcome per node."""
        with with_workdir() as scratch:
            wheel = (project_wheel(self.project or None, Path(scratch))
                     if self.project is not None else None)

            def one(remote: RemoteNode) -> str:
                done = []
                if wheel is not None:
                    done.append(install_project(remote, wheel))
                if self.certificate is not None:
                    done.append(deploy_trust(remote, self.certificate))
                if self.redis_ca is not None:
                    done.append(deploy_redis_ca(remote, self.redis_ca))
                if self.scripts is not None:
                    done.append(deploy_scripts(remote, self.scripts))
                if self.data is not None:
                    done.append(deploy_data(remote, self.data))
                return "; ".join(done)

            return cluster.each(one)
