"""Installed from a wheel and used from anywhere, as a new user would.

The wheel is built from this checkout and installed into a fresh venv outside
the repository (its dependencies come from the suite's own environment, so no
download is needed); the README's commands then run from a directory that has
nothing of the repository in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The build deploy --project uses: it takes turns with the other builds of this tree
    # (tests side by side build it at once).
    from coordinator.cluster.deploy import build_wheel

    return build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with the wheel installed; its dependencies from the suite's environment."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    Path(site, "suite_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(BIN / "python"), "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "-q", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    yield venv


# What the optional extras bring ([head], [worker], [gpu]): left out of the bare install.
OPTIONAL = ("fabric", "paramiko", "flower", "numba", "llvmlite", "cupy")


@pytest.fixture(scope="module")
def bare(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``pip install scripts-coordinator`` without extras: the wheel, and the suite's
    packages but for the optional ones (linked one by one into a directory of its own)."""
    root = tmp_path_factory.mktemp("bare")
    venv, deps = root / "venv", root / "deps"
    deps.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    suite = Path(sysconfig.get_paths()["purelib"])
    ours = ("coordinator", "worker_tasks", "scoring", "celeryconfig", "scripts_coordinator",
            "__editable__", "_scripts_coordinator")
    for entry in suite.iterdir():
        if not entry.name.lower().startswith(OPTIONAL + ours):
            (deps / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    Path(site, "bare_dependencies.pth").write_text(f"{deps}\n")
    subprocess.run([str(BIN / "python"), "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "-q", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    yield venv


def test_a_missing_extra_is_one_line_naming_it(bare: Path, tmp_path: Path) -> None:
    (tmp_path / "cluster.toml").write_text('[defaults]\nscripts_dir = "/opt/p"\n'
                                           'workdir = "/data"\n[nodes.rig-a]\n'
                                           'host = "127.0.0.2"\n')
    for verb in (["deploy"], ["up"], ["status"], ["logs", "rig-a"], ["down"],
                 ["unit", "rig-a"]):
        result = outside(bare, "coordinator", "cluster", *verb, cwd=tmp_path)
        assert result.returncode == 2, (verb, result.stderr)
        assert result.stderr == ("coordinator: error: the cluster verbs: fabric, paramiko not "
                                 "installed; pip install 'scripts-coordinator[head]'\n"), verb
    flower = outside(bare, "coordinator", "flower", cwd=tmp_path)
    assert (flower.returncode, flower.stderr) == (2, (
        "coordinator: error: the dashboard: flower not installed; pip install "
        "'scripts-coordinator[head]'\n"))
    assert outside(bare, "coordinator", "cluster", "init", cwd=tmp_path).returncode == 0


def outside(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A console script of the installed copy, from a directory outside the repository."""
    env = {**os.environ, "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_installed_copy_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = outside(installed, "python", "-c", "import coordinator, worker_tasks; "
                    "print(coordinator.__file__); print(worker_tasks.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(installed)) for line in where.stdout.split())


def test_the_demo_runs_from_any_directory(installed: Path, tmp_path: Path) -> None:
    result = outside(installed, "coordinator", "demo", "--candidates", "20000", "--nodes", "2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "36/36 succeeded" in result.stdout
    assert "found at rank 1 (100 matches)" in result.stdout
    assert (tmp_path / "demo" / "full_scoring_results" / "survivors_with_scores.json").exists()
    assert not list(tmp_path.glob("demo/*.py"))  # the scoring script came built in


def test_the_help_examples_work_after_coordinator_examples(installed: Path,
                                                           tmp_path: Path) -> None:
    copied = outside(installed, "coordinator", "examples", ".", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "examples" / "hello_jobs.json").exists()
    result = outside(installed, "coordinator", "local", "--jobs-file",
                     "examples/hello_jobs.json", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "4/4 succeeded" in result.stdout


def test_the_built_in_scripts_directory_opens_nothing_else(installed: Path,
                                                           tmp_path: Path) -> None:
    (tmp_path / "jobs.json").write_text(
        '[{"job_id": "sneaky", "script": "coordinator/cli/__init__.py", "args": [],'
        ' "node": "rig-a"}, {"job_id": "celery", "script": "celery/__main__.py", "args": [],'
        ' "node": "rig-a"}]')
    result = outside(installed, "coordinator", "local", "--jobs-file", "jobs.json",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "'coordinator/cli/__init__.py' not found in scripts directory" in result.stderr


def test_the_wheel_ships_scripts_and_examples_and_its_extras_split_head_from_worker(
        wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(name).decode() for name in names
                        if name.endswith(".dist-info/METADATA"))
    assert "worker_tasks/builtin_scripts/full_scoring_worker.py" in names
    assert "worker_tasks/builtin_scripts/examples/write_output.py" in names
    assert "coordinator/examples/hello_jobs.json" in names
    assert "coordinator/cluster/remote.py" in names and "coordinator/cli/observe.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    base = [line for line in requires if "extra ==" not in line]
    worker = [line for line in requires if 'extra == "worker"' in line]
    head = [line for line in requires if 'extra == "head"' in line]
    assert not any(line.startswith(("flower", "fabric")) for line in base + worker)
    assert any(line.startswith("flower") for line in head)
    bounds = {line.split("<")[0].split(">")[0].split("[")[0]: line for line in base}
    assert ">=5.7" in bounds["kombu"] and "<6" in bounds["kombu"]  # Producer.batch()
    assert "<6" in bounds["celery"] and "<9" in bounds["redis"]  # the message contract


def test_the_scorer_says_the_engine_that_runs_where_numba_is_missing(bare: Path,
                                                                   tmp_path: Path) -> None:
    data = outside(bare, "coordinator", "demo-data", "--out-dir", "d", "--candidates",
                   "1000000", "--draws", "100", cwd=tmp_path)
    assert data.returncode == 0, data.stderr
    script = next((bare / "lib").glob("python3*/site-packages/worker_tasks/builtin_scripts/"
                                      "full_scoring_worker.py"))
    env = {**os.environ, "PATH": f"{bare / 'bin'}:/usr/bin:/bin"}
    scored = subprocess.run(
        [str(bare / "bin" / "python"), str(script), "--seeds-file", "d/survivors.json",
         "--train-history", "d/train_history.json", "--output-file", "out.json",
         "--prng-type", "java_lcg", "--mod", "1000"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert scored.returncode == 0, scored.stderr
    backend = next(line for line in scored.stderr.splitlines() if line.startswith("backend:"))
    # 10^8 steps would take the compiled engine; without Numba the line says what runs.
    assert "no compiled loops: Numba is not installed" in backend, backend
    assert "engine for this file: vectorized (the compiled engine needs Numba" in backend


def test_a_node_without_numba_says_its_engine_is_numpy(bare: Path, tmp_path: Path) -> None:
    status = outside(bare, "coordinator", "worker", "--node", "rig-a", "--workdir",
                     str(tmp_path), "--status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    engine = json.loads(status.stdout)["engine"]
    assert engine.startswith("numpy (Numba not installed; no GPU: cupy is not installed"), engine
