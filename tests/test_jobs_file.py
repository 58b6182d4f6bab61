"""The jobs-file contract: valid files pass whole, invalid ones fail with one precise line."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.errors import InvalidJobsError
from coordinator.jobs import Job, load_jobs, load_jobs_file
from coordinator.plan import plan_jobs

ORIGINAL = {
    "job_id": "chunk_0000",
    "script": "full_scoring_worker.py",
    "args": ["--seeds-file", "scoring_chunks/chunk_0000.json",
             "--train-history", "train_history.json",
             "--output-file", "full_scoring_results/chunk_0000.json",
             "--prng-type", "java_lcg", "--mod", "1000"],
    "node": "rig-a",
    "gpu_id": 0,
}


def with_(**changes: object) -> dict[str, object]:
    job = dict(ORIGINAL)
    for key, value in changes.items():
        if value is ...:
            job.pop(key)
        else:
            job[key] = value
    return job


def test_original_format_with_unknown_keys_and_numeric_args_is_accepted() -> None:
    entry = with_(args=["--mod", 1000, "--ratio", 0.5], comment="kept by the old tool")
    entry.pop("gpu_id")
    (job,) = load_jobs([entry])
    assert isinstance(job, Job)
    assert job.args == ["--mod", "1000", "--ratio", "0.5"]
    assert job.gpu_id == 0


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (with_(job_id=...), "job 0: field 'job_id': Field required"),
        (with_(script=...), "field 'script'"),
        (with_(node=...), "field 'node'"),
        (with_(gpu_id=-1), "job 0 (job_id 'chunk_0000'): field 'gpu_id': Input should be "
                           "greater than or equal to 0"),
        (with_(gpu_id="0"), "field 'gpu_id': Input should be a valid integer"),
        (with_(gpu_id=True), "field 'gpu_id'"),
        (with_(args="--mod 1000"), "field 'args': Input should be a valid list"),
        (with_(args=[["nested"]]), "field 'args.0'"),
        (with_(args=[True]), "field 'args.0': booleans are not valid arguments"),
        (with_(script="/usr/bin/python"), "field 'script': '/usr/bin/python' is absolute"),
        (with_(script="../../etc/evil.py"), "field 'script': '../../etc/evil.py' climbs out"),
        (with_(script="tools/../../x.py"), "climbs out of the scripts directory"),
        (with_(script=""), "field 'script': must not be empty"),
        (with_(job_id="../x"), "field 'job_id': '../x' is not a safe name"),
        (with_(job_id="a b"), "field 'job_id'"),
        (with_(node="rig a;rm"), "field 'node'"),
        (with_(timeout=0), "field 'timeout'"),
        (with_(env={"LD_PRELOAD": "/tmp/x.so"}), "field 'env': env may not set LD_PRELOAD"),
        (with_(env={"PYTHONPATH": "/tmp", "JOB_OK": "1"}), "env may not set PYTHONPATH (allowed"),
        (with_(env={"CUDA_VISIBLE_DEVICES": "3"}), "may not set CUDA_VISIBLE_DEVICES"),
        (with_(env={"OPENSSL_CONF": "/tmp/evil.cnf"}), "may not set OPENSSL_CONF"),
        (with_(env={"JOB_X=Y": "1"}), "env name 'JOB_X=Y' is empty or contains '='"),
        (with_(env={"JOB_X": "a\0b"}), "env JOB_X contains a NUL byte"),
        (with_(node="rig-a\n"), "field 'node': 'rig-a\\n' is not a safe name"),
        (with_(job_id="a/b"), "field 'job_id'"),
        (with_(gpu_id=10**30), "field 'gpu_id': Input should be less than or equal to 255"),
        (with_(timeout=float("inf")), "field 'timeout': inf must be finite"),
        (with_(timeout=float("nan")), "field 'timeout': nan must be finite"),
        (with_(timeout=10**12), "must be finite, > 0 and at most 2.592e+06"),
        (with_(args=["a\0b"]), "field 'args.0': the argument contains a NUL byte"),
        (with_(args=["\ud800"]), "field 'args.0': the argument is not valid text"),
        (with_(script="x\0.py"), "field 'script': the script contains a NUL byte"),
        (with_(retries=-1), "field 'retries'"),
        (with_(retries=1000), "field 'retries'"),
        (with_(pin="yes"), "field 'pin'"),
    ],
)
def test_each_bad_field_is_named_in_one_line(entry: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidJobsError) as info:
        load_jobs([dict(ORIGINAL, job_id="ok_first"), entry])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("jobs: job 1")
    assert expected.replace("job 0", "job 1") in message


def test_duplicate_job_id_names_both_indexes() -> None:
    with pytest.raises(InvalidJobsError, match=r"job 2 \(job_id 'chunk_0000'\): field 'job_id': "
                                               r"duplicate, first used by job 0"):
        load_jobs([ORIGINAL, with_(job_id="other"), ORIGINAL])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"job_id": "a",\n  "node": }]', r"invalid JSON at line 2, column 11"),
        ('{"job_id": "a"}', "expected a JSON list of job objects, got dict"),
        ("[]", "the jobs list is empty"),
        ('[1, 2]', "job 0: expected an object, got int"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
        ('[{"gpu_id": ' + "9" * 5000 + "}]", "invalid JSON: a number has more than 4300 digits"),
        ('[{"timeout": NaN}]', "invalid JSON: NaN is not a JSON number"),
        ('[{"timeout": Infinity}]', "invalid JSON: Infinity is not a JSON number"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(text)
    with pytest.raises(InvalidJobsError, match=expected) as info:
        load_jobs_file(path)
    assert str(info.value).startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidJobsError, match="jobs file not found"):
        load_jobs_file(tmp_path / "nope.json")


def test_default_rewriting_moves_output_into_output_dir() -> None:
    plan = plan_jobs(load_jobs([ORIGINAL]), "run1", "results/step3")
    (spec,) = plan.specs
    assert spec.args[spec.args.index("--output-file") + 1] == "results/step3/chunk_0000.json"
    assert spec.args[:4] == ORIGINAL["args"][:4]  # inputs untouched
    assert spec.done_file == "results/step3/chunk_0000.json.done"
    assert spec.log_file == "results/step3/logs/chunk_0000.log"


def test_preserve_paths_passes_args_untouched() -> None:
    plan = plan_jobs(load_jobs([ORIGINAL]), "run1", "results", preserve_paths=True)
    (spec,) = plan.specs
    assert spec.args == ORIGINAL["args"]
    assert spec.done_file == "full_scoring_results/chunk_0000.json.done"


def test_job_without_output_file_gets_marker_in_output_dir() -> None:
    job = with_(args=["--fold", "3"])
    (spec,) = plan_jobs(load_jobs([job]), "run1", "out").specs
    assert spec.output_file is None
    assert spec.done_file == "out/chunk_0000.json.done"


def test_output_equals_form_is_rewritten() -> None:
    job = with_(args=["--output-file=deep/dir/x.json"])
    (spec,) = plan_jobs(load_jobs([job]), "run1", "out").specs
    assert spec.args == ["--output-file=out/x.json"]


def test_two_jobs_rewritten_onto_one_output_are_refused() -> None:
    a = with_(job_id="a", args=["--output-file", "one/x.json"])
    b = with_(job_id="b", args=["--output-file", "two/x.json"])
    with pytest.raises(InvalidJobsError, match=r"job 1 \(job_id 'b'\).*also written by job 0"):
        plan_jobs(load_jobs([a, b]), "run1", "out")
    plan_jobs(load_jobs([a, b]), "run1", "out", preserve_paths=True)  # distinct when preserved


def test_example_jobs_files_are_valid() -> None:
    repo = Path(__file__).resolve().parent.parent
    files = sorted(path.name for path in (repo / "examples").glob("*.json"))
    assert files == ["hello_jobs.json", "step5_jobs.json"]
    for name in files:
        assert len(load_jobs_file(repo / "examples" / name)) >= 3, name
