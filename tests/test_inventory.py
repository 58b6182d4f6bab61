"""The inventory file: a valid one loads with its defaults, a bad one is one line and exit 2."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from coordinator.broker import with_password
from coordinator.cluster.inventory import EXAMPLE, load_inventory
from coordinator.errors import InvalidJobsError
from coordinator.redis_server import RedisServer
from tests.helpers import run_cli

GOOD = """\
[defaults]
user = "pipeline"
python = "/opt/pipeline/.venv/bin/python"
scripts_dir = "/opt/pipeline"
workdir = "/data/pipeline"

[nodes.rig-a]
host = "gpu-node-1.lan"
gpus = 2

[nodes."127.0.0.7"]
workdir = "/scratch"
shared_storage = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_defaults_apply_and_the_label_is_the_default_host(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, GOOD))
    assert list(inventory.nodes) == ["rig-a", "127.0.0.7"]
    rig_a, by_address = inventory.nodes["rig-a"], inventory.nodes["127.0.0.7"]
    assert (rig_a.config.host, rig_a.config.port, rig_a.config.gpus) == ("gpu-node-1.lan", 22, 2)
    assert rig_a.config.workdir == "/data/pipeline" and by_address.config.workdir == "/scratch"
    assert by_address.config.host == "127.0.0.7" and by_address.config.user == "pipeline"
    assert rig_a.pidfile() == "/data/pipeline/.scripts-coordinator/worker-rig-a.pid"
    assert not rig_a.config.shared_storage and by_address.config.shared_storage
    # Jobs files may name a node by label or by its host.
    assert inventory.resolve("rig-a") == "rig-a"
    assert inventory.resolve("gpu-node-1.lan") == "rig-a"
    assert inventory.resolve("127.0.0.7") == "127.0.0.7"
    assert inventory.resolve("rig-q") is None


def test_the_init_example_is_a_valid_inventory(tmp_path: Path) -> None:
    result = run_cli("cluster", "init")
    assert result.returncode == 0 and result.stdout == EXAMPLE
    inventory = load_inventory(write(tmp_path, result.stdout))
    assert {label: node.config.gpus for label, node in inventory.nodes.items()} == {
        "rig-a": 2, "rig-b": 1}


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("gpus = 2", "gpsu = 2"), "[nodes.rig-a]: unknown key 'gpsu' (known: "),
    (GOOD.replace('user = "pipeline"', 'usr = "pipeline"'), "[defaults]: unknown key 'usr'"),
    (GOOD.replace('workdir = "/data/pipeline"\n', ""),
     "[nodes.rig-a]: workdir: not set (in [nodes.rig-a] or [defaults])"),
    (GOOD.replace('"/opt/pipeline"', '"opt/pipeline"'),
     "[nodes.rig-a]: scripts_dir: 'opt/pipeline' must be an absolute path on the node"),
    (GOOD + '\n[nodes.rig-a]\nhost = "again"\n', "invalid TOML: Cannot declare"),
    (GOOD.replace('host = "gpu-node-1.lan"', 'host = ""'),
     "[nodes.rig-a]: host: '' is not a host name or address"),
    (GOOD.replace('host = "gpu-node-1.lan"', 'host = "gpu node"'),
     "[nodes.rig-a]: host: 'gpu node' is not a host name or address"),
    (GOOD.replace("gpus = 2", 'gpus = "2"'), "[nodes.rig-a]: gpus: Input should be a valid "
                                            "integer"),
    (GOOD.replace("gpus = 2", "port = 70000"), "[nodes.rig-a]: port: Input should be less "),
    (GOOD.replace("[nodes.rig-a]", '[nodes."rig a"]'), "'rig a' is not a valid node label"),
    (GOOD.replace("[nodes.rig-a]", "[node.rig-a]"), "unknown table 'node'"),
    ("[defaults]\nuser = 'x'\n", "no nodes (add a [nodes.<label>] table per GPU node)"),
    ("[nodes\n", "invalid TOML"),
])
def test_a_bad_inventory_is_one_line_and_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidJobsError) as caught:
        load_inventory(path)
    assert expected in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")
    result = run_cli("cluster", "status", "--inventory", str(path))
    assert result.returncode == 2
    assert result.stderr == f"coordinator: error: {caught.value}\n"


def test_a_missing_inventory_says_how_to_make_one(tmp_path: Path) -> None:
    result = run_cli("cluster", "up", cwd=tmp_path, env={"SC_INVENTORY": ""})
    assert result.returncode == 2
    assert result.stderr == ("coordinator: error: cluster.toml: inventory not found (write one "
                             "with: coordinator cluster init > cluster.toml; or give --inventory "
                             "FILE / $SC_INVENTORY)\n")


def test_the_broker_password_may_come_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_BROKER_PASSWORD", "p@ss:word")
    assert with_password("redis://zeus:6379/0") == "redis://:p%40ss%3Aword@zeus:6379/0"
    assert with_password("redis://pipeline@zeus/0") == "redis://pipeline:p%40ss%3Aword@zeus/0"
    assert with_password("redis://:inline@zeus/0") == "redis://:inline@zeus/0"  # file wins
    monkeypatch.delenv("SC_BROKER_PASSWORD")
    assert with_password("redis://zeus:6379/0") == "redis://zeus:6379/0"


# A password with every character a URL gives a meaning to.
AWKWARD = "p/ss?w#rd%x@y:z"


def test_a_password_that_needs_encoding_works_the_same_on_the_head(tmp_path: Path) -> None:
    """The head's SC_BROKER_URL gets $SC_BROKER_PASSWORD filled in (encoded) as the nodes'
    URLs do; a raw URL that the parser would misread is refused in one line (issue 22, 6)."""
    with RedisServer(password=AWKWARD) as server:
        plain = f"redis://127.0.0.1:{server.port}/0"
        ok = run_cli("runs", env={"SC_BROKER_URL": plain, "SC_BROKER_PASSWORD": AWKWARD})
        assert ok.returncode == 0, ok.stderr
        raw = run_cli("runs", env={"SC_BROKER_URL": f"redis://:{AWKWARD}@127.0.0.1:"
                                                    f"{server.port}/0"})
        assert raw.returncode == 2, raw.stderr
        assert raw.stderr.count("\n") == 1 and "must be percent-encoded" in raw.stderr
        assert AWKWARD not in raw.stderr  # the password itself is never printed
        encoded = run_cli("runs", env={"SC_BROKER_URL": f"redis://:{quote(AWKWARD, safe='')}"
                                                        f"@127.0.0.1:{server.port}/0"})
        assert encoded.returncode == 0, encoded.stderr
