"""The worker's own rules, which hold whatever a message says (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker_tasks.run_job import JobRefused, check_output, resolve_script, run_script
from worker_tasks.spec import JobSpec


@pytest.fixture()
def scripts(tmp_path: Path) -> Path:
    base = tmp_path / "scripts"
    (base / "tools").mkdir(parents=True)
    (base / "tools" / "ok.py").write_text("print('ok')\n")
    (tmp_path / "outside.py").write_text("print('outside')\n")
    (base / "link_out.py").symlink_to(tmp_path / "outside.py")
    (base / "link_in.py").symlink_to(base / "tools" / "ok.py")
    return base


def test_scripts_resolve_only_inside_the_scripts_directory(scripts: Path) -> None:
    assert resolve_script(scripts, "tools/ok.py") == scripts / "tools" / "ok.py"
    assert resolve_script(scripts, "link_in.py") == scripts / "tools" / "ok.py"
    for script, message in [
        ("/etc/passwd", "is not a path inside"),
        ("../outside.py", "is not a path inside"),
        ("tools/../../outside.py", "is not a path inside"),
        ("link_out.py", "resolves outside"),
        ("tools/missing.py", "not found in scripts directory"),
        ("tools", "not found in scripts directory"),  # a directory is not a script
    ]:
        with pytest.raises(JobRefused, match=message):
            resolve_script(scripts, script)


def spec(**changes: object) -> JobSpec:
    fields = {"run_id": "r", "job_id": "j", "script": "tools/ok.py", "args": [],
              "node": "rig-a", "gpu_id": 2, "output_file": None, "done_file": "j.json.done",
              "log_file": "j.log"}
    fields.update(changes)
    return JobSpec(**fields)  # type: ignore[arg-type]


def test_protected_environment_is_refused_even_if_the_head_node_let_it_through(
    scripts: Path, tmp_path: Path
) -> None:
    with pytest.raises(JobRefused, match="may not set LD_PRELOAD, PYTHONPATH"):
        run_script(spec(env={"PYTHONPATH": "/x", "LD_PRELOAD": "/y.so"}),
                   scripts / "tools" / "ok.py", tmp_path, tmp_path / "j.log")


def test_script_sees_its_gpu_and_extra_env_and_times_out(scripts: Path, tmp_path: Path) -> None:
    probe = scripts / "probe.py"
    probe.write_text("import json, os, sys, time\n"
                     "print(json.dumps({k: os.environ.get(k) for k in "
                     "('CUDA_VISIBLE_DEVICES', 'STEP', 'SC_JOB_ID')}))\n"
                     "time.sleep(float(sys.argv[1]))\n")
    log = tmp_path / "probe.log"
    code, error = run_script(spec(env={"STEP": "5"}, args=["0"]), probe, tmp_path, log)
    assert (code, error) == (0, None)
    seen = json.loads(log.read_text().splitlines()[0])
    assert seen == {"CUDA_VISIBLE_DEVICES": "2", "STEP": "5", "SC_JOB_ID": "j"}
    code, error = run_script(spec(timeout=0.5, args=["30"]), probe, tmp_path, log)
    assert code is not None and code < 0
    assert error == "timed out after 0.5 s; killed"


def test_output_rule(tmp_path: Path) -> None:
    assert "was not written" in check_output(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    assert "not valid JSON" in check_output(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text("[]")
    (tmp_path / "data.bin").write_bytes(b"\x00")  # not JSON: existence is enough
    assert check_output(tmp_path / "ok.json") is None
    assert check_output(tmp_path / "data.bin") is None
    assert check_output(None) is None
