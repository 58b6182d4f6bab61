"""Step 3 around the script: job generation, legacy jobs, merge, and the local demo."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from coordinator import submit
from coordinator.errors import InvalidJobsError
from coordinator.local import LocalCluster
from coordinator.scoring_jobs import generate_scoring_jobs, make_demo_data, parse_nodes
from coordinator.submission import prepare
from scoring.prng import reference_draws
from tests.helpers import REPO, run_cli, write_jobs


def test_parse_nodes_gives_one_slot_per_gpu() -> None:
    assert parse_nodes("rig-a,rig-b:2") == [("rig-a", 0), ("rig-b", 0), ("rig-b", 1)]
    for bad in ("", "rig a", "rig-a:0", "rig-a:x"):
        with pytest.raises(InvalidJobsError):
            parse_nodes(bad)


def test_jobs_scoring_writes_original_format_spread_evenly(tmp_path: Path) -> None:
    demo = make_demo_data(tmp_path, candidates=1000, draws=20, prng_type="mt19937", mod=100)
    result = run_cli("jobs", "scoring", "--survivors", str(demo.survivors),
                     "--train-history", "train_history.json", "--nodes", "rig-a,rig-b:2",
                     "--chunks", "9", "--prng-type", "mt19937", "--mod", "100",
                     "--jobs-file", "scoring_jobs.json", "--chunk-dir", "chunks", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = json.loads((tmp_path / "scoring_jobs.json").read_text())
    assert len(jobs) == 9
    assert Counter((job["node"], job["gpu_id"]) for job in jobs) == {
        ("rig-a", 0): 3, ("rig-b", 0): 3, ("rig-b", 1): 3}
    assert jobs[4]["args"] == ["--seeds-file", "chunks/chunk_0004.json",
                               "--train-history", "train_history.json",
                               "--output-file", "full_scoring_results/chunk_0004.json",
                               "--prng-type", "mt19937", "--mod", "100"]
    chunks = [json.loads((tmp_path / "chunks" / f"chunk_{i:04d}.json").read_text())
              for i in range(9)]
    assert sum(chunks, []) == json.loads(demo.survivors.read_text())
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_jobs_scoring_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("[1, 2]")
    (tmp_path / "h.json").write_text("[1]")
    with pytest.raises(InvalidJobsError, match="more chunks than survivors"):
        generate_scoring_jobs(tmp_path / "s.json", "h.json", "rig-a", 3, "java_lcg", 10,
                              tmp_path / "j.json", "c", workdir=tmp_path)
    with pytest.raises(InvalidJobsError, match="unknown PRNG"):
        generate_scoring_jobs(tmp_path / "s.json", "h.json", "rig-a", 1, "lcg", 10,
                              tmp_path / "j.json", "c", workdir=tmp_path)
    result = run_cli("jobs", "scoring", "--survivors", "s.json", "--train-history", "h.json",
                     "--nodes", "rig-a", "--chunks", "1", "--prng-type", "java_lcg",
                     "--mod", "1", cwd=tmp_path)
    assert result.returncode == 2 and "draw 0: 1 is outside [0, 1)" in result.stderr
    assert not (tmp_path / "scoring_jobs.json").exists()


def test_demo_data_hides_the_secret_once(tmp_path: Path) -> None:
    demo = make_demo_data(tmp_path, candidates=500, draws=30, prng_type="java_lcg", mod=1000,
                          secret_seed=-77)
    seeds = json.loads(demo.survivors.read_text())
    assert len(seeds) == 500 and seeds.count(-77) == 1 and seeds[demo.position] == -77
    history = json.loads(demo.history.read_text())["draws"]
    assert history == reference_draws("java_lcg", -77, 1000, 30)


LEGACY = {"job_id": "old_0", "seeds": [11, 12, 13], "prng_type": "java_lcg", "mod": 1000,
          "train_history": [1, 2, 3], "node": "rig-b", "gpu_id": 1}


def test_legacy_jobs_are_converted_and_shown_in_dry_run(tmp_path: Path) -> None:
    plain = {"job_id": "plain", "script": "examples/write_output.py",
             "args": ["--output-file", "x/plain.json"], "node": "rig-a"}
    jobs_file = write_jobs(tmp_path / "jobs.json", [plain, LEGACY])
    result = run_cli("submit", "--jobs-file", str(jobs_file), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "legacy job 1 (old_0): 3 inline seeds -> scoring_chunks/old_0.json" in result.stdout
    assert ("old_0  gpu 1  full_scoring_worker.py --seeds-file scoring_chunks/old_0.json "
            "--train-history scoring_chunks/old_0_history.json --output-file "
            "full_scoring_results/old_0.json --prng-type java_lcg --mod 1000") in result.stdout
    assert not (tmp_path / "scoring_chunks").exists()  # a dry run writes nothing


@pytest.mark.parametrize(("change", "expected"), [
    ({"seeds": ["x"]}, "element 0: seed 'x' is not an integer"),
    ({"prng_type": "lcg"}, "unknown PRNG"),
    ({"train_history": [1, 5000]}, "draw 1: 5000 is outside"),
    ({"mod": 0}, "field 'mod'"),
    ({"seeds": []}, "field 'seeds'"),
])
def test_bad_legacy_jobs_are_refused_whole(change: dict, expected: str) -> None:
    with pytest.raises(InvalidJobsError, match=r"job 0 \(job_id 'old_0'\)") as info:
        prepare([dict(LEGACY, **change)])
    assert expected in str(info.value)


def test_mixed_legacy_and_script_jobs_run_and_merge(cluster: LocalCluster,
                                                    cluster_workdir: Path) -> None:
    history = reference_draws("java_lcg", 12, 1000, 25)
    legacy = dict(LEGACY, train_history=history, job_id="old_mixed")
    (cluster_workdir / "mixed_seeds.json").write_text(json.dumps([12, 500, 501]))
    (cluster_workdir / "mixed_history.json").write_text(json.dumps(history))
    script_job = {"job_id": "new_mixed", "script": "full_scoring_worker.py",
                  "args": ["--seeds-file", "mixed_seeds.json", "--train-history",
                           "mixed_history.json", "--output-file", "new_mixed.json",
                           "--prng-type", "java_lcg", "--mod", "1000"],
                  "node": "rig-a"}
    run = submit([legacy, script_job], output_dir="mixed", broker_url=cluster.broker_url,
                 chunk_dir="mixed_chunks", workdir=cluster_workdir)
    assert (cluster_workdir / "mixed_chunks" / "old_mixed.json").exists()
    assert run.wait(timeout=120).all_succeeded
    summary = run.summary(workdir=str(cluster_workdir))
    merged = json.loads((cluster_workdir / "mixed" / "survivors_with_scores.json").read_text())
    assert merged["n_seeds"] == 6 and merged["chunks"] == 2
    ranking = [(r["seed"], r["matches"]) for r in merged["results"]]
    assert ranking[:2] == [(12, 25), (12, 25)]  # seed 12 is in both jobs
    scores = [r["score"] for r in merged["results"]]
    assert scores == sorted(scores, reverse=True)
    assert summary["merged"]["scoring"]["n_seeds"] == 6


def test_local_demo_finds_the_secret_seed(tmp_path: Path) -> None:
    """README command 1 in small: demo data, chunk jobs, `coordinator local`, merged ranking."""
    demo = make_demo_data(tmp_path, candidates=4000, draws=40, prng_type="java_lcg", mod=1000)
    generate_scoring_jobs(demo.survivors, "train_history.json", "rig-a,rig-b", 6, "java_lcg",
                          1000, tmp_path / "scoring_jobs.json", "scoring_chunks",
                          workdir=tmp_path)
    result = run_cli("local", "--jobs-file", "scoring_jobs.json", "--scripts-dir", str(REPO),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6/6 succeeded" in result.stdout
    merged = json.loads((tmp_path / "full_scoring_results" /
                         "survivors_with_scores.json").read_text())
    assert merged["results"][0] == {"seed": demo.secret_seed, "matches": 40, "score": 1.0}
    assert merged["n_seeds"] == 4000
    top_line = result.stdout.splitlines()[result.stdout.splitlines().index(
        next(line for line in result.stdout.splitlines() if "rank" in line)) + 1]
    assert str(demo.secret_seed) in top_line
    assert "local cluster: private Redis and 2 workers (rig-a, rig-b)" in result.stderr


@pytest.mark.parametrize(("total", "chunks", "slots"), [
    (1000, 12, 4), (1_000_000, 36, 4), (10, 10, 4), (13, 5, 4), (100, 3, 4), (7, 7, 1),
    (5000, 40, 3)])
def test_factoring_deals_chunks_that_shrink_and_hold_every_seed(total: int, chunks: int,
                                                               slots: int) -> None:
    from coordinator.scoring_jobs import factoring_sizes

    sizes = factoring_sizes(total, chunks, slots)
    assert len(sizes) == chunks and sum(sizes) == total and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)
    if chunks > 2 * slots and total >= 4 * chunks:  # the first batch: half, one per slot
        assert abs(sum(sizes[:slots]) - total / 2) <= slots


def test_decreasing_chunks_merge_to_the_ranking_of_a_pinned_run(
        cluster: LocalCluster, cluster_workdir: Path) -> None:
    work = cluster_workdir / "factoring"
    work.mkdir()
    demo = make_demo_data(work, candidates=6000, draws=40, prng_type="java_lcg", mod=1000)
    rankings = []
    for balance in (False, True):
        name = "balanced" if balance else "pinned"
        made = generate_scoring_jobs(demo.survivors, "factoring/train_history.json",
                                     "rig-a,rig-b:2", 9, "java_lcg", 1000,
                                     work / f"{name}.json", f"factoring/{name}_chunks",
                                     f"factoring/{name}_out", workdir=cluster_workdir,
                                     balance=balance, balance_slots=3 if balance else None)
        sizes = [len(json.loads((cluster_workdir / job["args"][1]).read_text()))
                 for job in made.jobs]
        if balance:
            assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 2 * sizes[-1]
        run = submit(made.jobs, output_dir=f"factoring/{name}_out",
                     broker_url=cluster.broker_url, workdir=cluster_workdir)
        assert run.wait(timeout=120).all_succeeded
        run.summary(workdir=str(cluster_workdir))
        merged = json.loads((work / f"{name}_out" / "survivors_with_scores.json").read_text())
        rankings.append(merged["results"])
    assert rankings[0] == rankings[1]
    assert rankings[0][0]["seed"] == demo.secret_seed
