"""The jobs-file contract: valid files pass whole, invalid ones fail with one precise line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import InvalidJobsError
from coordinator.jobs import Job, LegacyScoringJob, load_jobs, load_jobs_file, parse_jobs
from coordinator.legacy import convert, write_chunks
from coordinator.options import SubmitOptions
from coordinator.plan import find_output_file, output_file_problem, plan_jobs, rewrite_output_path
from coordinator.submission import prepare

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
        (with_(env={"JOB_X=Y": "1"}), "env name 'JOB_X=Y' is not a variable name"),
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
    plan = plan_jobs(load_jobs([ORIGINAL]), "run1", SubmitOptions(output_dir="results/step3"))
    (spec,) = plan.specs
    assert spec.args[spec.args.index("--output-file") + 1] == "results/step3/chunk_0000.json"
    assert spec.args[:4] == ORIGINAL["args"][:4]  # inputs untouched
    assert spec.done_file == "results/step3/chunk_0000.json.done"
    assert spec.log_file == "results/step3/logs/chunk_0000.log"


def test_preserve_paths_passes_args_untouched() -> None:
    plan = plan_jobs(load_jobs([ORIGINAL]), "run1",
                     SubmitOptions(output_dir="results", preserve_paths=True))
    (spec,) = plan.specs
    assert spec.args == ORIGINAL["args"]
    assert spec.done_file == "full_scoring_results/chunk_0000.json.done"


def test_job_without_output_file_gets_marker_in_output_dir() -> None:
    job = with_(args=["--fold", "3"])
    (spec,) = plan_jobs(load_jobs([job]), "run1", SubmitOptions(output_dir="out")).specs
    assert spec.output_file is None
    assert spec.done_file == "out/chunk_0000.json.done"


def test_output_equals_form_is_rewritten() -> None:
    job = with_(args=["--output-file=deep/dir/x.json"])
    (spec,) = plan_jobs(load_jobs([job]), "run1", SubmitOptions(output_dir="out")).specs
    assert spec.args == ["--output-file=out/x.json"]


def test_two_jobs_rewritten_onto_one_output_are_refused() -> None:
    a = with_(job_id="a", args=["--output-file", "one/x.json"])
    b = with_(job_id="b", args=["--output-file", "two/x.json"])
    with pytest.raises(InvalidJobsError, match=r"job 1 \(job_id 'b'\).*also written by job 0"):
        plan_jobs(load_jobs([a, b]), "run1", SubmitOptions(output_dir="out"))
    # distinct when preserved
    plan_jobs(load_jobs([a, b]), "run1", SubmitOptions(output_dir="out", preserve_paths=True))


def test_example_jobs_files_are_valid() -> None:
    repo = Path(__file__).resolve().parent.parent
    files = sorted(path.name for path in (repo / "examples").glob("*.json"))
    assert files == ["hello_jobs.json", "step5_jobs.json"]
    for name in files:
        assert len(load_jobs_file(repo / "examples" / name)) >= 3, name


# Edges found by mutation testing (tools/mutation-test): each assertion is exact, so a
# changed message, bound or default turns it red.

@pytest.mark.parametrize(("entry", "expected"), [
    (with_(script="~/evil.py"),
     "jobs: job 0 (job_id 'chunk_0000'): field 'script': '~/evil.py' is absolute; give a path "
     "inside the scripts directory"),
    (with_(env="JOB_X=1"),
     "jobs: job 0 (job_id 'chunk_0000'): field 'env': env must be an object of strings, not str"),
    (with_(job_id="j" * 128, node="bad node"),
     f"jobs: job 0 (job_id '{'j' * 128}'): field 'node': 'bad node' is not a safe name (letters, "
     "digits, '.', '_', '-'; no '..')"),
    (with_(job_id="j" * 129),
     "jobs: job 0: field 'job_id': 'jjj" + "j" * 126 + "' is not a safe name (letters, digits, "
     "'.', '_', '-'; no '..')"),
    (with_(job_id="a\tb"), "jobs: job 0: field 'job_id': 'a\\tb' is not a safe name (letters, "
                           "digits, '.', '_', '-'; no '..')"),
])
def test_exact_messages_at_the_edges(entry: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidJobsError) as caught:
        load_jobs([entry])
    assert str(caught.value) == expected


def test_a_number_that_is_not_finite_is_refused_from_python() -> None:
    # JSON cannot carry inf (decode_json refuses it), but the Python API can.
    with pytest.raises(InvalidJobsError) as caught:
        load_jobs([with_(args=["--ratio", float("inf")])])
    assert str(caught.value) == ("jobs: job 0 (job_id 'chunk_0000'): field 'args.1': inf is not a "
                                 "number to pass as text")


def test_parse_jobs_tells_legacy_entries_from_script_jobs_and_empties_the_list() -> None:
    legacy = {"seeds": [1, 2], "prng_type": "java_lcg", "mod": 1000,
              "train_history": "h.json", "node": "rig-a"}
    both = dict(ORIGINAL, job_id="both", seeds=[1])  # names a script: a script job
    entries = [legacy, both]
    jobs = parse_jobs(entries)
    assert [type(job) for job in jobs] == [LegacyScoringJob, Job]
    assert jobs[0].job_id == "legacy_0000" and jobs[1].job_id == "both"
    assert entries == [None, None]


@pytest.mark.parametrize(("args", "found", "rewritten"), [
    (["--x", "--output-file"], None, ["--x", "--output-file"]),  # a flag with no value
    (["--output-file=a/k=v.json"], "a/k=v.json", ["--output-file=out/k=v.json"]),
    (["--output-file", "a/k=v.json", "--y"], "a/k=v.json", ["--output-file", "out/k=v.json",
                                                            "--y"]),
    (["--output-file-x", "a.json"], None, ["--output-file-x", "a.json"]),
])
def test_output_file_is_found_and_rewritten_exactly(args: list[str], found: str | None,
                                                     rewritten: list[str]) -> None:
    assert find_output_file(args) == found
    assert rewrite_output_path(args, "out") == rewritten


def test_the_dry_run_text_lists_every_node_and_path() -> None:
    jobs = load_jobs([with_(job_id="b1", node="rig-b", args=["--output-file", "x/b1.json"]),
                      with_(job_id="a1", node="rig-a", gpu_id=1, args=["--fold", "1"]),
                      with_(job_id="b2", node="rig-b", args=[])])
    plan = plan_jobs(jobs, "run1", SubmitOptions(output_dir="out"))
    assert [spec.job_id for spec in plan.by_node()["rig-b"]] == ["b1", "b2"]
    assert plan.describe() == "\n".join([
        "plan: 3 jobs on 2 nodes; output dir out; paths rewritten",
        "node rig-a (queue node.rig-a): 1 jobs, run one at a time",
        "  a1  gpu 1  full_scoring_worker.py --fold 1",
        "      output -  done out/a1.json.done",
        "node rig-b (queue node.rig-b): 2 jobs, run one at a time",
        "  b1  gpu 0  full_scoring_worker.py --output-file out/b1.json",
        "      output out/b1.json  done out/b1.json.done",
        "  b2  gpu 0  full_scoring_worker.py ",
        "      output -  done out/b2.json.done",
    ])
    per_gpu = plan_jobs(load_jobs([with_(job_id="g0", gpu_id=0, args=[]),
                                   with_(job_id="g3", gpu_id=3, args=[])]), "run1",
                        SubmitOptions(output_dir="o", preserve_paths=True, per_gpu=True))
    assert per_gpu.describe().splitlines()[:2] == [
        "plan: 2 jobs on 1 nodes; output dir o; paths preserved",
        "node rig-a (node.rig-a.gpu0, node.rig-a.gpu3): 2 jobs, one at a time per GPU"]


LEGACY = {"seeds": [5, 7], "prng_type": "java_lcg", "mod": 1000, "train_history": [1, 2, 3],
          "node": "rig-a", "skip": 2, "gpu_id": 1, "timeout": 60, "retries": 1, "pin": True}


def test_a_legacy_job_converts_to_the_scoring_script_with_its_files(tmp_path: Path) -> None:
    first, second = parse_jobs([LEGACY, {"job_id": "named", "seeds": [{"seed": 9}],
                                         "prng_type": "mt19937", "mod": 100,
                                         "train_history": "h.json", "node": "rig-b"}])
    one = convert(first, 0, "chunks", "out")
    assert one.job == Job(
        job_id="legacy_0000", script="full_scoring_worker.py", node="rig-a", gpu_id=1,
        timeout=60.0, retries=1, pin=True,
        args=["--seeds-file", "chunks/legacy_0000.json",
              "--train-history", "chunks/legacy_0000_history.json",
              "--output-file", "out/legacy_0000.json", "--prng-type", "java_lcg", "--mod", "1000",
              "--skip", "2"])
    assert one.files == {"chunks/legacy_0000.json": [5, 7],
                         "chunks/legacy_0000_history.json": [1, 2, 3]}
    assert one.note == ("legacy job 0 (legacy_0000): 2 inline seeds -> chunks/legacy_0000.json; "
                        "runs full_scoring_worker.py")
    two = convert(second, 1, "chunks", "out")
    assert two.job.args == ["--seeds-file", "chunks/named.json", "--train-history", "h.json",
                            "--output-file", "out/named.json", "--prng-type", "mt19937",
                            "--mod", "100"]  # a history path passes as it is; no --skip 0
    assert (two.job.timeout, two.job.retries, two.job.pin) == (None, None, False)
    assert two.files == {"chunks/named.json": [{"seed": 9}]}
    write_chunks([one, two], tmp_path)
    assert json.loads((tmp_path / "chunks/legacy_0000_history.json").read_text()) == [1, 2, 3]
    assert json.loads((tmp_path / "chunks/named.json").read_text()) == [{"seed": 9}]
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [
        "legacy_0000.json", "legacy_0000_history.json", "named.json"]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"seeds": ["x"]}, "field 'seeds': element 0: seed 'x' is not an integer"),
    ({"train_history": [5000]}, "field 'train_history': draw 0: 5000 is outside [0, 1000) for "
                                "--mod 1000"),
    ({"prng_type": "nope"}, "unknown PRNG 'nope'; choose one of java_lcg, mt19937, minstd, "
                            "xorshift32"),
])
def test_a_bad_legacy_job_is_named_in_one_line(changes: dict[str, object], expected: str) -> None:
    (job,) = parse_jobs([dict(LEGACY, job_id="old", **changes)])
    with pytest.raises(InvalidJobsError) as caught:
        convert(job, 4, "c", "o")
    assert str(caught.value) == f"jobs: job 4 (job_id 'old'): legacy scoring job: {expected}"


BASE = {"job_id": "a", "script": "s.py", "node": "rig-a"}


def test_the_plan_carries_every_option_and_the_run_defaults() -> None:
    jobs = load_jobs([dict(BASE, job_id="own", timeout=9, env={"JOB_X": "1"}, retries=3,
                           retry_delay=0.5, pin=True),
                      dict(BASE, job_id="plain")])
    plan = plan_jobs(jobs, "run7", SubmitOptions(output_dir="out", retries=2, retry_delay=4.0))
    own, plain = plan.specs
    assert (plan.run_id, plan.output_dir, plan.pinned) == ("run7", "out", frozenset({"own"}))
    assert (own.timeout, own.env, own.retries, own.retry_delay) == (9.0, {"JOB_X": "1"}, 3, 0.5)
    assert (plain.timeout, plain.env, plain.retries, plain.retry_delay) == (None, {}, 2, 4.0)
    default = plan_jobs(load_jobs([BASE]), "run8", SubmitOptions(output_dir="out")).specs[0]
    assert (default.retries, default.retry_delay, default.per_gpu) == (0, 2.0, False)


@pytest.mark.parametrize(("jobs", "output_dir", "expected"), [
    ([BASE], "/abs", "--output-dir '/abs' is not a relative path: outputs land under each "
                     "worker's workdir; give a path relative to it"),
    ([dict(BASE, args=["--output-file", "/etc/x.json"])], "out",
     "jobs: job 0 (job_id 'a'): field 'args': output file '/etc/x.json' is not a relative path "
     "(outputs must stay under the workers' workdir)"),
    ([dict(BASE, job_id="x", args=[]), dict(BASE, job_id="b", args=["--output-file",
                                                                      "out/x.json"])], "out",
     "jobs: job 1 (job_id 'b'): field 'args': output 'out/x.json' is also written by job 0 "
     "(job_id 'x')"),
    ([dict(BASE, job_id="b", args=["--output-file", "out/x.json"]), dict(BASE, job_id="x")],
     "out", "jobs: job 1 (job_id 'x'): field 'args': marker 'out/x.json.done' is also written "
            "by job 0 (job_id 'b')"),
])
def test_planning_refusals_read_exactly(jobs: list[dict[str, object]], output_dir: str,
                                        expected: str) -> None:
    with pytest.raises(InvalidJobsError) as caught:
        plan_jobs(load_jobs(jobs), "run1",
                  SubmitOptions(output_dir=output_dir, preserve_paths=True))
    assert str(caught.value) == expected


def test_parse_jobs_and_unreadable_files_say_where(tmp_path: Path) -> None:
    with pytest.raises(InvalidJobsError) as caught:
        parse_jobs([dict(BASE, node=7)])
    assert str(caught.value) == ("jobs: job 0 (job_id 'a'): field 'node': Input should be a "
                                 "valid string")
    with pytest.raises(InvalidJobsError) as caught:
        parse_jobs([dict(BASE, node=7)], source="step5.json")
    assert str(caught.value).startswith("step5.json: job 0 (job_id 'a'): field 'node'")
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"job_id": "caf\xe9"}]')
    with pytest.raises(InvalidJobsError) as caught:
        load_jobs_file(path)
    assert str(caught.value).startswith(f"{path}: cannot read jobs file: 'utf-8' codec can't "
                                        "decode byte 0xe9")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"timeout": 0}, "field 'timeout': 0 must be finite, > 0 and at most 2.592e+06"),
    ({"timeout": "9"}, "field 'timeout': '9' is neither seconds nor a percentage of the "
                       "median (e.g. \"300%\", at most 100000%)"),
    ({"retry_delay": -1}, "field 'retry_delay': -1 must be finite, >= 0 and at most 3600"),
    ({"retry_delay": 3601}, "field 'retry_delay': 3601 must be finite, >= 0 and at most 3600"),
])
def test_seconds_fields_read_exactly(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidJobsError) as caught:
        load_jobs([with_(**changes)])
    assert str(caught.value) == f"jobs: job 0 (job_id 'chunk_0000'): {expected}"
    (job,) = load_jobs([with_(timeout=2_592_000, retry_delay=0)])
    assert (job.timeout, job.retry_delay) == (2_592_000.0, 0.0)


def test_output_file_values_that_name_no_file() -> None:
    tail = " names no file (a file name is needed: its .done marker goes beside it)"
    assert output_file_problem(["a", "--output-file", "x/"]) == "--output-file 'x/'" + tail
    assert output_file_problem(["--output-file=a=b/"]) == "--output-file 'a=b/'" + tail
    assert output_file_problem(["--output-file", ".."]) == "--output-file '..'" + tail
    assert output_file_problem(["--output-file"]) == (
        "'--output-file' is the last argument: it has no value")
    assert output_file_problem(["q/", "--output-file", "ok.json"]) is None
    assert output_file_problem(["--output-file=a/b.json", "x/"]) is None
    assert output_file_problem([]) is None


@pytest.mark.parametrize(("script", "expected"), [
    pytest.param("-x.py", "the script '-x.py' has a part starting with '-' (it would read as "
                 "an option)", id="dash"),
    pytest.param("d/-x.py", "the script 'd/-x.py' has a part starting with '-' (it would read "
                 "as an option)", id="dash-part"),
    pytest.param("a\nb", "the script 'a\\nb' contains a control character", id="newline"),
    pytest.param("a\x7fb", "the script 'a\\x7fb' contains a control character", id="delete"),
    pytest.param("/".join(["a" * 255] * 3 + ["b" * 254]) + "/cd", "the script is 1025 "
                 "characters long (at most 1024)", id="too-long"),
    pytest.param("d/" + "n" * 256, "the script has a name longer than 255 bytes",
                 id="long-name"),
])
def test_bad_script_names_cannot_be_a_file_or_an_argument(script: str, expected: str) -> None:
    with pytest.raises(InvalidJobsError) as caught:
        load_jobs([with_(job_id="j", script=script)])
    assert str(caught.value) == f"jobs: job 0 (job_id 'j'): field 'script': {expected}"


def test_the_longest_script_and_the_shortest_timeout_pass() -> None:
    longest = "/".join(["a" * 255] * 3 + ["b" * 254]) + "/c"
    assert len(longest) == 1024
    (job,) = load_jobs([with_(script=longest, timeout=0.01)])
    assert (job.script, job.timeout) == (longest, 0.01)
    with pytest.raises(InvalidJobsError, match=r"field 'timeout': 0.0099 is shorter than 0.01 s: "
                                               r"the script would be killed as it starts"):
        load_jobs([with_(timeout=0.0099)])


def test_a_key_twice_in_a_job_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('[{"job_id": "j", "script": "s.py", "node": "rig-a", "node": "rig-b"}]')
    with pytest.raises(InvalidJobsError) as caught:
        load_jobs_file(path)
    assert str(caught.value) == (f"{path}: invalid JSON: key 'node' appears twice in one "
                                 f"object (which one is meant?)")
    path.write_text('[{"job_id": "j", "script": "s.py", "node": "rig-a", "args": []}]')
    assert load_jobs_file(path)[0].node == "rig-a"


def test_a_legacy_history_path_is_checked_in_process() -> None:
    legacy = {"job_id": "l", "seeds": [1], "prng_type": "java_lcg", "mod": 1000,
              "node": "rig-a", "train_history": "/etc/passwd"}
    with pytest.raises(InvalidJobsError) as caught:
        prepare([legacy])
    assert str(caught.value) == (
        "jobs: job 0 (job_id 'l'): field 'train_history': train_history '/etc/passwd' is not "
        "a relative path (a path relative to the workers' workdir)")
    assert prepare([{**legacy, "train_history": "h/t.json"}]).specs[0].args[3] == "h/t.json"


def test_balance_floats_every_job_but_the_pinned_and_the_plan_says_so() -> None:
    jobs = load_jobs([with_(job_id="f1", args=[]), with_(job_id="p1", args=[], pin=True),
                      with_(job_id="f2", node="rig-b", args=[])])
    plan = plan_jobs(jobs, "run9", SubmitOptions(output_dir="o", balance=True))
    assert [(spec.job_id, spec.node, spec.queue) for spec in plan.specs] == [
        ("f1", "any", "node.any"), ("p1", "rig-a", "node.rig-a"), ("f2", "any", "node.any")]
    assert plan.slots() == ["any", "rig-a"]
    assert plan.jobs_per_node() == {"any": 2, "rig-a": 1}
    assert plan.describe().splitlines()[:2] == [
        "plan: 3 jobs on 2 nodes; output dir o; paths rewritten",
        "node any (queue node.any): 2 jobs, each floats to the first free node"]
    per_gpu = plan_jobs(load_jobs([with_(job_id="g", args=[])]), "run9",
                        SubmitOptions(output_dir="o", balance=True, per_gpu=True))
    assert per_gpu.describe().splitlines()[1] == (
        "node any (queue node.any): 1 jobs, each floats to the first free GPU")
    unbalanced = plan_jobs(load_jobs([with_(job_id="f1", args=[])]), "run9",
                           SubmitOptions(output_dir="o"))
    assert unbalanced.specs[0].node == "rig-a"


def test_the_plan_says_which_jobs_may_have_a_backup_copy() -> None:
    # A floating job whose output file is named once may be copied unless it or its run says
    # no; a run or job that says no says so to its workers; nothing else is marked.
    jobs = [with_(job_id="f", args=["--output-file", "f.json"]),
            with_(job_id="off", args=["--output-file", "off.json"], speculate=False),
            with_(job_id="on", args=["--output-file", "on.json"], speculate=True),
            with_(job_id="pin", args=["--output-file", "pin.json"], pin=True),
            with_(job_id="bare", args=[]),
            with_(job_id="twice", args=["--output-file", "t.json", "--output-file=t.json"])]

    def marks(**options: object) -> dict[str, bool | None]:
        plan = plan_jobs(load_jobs(jobs), "run10", SubmitOptions(output_dir="o", **options))
        return {spec.job_id: spec.speculate for spec in plan.specs}

    assert marks(balance=True) == {"f": True, "off": False, "on": True, "pin": None,
                                   "bare": None, "twice": None}
    assert marks(balance=True, speculate=False) == {
        "f": False, "off": False, "on": True, "pin": False, "bare": False, "twice": False}
    assert marks(balance=True, per_gpu=True)["f"] is None
    assert marks() == {"f": None, "off": False, "on": None, "pin": None, "bare": None,
                       "twice": None}


def test_a_plan_without_jobs_has_no_levels() -> None:
    assert plan_jobs(iter([]), "run11", SubmitOptions(output_dir="o")).levels() == []


def test_options_convert_their_workdir_and_change_by_copy() -> None:
    options = SubmitOptions(workdir="w")  # type: ignore[arg-type]
    assert options.workdir == Path("w")
    changed = options.but(retries=4)
    assert (changed.retries, options.retries, changed.workdir) == (4, 0, Path("w"))


def test_unknown_fields_are_named_once_each_and_kept_harmless(
        caplog: pytest.LogCaptureFixture) -> None:
    entries = [{"job_id": f"j{i}", "script": "s.py", "node": "rig-a", "retires": 1}
               for i in range(3)]
    entries[1]["colour"] = "blue"
    with caplog.at_level("WARNING", logger="coordinator"):
        jobs = parse_jobs(entries, "f.json")
    assert [job.job_id for job in jobs] == ["j0", "j1", "j2"]
    assert [record.getMessage() for record in caplog.records] == [
        "f.json: job 0 (job_id 'j0'): unknown field 'retires' ignored (a typo? the fields are "
        "job_id, script, args, node, gpu_id, timeout, env, retries, retry_delay, pin, warm, "
        "after, cost, speculate); later jobs with it are not named",
        "f.json: job 1 (job_id 'j1'): unknown field 'colour' ignored (a typo? the fields are "
        "job_id, script, args, node, gpu_id, timeout, env, retries, retry_delay, pin, warm, "
        "after, cost, speculate); later jobs with it are not named"]


def test_a_plans_digest_is_its_messages_and_output_settings_not_its_run_id(
        tmp_path: Path) -> None:
    jobs = [{"job_id": "d1", "script": "s.py", "args": ["--output-file", "x/d1.json"],
             "node": "rig-a"}]
    first = plan_jobs(parse_jobs([dict(job) for job in jobs]), "20260101-000000-aaaaaa")
    again = plan_jobs(parse_jobs([dict(job) for job in jobs]), "20260101-000000-bbbbbb")
    assert first.digest() == again.digest() and len(first.digest()) == 64
    other_dir = plan_jobs(parse_jobs([dict(job) for job in jobs]), "20260101-000000-aaaaaa",
                          SubmitOptions(output_dir="elsewhere"))
    other_arg = plan_jobs(parse_jobs([{**jobs[0], "args": [*jobs[0]["args"], "--x"]}]),
                          "20260101-000000-aaaaaa")
    assert len({first.digest(), other_dir.digest(), other_arg.digest()}) == 3


def test_planning_checks_scripts_where_the_scripts_directory_is_given(tmp_path: Path) -> None:
    (tmp_path / "here.py").write_text("")
    jobs = [{"job_id": "a", "script": "here.py", "node": "rig-a"},
            {"job_id": "b", "script": "examples/write_output.py", "node": "rig-a"}]  # built in
    plan = plan_jobs(parse_jobs([dict(job) for job in jobs]), "20260101-000000-aaaaaa",
                     SubmitOptions(scripts_dir=tmp_path))
    assert [spec.script for spec in plan.specs] == ["here.py", "examples/write_output.py"]
    missing = [*jobs, {"job_id": "c", "script": "gone.py", "node": "rig-a"}]
    with pytest.raises(InvalidJobsError) as refused:
        plan_jobs(parse_jobs([dict(job) for job in missing]), "20260101-000000-aaaaaa",
                  SubmitOptions(scripts_dir=tmp_path))
    assert str(refused.value) == (f"jobs: job 2 (job_id 'c'): field 'script': 'gone.py' not found "
                                  f"in scripts directory {tmp_path.resolve()} (see --scripts-dir)")
    # Without a scripts directory nothing is checked here (the worker refuses it).
    assert len(plan_jobs(parse_jobs([dict(job) for job in missing]),
                         "20260101-000000-aaaaaa").specs) == 3


def test_the_digest_tells_preserved_paths_from_rewritten_ones_and_after_is_read(
        caplog: pytest.LogCaptureFixture) -> None:
    # A job without --output-file has the same message either way: only the setting differs.
    def plan(preserve: bool) -> str:
        jobs = parse_jobs([{"job_id": "p", "script": "s.py", "node": "rig-a"}])
        return plan_jobs(jobs, "20260101-000000-aaaaaa",
                         SubmitOptions(preserve_paths=preserve)).digest()

    assert plan(True) != plan(False)
    # "after" is read (it was ignored, with a warning, before 2026-12-06): the waiting
    # job's message carries it, the other's leaves it out (workers of earlier versions).
    with caplog.at_level("WARNING", logger="coordinator"):
        jobs = parse_jobs([{"job_id": "p", "script": "s.py", "node": "rig-a"},
                           {"job_id": "w", "script": "s.py", "node": "rig-a", "after": ["p"]}],
                          "f")
    assert caplog.records == []
    specs = plan_jobs(jobs, "20260101-000000-aaaaaa").specs
    assert [spec.to_message().get("after") for spec in specs] == [None, ["p"]]


def test_short_arguments_share_one_copy_and_long_ones_do_not() -> None:
    """Arguments of at most 32 characters are interned: 100,000 jobs repeating "--mod"
    and "1000" hold one copy of each (built at run time here, so nothing is interned
    already)."""
    short, long = "".join(["x"] * 32), "".join(["y"] * 33)
    jobs = parse_jobs([{"job_id": f"i{index}", "script": "s.py", "node": "rig-a",
                        "args": ["".join(["x"] * 32), "".join(["y"] * 33)]}
                       for index in range(2)])
    assert jobs[0].args == jobs[1].args == [short, long]
    assert jobs[0].args[0] is jobs[1].args[0]
    assert jobs[0].args[1] is not jobs[1].args[1]


def test_a_plan_counts_its_jobs_per_slot_in_slot_order() -> None:
    entries = [{"job_id": f"s{index}", "script": "s.py", "node": node, "gpu_id": gpu}
               for index, (node, gpu) in enumerate([("rig-b", 0), ("rig-a", 1), ("rig-b", 1),
                                                    ("rig-a", 1), ("rig-a", 0)])]
    plan = plan_jobs(parse_jobs([dict(entry) for entry in entries]), "20260101-000000-aaaaaa")
    assert plan.jobs_per_slot() == {"rig-a": 3, "rig-b": 2}
    per_gpu = plan_jobs(parse_jobs([dict(entry) for entry in entries]),
                        "20260101-000000-aaaaaa", SubmitOptions(per_gpu=True))
    assert list(per_gpu.jobs_per_slot().items()) == [("rig-a.gpu0", 1), ("rig-a.gpu1", 2),
                                                     ("rig-b.gpu0", 1), ("rig-b.gpu1", 1)]


def after_jobs(waits: dict[str, list[str]], names: str = "abcde") -> list[dict[str, Any]]:
    return [{"job_id": name, "script": "s.py", "node": "rig-a",
             **({"after": waits[name]} if name in waits else {})} for name in names]


@pytest.mark.parametrize(("waits", "expected"), [
    ({"b": ["zz"]}, "f: job 1 (job_id 'b'): field 'after': no job 'zz' in this file"),
    ({"c": ["c"]}, "f: job 2 (job_id 'c'): field 'after': the job waits for itself"),
    ({"a": ["b"], "b": ["a"]},
     "f: job 0 (job_id 'a'): field 'after': a cycle: a -> b -> a (each waits for the next)"),
    ({"b": ["a"], "c": ["e"], "d": ["c"], "e": ["d"]},
     "f: job 2 (job_id 'c'): field 'after': a cycle: c -> e -> d -> c (each waits for the "
     "next)"),
    ({"a": ["b", "b"]}, "f: job 0 (job_id 'a'): field 'after': a job is named twice"),
    ({"a": [5]}, "f: job 0 (job_id 'a'): field 'after.0': Input should be a valid string"),
])
def test_after_names_jobs_of_the_file_without_a_cycle(waits: dict[str, list[Any]],
                                                      expected: str) -> None:
    with pytest.raises(InvalidJobsError) as raised:
        parse_jobs(after_jobs(waits), "f")
    assert str(raised.value) == expected


def test_a_long_chain_and_a_diamond_are_no_cycle() -> None:
    chain = [{"job_id": f"c{index}", "script": "s.py", "node": "rig-a",
              **({"after": [f"c{index - 1}"]} if index else {})} for index in range(5000)]
    assert len(parse_jobs(chain)) == 5000  # no recursion limit
    jobs = parse_jobs(after_jobs({"b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d", "a"]}))
    assert [job.after for job in jobs] == [[], ["a"], ["a"], ["b", "c"], ["d", "a"]]


def test_the_plan_shows_the_levels_of_its_waits() -> None:
    jobs = parse_jobs(after_jobs({"c": ["a", "b"], "d": ["c"], "e": ["a"]}))
    plan = plan_jobs(jobs, "20260101-000000-aaaaaa")
    assert [[spec.job_id for spec in level] for level in plan.levels()] == \
        [["a", "b"], ["c", "e"], ["d"]]
    text = plan.describe()
    assert text.endswith("levels (a job starts once every job it names has succeeded):\n"
                         "  level 0: a, b\n"
                         "  level 1: c (after a, b), e (after a)\n"
                         "  level 2: d (after c)")
    assert "      after a, b\n" in text
    plain = plan_jobs(parse_jobs(after_jobs({})), "20260101-000000-aaaaaa")
    assert "levels" not in plain.describe() and len(plain.levels()) == 1
    # Reversed file order: a job may name one that comes later.
    late = plan_jobs(parse_jobs(after_jobs({"a": ["e"], "e": ["d"]}, "edcba")),
                     "20260101-000000-aaaaaa")
    assert [[spec.job_id for spec in level] for level in late.levels()] == \
        [["d", "c", "b"], ["e"], ["a"]]


@pytest.mark.parametrize(("after", "expected"), [
    ("a", "after must be a list of job ids, not str"),
    (["a"] * 1025, "after has 1025 entries (at most 1024)"),
    (["a", "b", "a"], "after names a job twice"),
    (["ok", "../x"], "after[1] '../x' is not a safe name (letters, digits, '.', '_', '-'; "
                     "no '..')"),
])
def test_a_messages_after_is_checked_by_the_workers_rules(after: Any, expected: str) -> None:
    from worker_tasks.spec import InvalidMessage, JobSpec, check_after

    with pytest.raises(InvalidMessage) as raised:
        check_after(after)
    assert str(raised.value) == expected
    message = {"run_id": "20260101-000000-aaaaaa", "job_id": "j", "script": "s.py",
               "args": [], "node": "rig-a", "gpu_id": 0, "done_file": "o/j.done",
               "log_file": "o/j.log", "after": ["x", "y"]}
    assert JobSpec.from_message(message).after == ["x", "y"]
    assert JobSpec.from_message({**message, "after": []}).to_message().get("after") is None


def test_the_options_of_a_pipeline_step_are_checked_as_they_are_made() -> None:
    assert SubmitOptions(after_runs=["r1", "r2"]).after_runs == ("r1", "r2")
    assert SubmitOptions().after_runs == () and SubmitOptions().halt is None
    assert SubmitOptions(halt="soon,fail=3").halt == "soon,fail=3"
    with pytest.raises(InvalidJobsError) as raised:
        SubmitOptions(halt="never")
    assert str(raised.value).startswith("--halt 'never': give now|soon,fail=N|P%")
    assert SubmitOptions(job_timeout="250%").job_timeout == "250%"
    assert SubmitOptions(job_timeout="90").job_timeout == 90.0
    assert SubmitOptions(job_timeout=5).job_timeout == 5.0
    with pytest.raises(InvalidJobsError) as raised:
        SubmitOptions(job_timeout="ten")
    assert str(raised.value) == ("--job-timeout 'ten': give seconds or a percentage of the "
                                 "median, e.g. 300%")
    with pytest.raises(InvalidJobsError) as raised:
        SubmitOptions(job_timeout="0%")
    assert str(raised.value).startswith("--job-timeout '0%' is neither seconds nor")
    jobs = parse_jobs([{"job_id": "own", "script": "s.py", "node": "rig-a", "timeout": 5},
                       {"job_id": "default", "script": "s.py", "node": "rig-a"}])
    plan = plan_jobs(jobs, "20260101-000000-aaaaaa", SubmitOptions(job_timeout="250%"))
    assert [spec.timeout for spec in plan.specs] == [5.0, "250%"]
    assert [spec.timeout for spec in plan_jobs(
        parse_jobs([{"job_id": "d", "script": "s.py", "node": "rig-a"}]),
        "20260101-000000-aaaaaa").specs] == [None]


@pytest.mark.parametrize(("waits", "order", "expected"), [
    # A diamond met in one walk (d first): d -> b -> a, then d -> c -> a again: no cycle.
    ({"d": ["b", "c"], "b": ["a"], "c": ["a"]}, "dbca", None),
    # A walk that ends where an earlier one did, then a cycle further on: still found.
    ({"a": ["b"], "b": ["c"], "x": ["y"], "y": ["x"]}, "abcxy",
     "f: job 3 (job_id 'x'): field 'after': a cycle: x -> y -> x (each waits for the next)"),
    # A cycle the first job leads into without being on it.
    ({"r": ["c"], "c": ["e"], "e": ["d"], "d": ["c"]}, "rced",
     "f: job 1 (job_id 'c'): field 'after': a cycle: c -> e -> d -> c (each waits for the "
     "next)"),
])
def test_a_cycle_is_found_wherever_the_walk_meets_it(waits: dict[str, list[str]], order: str,
                                                     expected: str | None) -> None:
    entries = after_jobs(waits, order)
    if expected is None:
        assert [job.job_id for job in parse_jobs(entries, "f")] == list(order)
        return
    with pytest.raises(InvalidJobsError) as raised:
        parse_jobs(entries, "f")
    assert str(raised.value) == expected


def test_a_job_may_wait_for_as_many_jobs_as_the_contract_allows() -> None:
    from worker_tasks.spec import MAX_AFTER, check_after

    names = [f"j{index}" for index in range(MAX_AFTER)]
    assert check_after(names) == names


@pytest.mark.parametrize(("cost", "expected"), [
    (1, 1.0), (0.5, 0.5), (250_000, 250_000.0), (1e12, 1e12), (None, None)])
def test_a_cost_hint_travels_in_the_message(cost: Any, expected: float | None) -> None:
    entry = {"job_id": "c", "script": "s.py", "node": "rig-a"}
    jobs = parse_jobs([{**entry, **({"cost": cost} if cost is not None else {})}])
    assert jobs[0].cost == expected
    assert parse_jobs([{**entry, "cost": None}])[0].cost is None  # null: no hint
    spec = plan_jobs(jobs, "20260101-000000-aaaaaa").specs[0]
    assert spec.cost == expected and spec.to_message().get("cost") == expected


@pytest.mark.parametrize("cost", [0, -1, 1e12 * 2, float("nan"), float("inf"), True, "5", [1]])
def test_a_cost_hint_that_is_no_amount_of_work_is_refused(cost: Any) -> None:
    from worker_tasks.spec import InvalidMessage, check_cost

    with pytest.raises(InvalidMessage) as raised:
        check_cost(cost)
    assert str(raised.value) == f"cost must be a number above 0 and at most 1e+12, not {cost!r}"
    with pytest.raises(InvalidJobsError) as refused:
        load_jobs([{"job_id": "c", "script": "s.py", "node": "rig-a", "cost": cost}])
    assert str(refused.value).startswith("jobs: job 0 (job_id 'c'): field 'cost': ")
