"""Real OpenSSH servers on loopback addresses, one per test host, each with its own disk.

``SshHost("127.0.0.2", root)`` starts Debian's ``sshd`` on a free port of that
address with a config of its own (key-only auth, ``StrictModes no``, ``UsePAM
no``, SFTP in-process) and gives the host a directory that stands for its disk
(``scripts`` and ``work`` under it). Keys are generated per test run.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.toolchains import require

SSHD = "/usr/sbin/sshd"
# How long sshd may take to accept connections (seconds).
START_TIMEOUT_S = 20.0


def require_sshd() -> None:
    """Skip without sshd, except under CI, where a missing sshd is a failure."""
    require(SSHD, "ssh-keygen", purpose="the SSH test hosts (openssh-server)")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sc-test",
                    "-f", str(path)], check=True, timeout=30)
    return path


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class SshHost:
    """One test host: an sshd on ``address`` and a directory standing for its disk.

    Parameters:
        address: a loopback address (127.0.0.2, 127.0.0.3, ...).
        root: where this host's files go (config, host key, its disk).
        client_key: the public key allowed to log in.
    """

    def __init__(self, address: str, root: Path, client_key: Path) -> None:
        self.address = address
        self.root = root
        self.disk = root / "disk"
        self.port = free_port(address)
        self.user = getpass.getuser()
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (self.disk / "scripts").mkdir(parents=True, exist_ok=True)
        (self.disk / "work").mkdir(parents=True, exist_ok=True)
        host_key = keygen(root / "ssh_host_ed25519_key")
        authorized = root / "authorized_keys"
        authorized.write_text(client_key.read_text())
        authorized.chmod(0o600)
        (root / "sshd_config").write_text(
            f"ListenAddress {address}:{self.port}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PidFile none\n"
            "Subsystem sftp internal-sftp\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel ERROR\n"
        )

    @property
    def scripts_dir(self) -> Path:
        return self.disk / "scripts"

    @property
    def workdir(self) -> Path:
        return self.disk / "work"

    def start(self) -> SshHost:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        log = (self.root / "sshd.log").open("ab")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd on {self.address} exited: "
                                   f"{(self.root / 'sshd.log').read_text()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.address, self.port), timeout=0.5) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd on {self.address}:{self.port} did not answer")

    def stop(self) -> None:
        """Stop sshd and every session it still serves (its process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


def inventory_text(hosts: dict[str, SshHost], key: Path, python: str,
                   extra_nodes: str = "", shared_storage: bool = False) -> str:
    """A cluster.toml for ``hosts`` (label -> host), the way a user writes one."""
    lines = ["[defaults]", f'key = "{key}"', f'python = "{python}"',
             f"shared_storage = {'true' if shared_storage else 'false'}",
             "connect_timeout = 5", ""]
    for label, host in hosts.items():
        lines += [f"[nodes.{label}]", f'host = "{host.address}"', f"port = {host.port}",
                  f'user = "{host.user}"', f'scripts_dir = "{host.scripts_dir}"',
                  f'workdir = "{host.workdir}"', ""]
    return "\n".join(lines) + extra_nodes


def node_venv(disk: Path, head_python: str) -> Path:
    """A venv on a test host's disk without this project, as a node has before ``deploy
    --project``: its dependencies (and pip) come from the head's environment through a
    ``.pth`` file, and its pip is offline (``pip.conf``: no index), so an extra the head
    lacks fails to install instead of being downloaded. Returns its python."""
    venv = disk / "venv"
    subprocess.run([head_python, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    paths = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([str(python), "-c", paths], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()
    head_site = subprocess.run([head_python, "-c", paths], check=True, capture_output=True,
                               text=True, timeout=60).stdout.strip()
    Path(site, "head_dependencies.pth").write_text(head_site + "\n")
    (venv / "pip.conf").write_text("[global]\nno-index = true\n")
    return python
