"""Only the head node can make a node run anything: signed jobs against an attacker who
has the whole broker (the Redis password) but not the head's key.

The cluster is a signed local one (``LocalCluster(signed=True)``, as ``coordinator local``
and ``demo`` start): a throwaway head key, workers that trust only its certificate and
require signatures. Each refusal is one line in the worker's log; nothing runs (the
probe's ledger says so); the worker goes on serving.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.redis_server import free_port
from tests.helpers import BIN, REPO, echo_job, run_cli
from tests.waiting import wait_for
from worker_tasks import signing

NODES = ["rig-a", "rig-b"]
# Celery's auth payload: five fields joined by this separator (celery.security).
SEPARATOR = b"\x00\x01"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("signed")
    (workdir / "ledger").mkdir()
    with LocalCluster(NODES, scripts_dir=REPO, workdir=workdir, log_dir=workdir / "logs",
                      signed=True) as cluster:
        yield cluster


@pytest.fixture()
def as_head(signed: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    """This process publishes as the head node: with its key."""
    for name, value in signed.head_env().items():
        monkeypatch.setenv(name, value)
    return signed


@pytest.fixture()
def as_attacker(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process has the broker URL and nothing else."""
    for name in (signing.KEY_VARIABLE, signing.CERT_VARIABLE, signing.UNSIGNED_VARIABLE):
        monkeypatch.delenv(name, raising=False)


def probe(cluster: LocalCluster, job_id: str, node: str, *extra: str) -> dict[str, Any]:
    return {"job_id": job_id, "script": "tests/probe_job.py", "node": node,
            "args": ["--ledger", str(cluster.workdir / "ledger"), "--output-file",
                     f"o/{job_id}.json", *extra]}


def executions(cluster: LocalCluster, job_id: str) -> int:
    path = cluster.workdir / "ledger" / f"{job_id}.ledger"
    return path.read_text().count("start ") if path.exists() else 0


def log_of(cluster: LocalCluster, node: str) -> str:
    return (cluster.log_dir / f"worker-{node}.log").read_text(errors="replace")


def refused(cluster: LocalCluster, node: str, task_id: str, reason: str) -> None:
    """Wait for the one line that refuses ``task_id`` for ``reason``."""
    line = f"refused message {task_id}: "

    def seen() -> bool:
        return any(line in text and reason in text and "nothing run" in text
                   for text in log_of(cluster, node).splitlines())

    wait_for(seen, 30, f"the worker of {node} to refuse {task_id} ({reason})")


def still_serving(cluster: LocalCluster, node: str, name: str) -> None:
    """``node``'s worker runs the head's next job (published with the head's key)."""
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in cluster.head_env().items():
            patch.setenv(variable, value)
        run = submit([echo_job(name, node, "o")], output_dir="o",
                     broker_url=cluster.broker_url)
        assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED


def broker(cluster: LocalCluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.broker_url)


def take_message(cluster: LocalCluster, queue: str) -> dict[str, Any]:
    """The one message waiting in ``queue`` (a node no worker serves), taken out."""
    raw = broker(cluster).rpop(queue)
    assert raw is not None, f"no message in {queue}"
    return json.loads(raw)


def put_message(cluster: LocalCluster, queue: str, envelope: dict[str, Any]) -> None:
    broker(cluster).lpush(queue, json.dumps(envelope))


