"""Watching the cluster: ``coordinator flower`` (the dashboard) and ``coordinator metrics``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from coordinator.broker import broker_url as resolve_broker_url
from coordinator.broker import check_broker, connect_tracking, publisher, redact
from coordinator.cli.common import PROG, CommandFactory, require
from coordinator.errors import ExitCode, InvalidJobsError

# Flower reads its settings from FLOWER_* environment variables; this one is user:password.
AUTH_VARIABLE = "FLOWER_BASIC_AUTH"


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def cmd_flower(args: argparse.Namespace) -> int:
    require(["flower"], "head", "the dashboard")
    auth = os.environ.get(AUTH_VARIABLE, "")
    if not auth and not is_loopback(args.address):
        raise InvalidJobsError(
            f"--address {args.address} is reachable from other machines: set {AUTH_VARIABLE}="
            f"user:password in the environment (or listen on 127.0.0.1)")
    if auth and ":" not in auth:
        raise InvalidJobsError(f"{AUTH_VARIABLE} must be user:password")
    url = resolve_broker_url(args.broker)
    check_broker(publisher(url))
    env = dict(os.environ, SC_BROKER_URL=url)
    if not auth:  # loopback only: the REST API needs no password either
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    # Flower's own parser wants --name=value (`--port 5555` is "Option 'port' requires a value").
    command = [sys.executable, "-m", "celery", "-A", "worker_tasks", "flower",
               f"--address={args.address}", f"--port={args.port}",
               f"--max_tasks={args.max_tasks}"]
    from coordinator.broker import broker_client, event_listeners

    # Beside Flower: the runs Redis holds, told again once Flower listens (flower_replay).
    before = ",".join(sorted(item.hex() for item in event_listeners(broker_client(url))))
    subprocess.Popen([sys.executable, "-m", "coordinator.flower_replay", url, before,
                      str(args.max_tasks)], env=env, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    print(f"{PROG}: Flower on http://{args.address}:{args.port} for broker {redact(url)}"
          f"{'' if auth else ' (no password: loopback only)'}; the jobs of the runs Redis "
          f"holds are shown as they ended, then every run live", file=sys.stderr, flush=True)
    os.execve(sys.executable, command, env)  # Flower replaces this process: signals reach it


def cmd_metrics(args: argparse.Namespace) -> int:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import redis

    from coordinator.broker import broker_client
    from coordinator.metrics import collect, write_textfile

    broker = broker_client(args.broker, socket_timeout=10)
    tracking = connect_tracking(None, args.broker)
    if args.textfile:
        path = Path(args.textfile)
        while True:
            write_textfile(path, collect(broker, tracking))
            if args.interval is None:
                print(f"wrote {path}")
                return ExitCode.OK
            time.sleep(args.interval)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "see /metrics")
                return
            try:
                body = collect(broker, tracking).encode()
            except redis.RedisError as err:
                self.send_error(503, f"Redis: {err}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *values: object) -> None:  # noqa: A002
            pass  # one line per scrape would drown the log

    server = ThreadingHTTPServer((args.address, args.port), Handler)
    print(f"{PROG}: metrics on http://{args.address}:{server.server_port}/metrics",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return ExitCode.OK


FLOWER_EXITS = (
    (ExitCode.OK, "Flower stopped (it replaces this process)"),
    (ExitCode.INVALID_INPUT, "Flower is not installed, or a non-loopback --address has no "
                             f"{AUTH_VARIABLE}"),
    ExitCode.BROKER_UNREACHABLE)
METRICS_EXITS = ((ExitCode.OK, "--textfile: written; else the server stopped"),
                 ExitCode.BROKER_UNREACHABLE)


def register(command: CommandFactory) -> None:
    sub = command("flower", "start the Flower dashboard with this project's broker settings",
                  "FLOWER_BASIC_AUTH=admin:change-me coordinator flower --address 0.0.0.0 "
                  "--port 5555",
                  FLOWER_EXITS)
    sub.add_argument("--port", type=int, default=5555, help="HTTP port (default: 5555)")
    sub.add_argument("--address", default="127.0.0.1",
                     help="listen address (default: 127.0.0.1); any other needs "
                          f"{AUTH_VARIABLE}=user:password in the environment")
    sub.add_argument("--max-tasks", dest="max_tasks", type=int, default=100_000,
                     help="tasks Flower keeps in memory (default: 100000)")
    sub.set_defaults(handler=cmd_flower)

    sub = command("metrics", "queue lengths, workers, busy time and runs in Prometheus' format",
                  "coordinator metrics --port 9108   # or: --textfile /var/lib/node_exporter/"
                  "sc.prom --interval 15",
                  METRICS_EXITS)
    sub.add_argument("--port", type=int, default=9108, help="HTTP port (default: 9108)")
    sub.add_argument("--address", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    sub.add_argument("--textfile", metavar="FILE",
                     help="write them to FILE (node_exporter's textfile collector) instead")
    sub.add_argument("--interval", type=float, metavar="S",
                     help="with --textfile: write again every S seconds (default: once)")
    sub.set_defaults(handler=cmd_metrics)