def with_signed_body(envelope: dict[str, Any],
                     change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The envelope with its job changed inside the signed payload, signature kept."""
    payload = base64.b64decode(base64.b64decode(envelope["body"]))
    signer, signature, content_type, encoding, body = payload.split(SEPARATOR, 4)
    decoded = json.loads(body)
    change(decoded[0][0])
    fields = [signer, signature, content_type, encoding, json.dumps(decoded).encode()]
    packed = base64.b64encode(SEPARATOR.join(fields))
    return {**envelope, "body": base64.b64encode(packed).decode()}


def test_unsigned_and_foreign_jobs_are_refused_in_one_line(
        signed: LocalCluster, as_attacker: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (a) a well-formed job, published as the head would, but with no key.
    unsigned = submit([probe(signed, "plain", "rig-a")], output_dir="o",
                      broker_url=signed.broker_url)
    refused(signed, "rig-a", f"{unsigned.id}.plain.0", "not signed (content type "
            "application/json)")
    # (b) signed, by a key whose certificate the workers do not trust.
    key, cert = signing.make_keypair(tmp_path / "mallory", "mallory")
    monkeypatch.setenv(signing.KEY_VARIABLE, str(key))
    monkeypatch.setenv(signing.CERT_VARIABLE, str(cert))
    foreign = submit([probe(signed, "foreign", "rig-b")], output_dir="o",
                     broker_url=signed.broker_url)
    refused(signed, "rig-b", f"{foreign.id}.foreign.0", "Unknown certificate")
    assert executions(signed, "plain") == executions(signed, "foreign") == 0
    shown = run_cli("status", unsigned.id, "--no-check", "--broker", signed.broker_url)
    # Said because these workers run only signed jobs (not on a cluster that signs nothing).
    (line,) = [line for line in shown.stderr.splitlines() if "unsigned: run" in line]
    assert line.startswith(f"coordinator: unsigned: run {unsigned.id}'s jobs were published "
                           f"unsigned (no head key: coordinator cluster init makes one), and "
                           f"rig-a@") and line.endswith(" run only signed jobs: they refuse them")
    for run in (unsigned, foreign):
        assert not (signed.workdir / "o" / f"{run.status().jobs[0].job_id}.json").exists()


def test_the_head_nodes_jobs_run_and_the_workers_serve_on(as_head: LocalCluster) -> None:
    run = submit([probe(as_head, "good", "rig-a")], output_dir="o",
                 broker_url=as_head.broker_url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    assert executions(as_head, "good") == 1
    shown = run_cli("status", run.id, "--no-check", "--broker", as_head.broker_url)
    assert shown.returncode == 0 and "unsigned" not in shown.stderr
    still_serving(as_head, "rig-b", "after_refusals")


def test_an_altered_or_rerouted_signed_message_is_refused(as_head: LocalCluster) -> None:
    # A signed job for a node no worker serves: its message waits, the attacker takes it.
    run = submit([probe(as_head, "held", "rig-z")], output_dir="o",
                 broker_url=as_head.broker_url)
    envelope = take_message(as_head, "node.rig-z")
    task_id = f"{run.id}.held.0"
    # (c) its body altered (sent to rig-a instead), the signature kept.
    altered = with_signed_body(envelope, lambda job: job.update(node="rig-a"))
    put_message(as_head, "node.rig-a", altered)
    refused(as_head, "rig-a", task_id, "its signature does not verify")
    # (d) the same message, unaltered, pushed into another node's queue.
    put_message(as_head, "node.rig-b", envelope)
    refused(as_head, "rig-b", task_id, "signed for queue node.rig-z")
    # Its headers are not signed: an id other than the one it was signed with is refused.
    renamed = {**envelope, "headers": {**envelope["headers"], "id": f"{run.id}.held.7"}}
    put_message(as_head, "node.rig-a", renamed)
    refused(as_head, "rig-a", f"{run.id}.held.7", f"signed for task id '{task_id}'")
    assert executions(as_head, "held") == 0
    still_serving(as_head, "rig-a", "after_forgeries")


def test_a_replayed_signed_message_runs_nothing(as_head: LocalCluster) -> None:
    """(e) Copies of signed messages taken while they waited, pushed again after their job
    succeeded or was cancelled: the record and the .done drop them."""
    busy = submit([probe(as_head, "busy", "rig-a", "--sleep", "3")], output_dir="o",
                  broker_url=as_head.broker_url)
    wait_for(lambda: busy.status().jobs[0].state is JobState.RUNNING, 60, "rig-a to be busy")
    finished = submit([probe(as_head, "finished", "rig-a")], output_dir="o",
                      broker_url=as_head.broker_url)
    cancelled = submit([probe(as_head, "cancelled", "rig-a")], output_dir="o",
                       broker_url=as_head.broker_url)
    copies = [json.loads(raw) for raw in broker(as_head).lrange("node.rig-a", 0, -1)]
    assert len(copies) == 2
    cancelled.cancel()
    assert finished.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    assert cancelled.wait(timeout=60).jobs[0].state is JobState.CANCELLED
    before = log_of(as_head, "rig-a").count("cancelled; not run")
    for envelope in copies:
        put_message(as_head, "node.rig-a", envelope)
    wait_for(lambda: log_of(as_head, "rig-a").count("cancelled; not run") > before
             and log_of(as_head, "rig-a").count(f"{finished.id}.finished.0] succeeded") >= 2,
             30, "the worker to drop both replays")
    assert "'state': 'skipped'" in log_of(as_head, "rig-a")  # found its .done
    assert executions(as_head, "finished") == 1 and executions(as_head, "cancelled") == 0
    assert finished.status().jobs[0].state is JobState.SUCCEEDED


def test_a_job_sent_through_flowers_task_api_is_refused(signed: LocalCluster,
                                                         as_attacker: None) -> None:
    """(f) Flower's task API publishes as any Celery client does: unsigned."""
    port = free_port()
    from coordinator.local import worker_name

    env = {name: value for name, value in os.environ.items()
           if name not in (signing.KEY_VARIABLE, signing.CERT_VARIABLE)}
    env[signing.NODE_CERTS_VARIABLE] = signed.head_env()[signing.NODE_CERTS_VARIABLE]
    flower = subprocess.Popen([str(BIN / "coordinator"), "flower", "--port", str(port),
                               "--broker", signed.broker_url], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    message = {"run_id": "20261205-000000-abcdef", "job_id": "via_flower",
               "script": "examples/write_output.py",
               "args": ["--output-file", "o/via_flower.json"], "node": "rig-a", "gpu_id": 0,
               "done_file": "o/via_flower.json.done", "log_file": "o/logs/via_flower.log"}
    body = json.dumps({"args": [message], "queue": "node.rig-a"}).encode()
    url = f"http://127.0.0.1:{port}/api/task/async-apply/scripts_coordinator.run_job"
    sent: dict[str, Any] = {}

    def send() -> bool:
        try:
            request = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as response:
                sent.update(json.loads(response.read()))
            return True
        except OSError:
            return False

    workers: dict[str, Any] = {}

    def listed() -> bool:
        api = f"http://127.0.0.1:{port}/api/workers?refresh=1"
        with urllib.request.urlopen(api, timeout=10) as response:
            workers.update(json.loads(response.read()))
        return len(workers) == len(NODES) and all("stats" in info for info in workers.values())

    try:
        wait_for(send, 60, "Flower to take the task", every=0.5)
        refused(signed, "rig-a", sent["task-id"], "not signed")
        # Flower holds no key: it still inspects every worker (their replies verified
        # against the nodes' certificates), and its shutdown button is refused.
        wait_for(listed, 60, "Flower to list both workers with their stats", every=0.5)
        before = log_mark(signed, "rig-b")
        shutdown = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/worker/shutdown/{worker_name('rig-b')}",
            data=b"", method="POST")
        urllib.request.urlopen(shutdown, timeout=10).close()
        control_refused(signed, "rig-b", "command shutdown: not signed by the head", before)
    finally:
        flower.terminate()
        flower.wait(timeout=30)
    assert not (signed.workdir / "o" / "via_flower.json").exists()
    assert signed.workers["rig-b"].poll() is None
    still_serving(signed, "rig-b", "after_flower")


def test_rotation_refuses_no_job_and_then_the_old_key(signed: LocalCluster,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """A second certificate trusted beside the first, the head switched to the new key with
    jobs of the old one still queued, then the old certificate removed."""
    assert signed.keys_dir is not None
    trusted = signed.keys_dir / "trusted"
    old_env = signed.head_env()
    for name, value in old_env.items():
        monkeypatch.setenv(name, value)
    busy = submit([probe(signed, "rot_busy", "rig-b", "--sleep", "2")], output_dir="o",
                  broker_url=signed.broker_url)
    wait_for(lambda: busy.status().jobs[0].state is JobState.RUNNING, 60, "rig-b to be busy")
    old_jobs = submit([probe(signed, "rot_old", "rig-b")], output_dir="o",
                      broker_url=signed.broker_url)
    key, cert = signing.make_keypair(tmp_path / "new", "head-2")
    shutil.copy(cert, trusted / cert.name)
    monkeypatch.setenv(signing.KEY_VARIABLE, str(key))
    monkeypatch.setenv(signing.CERT_VARIABLE, str(cert))
    new_jobs = submit([probe(signed, "rot_new", "rig-b")], output_dir="o",
                      broker_url=signed.broker_url)
    for run in (busy, old_jobs, new_jobs):
        assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    (trusted / Path(old_env[signing.CERT_VARIABLE]).name).unlink()
    monkeypatch.setenv(signing.KEY_VARIABLE, old_env[signing.KEY_VARIABLE])
    monkeypatch.setenv(signing.CERT_VARIABLE, old_env[signing.CERT_VARIABLE])
    stale = submit([probe(signed, "rot_stale", "rig-b")], output_dir="o",
                   broker_url=signed.broker_url)
    refused(signed, "rig-b", f"{stale.id}.rot_stale.0", "Unknown certificate")
    assert executions(signed, "rot_stale") == 0
    # Put the old certificate back for the module's other tests.
    shutil.copy(old_env[signing.CERT_VARIABLE], trusted)


def test_a_worker_that_requires_signatures_needs_a_trust_store(tmp_path: Path) -> None:
    result = run_cli("worker", "--node", "rig-q", "--workdir", str(tmp_path),
                     "--require-signed", env={signing.TRUST_VARIABLE: ""})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "signed jobs are required but there is no trust store" in result.stderr


def test_a_bad_file_in_the_trust_store_refuses_jobs_and_the_worker_lives(
        as_head: LocalCluster) -> None:
    assert as_head.keys_dir is not None
    garbage = as_head.keys_dir / "trusted" / "garbage.crt"
    garbage.write_text("not a certificate\n")
    try:
        run = submit([probe(as_head, "garbled", "rig-a")], output_dir="o",
                     broker_url=as_head.broker_url)
        refused(as_head, "rig-a", f"{run.id}.garbled.0", "the trust store cannot be read")
        assert executions(as_head, "garbled") == 0
    finally:
        garbage.unlink()
    still_serving(as_head, "rig-a", "after_garbage")


# -- remote control: the head's commands signed, the nodes' replies signed ---------------------

def control_refused(cluster: LocalCluster, node: str, reason: str, since: int) -> None:
    """Wait for a line, after offset ``since`` of ``node``'s log, refusing a control message
    for ``reason``."""
    def seen() -> bool:
        return any(reason in line and ("refused control" in line and "nothing done" in line
                                       or "failed" in line)
                   for line in log_of(cluster, node)[since:].splitlines())

    wait_for(seen, 30, f"the worker of {node} to refuse ({reason})")


def log_mark(cluster: LocalCluster, node: str) -> int:
    return len(log_of(cluster, node))


def test_a_command_that_changes_a_worker_needs_the_heads_signature(
        signed: LocalCluster, as_attacker: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.broker import publisher
    from coordinator.local import worker_name

    rig_a = worker_name("rig-a")
    app = publisher(signed.broker_url)  # the broker URL, no key
    # Reading is open (what Flower does without a key): the node answers, signed.
    assert app.control.ping(destination=[rig_a], timeout=2) == [{rig_a: {"ok": "pong"}}]
    # Changing is not: an unsigned shutdown is refused, answered with the reason.
    before = log_mark(signed, "rig-a")
    replies = app.control.broadcast("shutdown", destination=[rig_a], reply=True, timeout=2)
    assert replies == [{rig_a: {"error": "refused: not signed by the head node (unsigned, "
                                         "only inspection commands are taken)"}}]
    control_refused(signed, "rig-a", "command shutdown: not signed by the head node", before)
    # Signed by a key the workers do not trust: it does not verify.
    key, cert = signing.make_keypair(tmp_path / "mallory", "mallory")
    monkeypatch.setenv(signing.KEY_VARIABLE, str(key))
    monkeypatch.setenv(signing.CERT_VARIABLE, str(cert))
    mallory = publisher(signed.broker_url)
    before = log_mark(signed, "rig-a")
    mallory.control.broadcast("shutdown", destination=[rig_a])
    control_refused(signed, "rig-a", "does not verify", before)
    for node in NODES:
        assert signed.workers[node].poll() is None
        still_serving(signed, node, f"after_control_{node}")


def test_a_signed_command_runs_once_and_only_while_fresh(as_head: LocalCluster) -> None:
    """The head's signed command runs; a copy taken off the wire and sent again, or one
    signed long ago, is refused."""
    from kombu import pidbox

    from coordinator.broker import publisher
    from coordinator.local import worker_name
    from worker_tasks.mailbox import NONCE, SENT_AT

    rig_b = worker_name("rig-b")
    app = publisher(as_head.broker_url)
    listener = broker(as_head).pubsub()
    listener.psubscribe("*pidbox*")
    wait_for(lambda: listener.get_message(timeout=0.1) is not None, 10, "the subscription")
    rate = {"task_name": "scripts_coordinator.run_job", "rate_limit": "1000/s"}
    replies = app.control.broadcast("rate_limit", arguments=rate, destination=[rig_b],
                                    reply=True, timeout=2)
    assert replies == [{rig_b: {"ok": "new rate limit set successfully"}}]
    sent: list[tuple[bytes, bytes]] = []

    def captured() -> bool:
        message = listener.get_message(timeout=0.1)
        if message and message["type"] == "pmessage":
            sent.append((message["channel"], message["data"]))
        return bool(sent)

    wait_for(captured, 10, "the signed command on the wire")
    listener.close()
    assert json.loads(sent[0][1])["content-type"] == signing.SIGNED_CONTENT_TYPE
    before = log_mark(as_head, "rig-b")
    broker(as_head).publish(*sent[0])
    control_refused(as_head, "rig-b", "signed, but seen before (a replay)", before)
    # Hand-made control messages that are no command, or no message at all: one line each.
    envelope = json.loads(sent[0][1])
    for body, reason in ((b'"shutdown"', "not a command"),
                         (b"{not json", "cannot be read or does not verify"),
                         (b'{"method": "ping", "reply_to": 5}', "its reply_to is not"),
                         (b'{"method": "active_queues", "arguments": {"x": 1}}',
                          "control command active_queues failed")):
        before = log_mark(as_head, "rig-b")
        forged = {**envelope, "content-type": "application/json",
                  "body": base64.b64encode(body).decode()}
        broker(as_head).publish(sent[0][0], json.dumps(forged))
        control_refused(as_head, "rig-b", reason, before)
    # Signed by the head an hour ago (kombu's own publish: no fresh stamp added).
    before = log_mark(as_head, "rig-b")
    with app.connection_for_write() as connection:
        mailbox = app.control.mailbox(connection)
        pidbox.Mailbox._publish(mailbox, "rate_limit",
                                {**rate, SENT_AT: time.time() - 3600, NONCE: "old"},
                                destination=[rig_b], serializer=signing.AUTH_SERIALIZER)
    control_refused(as_head, "rig-b", "signed, but not sent in the last", before)
    still_serving(as_head, "rig-b", "after_replays")


def test_the_head_takes_only_replies_its_node_certificates_verify(
        as_head: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from coordinator.broker import publisher
    from coordinator.local import worker_name

    names = {worker_name(node) for node in NODES}
    answered = {name for reply in publisher(as_head.broker_url).control.ping(timeout=2)
                for name in reply}
    assert answered == names
    # A head that trusts another node's certificate, not theirs: their replies are skipped.
    _, other = signing.make_keypair(tmp_path / "other", "rig-other")
    monkeypatch.setenv(signing.NODE_CERTS_VARIABLE, str(other.parent))
    (other.parent / "rig-other.key").unlink()
    with caplog.at_level("WARNING", logger="worker_tasks.mailbox"):
        assert publisher(as_head.broker_url).control.ping(timeout=2) == []
    assert "skipped a control reply that does not verify" in caplog.text
    # A worker that signs nothing (no key of its own): its unsigned replies are skipped too.
    env = {signing.TRUST_VARIABLE: str(as_head.keys_dir / "trusted"),  # type: ignore[operator]
           signing.KEY_VARIABLE: "", signing.CERT_VARIABLE: ""}
    monkeypatch.setenv(signing.NODE_CERTS_VARIABLE,
                       as_head.head_env()[signing.NODE_CERTS_VARIABLE])
    caplog.clear()
    with LocalCluster(["rig-u"], scripts_dir=REPO, workdir=tmp_path, log_dir=tmp_path / "logs",
                      broker_url=as_head.broker_url, extra_env=env):
        app = publisher(as_head.broker_url)
        rig_u = worker_name("rig-u")
        with caplog.at_level("WARNING", logger="worker_tasks.mailbox"):
            assert app.control.ping(destination=[rig_u], timeout=2) == []
        assert "skipped an unsigned control reply" in caplog.text
    # A node answers for itself only: rig-a's key (as if taken from rig-a's disk) signing the
    # replies of a worker that calls itself rig-w is skipped.
    rig_a_keys = as_head.keys_dir / "node-keys"  # type: ignore[operator]
    posing = {signing.TRUST_VARIABLE: str(as_head.keys_dir / "trusted"),  # type: ignore[operator]
              signing.KEY_VARIABLE: str(rig_a_keys / "rig-a.key"),
              signing.CERT_VARIABLE: str(rig_a_keys / "rig-a.crt")}
    caplog.clear()
    with LocalCluster(["rig-w"], scripts_dir=REPO, workdir=tmp_path, log_dir=tmp_path / "logs",
                      broker_url=as_head.broker_url, extra_env=posing):
        with caplog.at_level("WARNING", logger="worker_tasks.mailbox"):
            assert publisher(as_head.broker_url).control.ping(
                destination=[worker_name("rig-w")], timeout=2) == []
        assert f"skipped a control reply for {worker_name('rig-w')} signed by node rig-a's " \
            "key" in caplog.text
    # A worker with no trust store cannot read the head's signed command, and says why.
    bare = {signing.TRUST_VARIABLE: "", signing.KEY_VARIABLE: "", signing.CERT_VARIABLE: ""}
    with LocalCluster(["rig-v"], scripts_dir=REPO, workdir=tmp_path, log_dir=tmp_path / "logs",
                      broker_url=as_head.broker_url, extra_env=bare):
        assert publisher(as_head.broker_url).control.ping(destination=[worker_name("rig-v")],
                                                           timeout=2) == []
        log = tmp_path / "logs" / "worker-rig-v.log"
        wait_for(lambda: "refused control message: signed, and this worker has no trust store"
                 in log.read_text(), 30, "rig-v to say it cannot verify the head's command")
