"""Workload verbs: ``jobs scoring`` (Step 3 jobs files) and ``demo-data``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from coordinator.cli.common import (
    CommandFactory,
    add_inventory_flag,
    add_warm_flags,
    exit_table,
    formatter,
)
from coordinator.errors import ExitCode, InvalidJobsError
from coordinator.options import DEFAULT_CHUNK_DIR, DEFAULT_OUTPUT_DIR


def nodes_spec(args: argparse.Namespace) -> str:
    """``--nodes``, else every inventory node with its GPU count (``rig-a:2,rig-b:1``)."""
    from coordinator.cluster import find_inventory

    if args.nodes:
        return str(args.nodes)
    inventory = find_inventory(args.inventory)
    if inventory is None:
        raise InvalidJobsError("--nodes is required without a cluster inventory "
                               "(./cluster.toml, $SC_INVENTORY or --inventory)")
    return ",".join(f"{label}:{node.config.gpus}" for label, node in inventory.nodes.items())


def cmd_jobs_scoring(args: argparse.Namespace) -> int:
    from coordinator.scoring_jobs import generate_scoring_jobs, parse_nodes

    # Floating jobs name no node: --nodes (or the inventory) only says how many slots will
    # take them, for chunks that shrink as they go.
    slots = None
    if args.balance:
        try:
            slots = len(parse_nodes(nodes_spec(args)))
        except InvalidJobsError:
            print("note: no --nodes and no inventory: equal chunks (give --nodes for chunks "
                  "that shrink toward the end of the run)", file=sys.stderr)
    nodes = (args.nodes or "any") if args.balance else nodes_spec(args)
    result = generate_scoring_jobs(
        args.survivors, args.train_history, nodes, args.chunks, args.prng_type, args.mod,
        args.jobs_file, args.chunk_dir, args.output_dir, args.skip, balance=args.balance,
        balance_slots=slots)
    nodes = sorted({job["node"] for job in result.jobs})
    print(f"wrote {len(result.jobs)} jobs over {', '.join(nodes)} to {result.jobs_file}; "
          f"chunks in {args.chunk_dir}/")
    return ExitCode.OK


def cmd_demo_data(args: argparse.Namespace) -> int:
    from coordinator.scoring_jobs import make_demo_data

    demo = make_demo_data(args.out_dir, args.candidates, args.draws, args.prng_type, args.mod,
                          args.secret_seed, args.rng_seed)
    print(f"wrote {demo.history} ({args.draws} draws of {args.prng_type} mod {args.mod} from a "
          f"secret seed) and {demo.survivors} ({args.candidates} candidates); "
          f"the secret is in {demo.secret}")
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    """README command 1 without the repository: Step 3 on a local cluster, checked."""
    from coordinator.cli.node import run_local
    from coordinator.local import warm_env
    from coordinator.options import SubmitOptions
    from coordinator.run import prepare
    from coordinator.scoring_jobs import generate_scoring_jobs, make_demo_data

    if not 1 <= args.nodes <= 26:
        raise InvalidJobsError("--nodes: give 1 to 26 nodes")
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    for old in (DEFAULT_OUTPUT_DIR, DEFAULT_CHUNK_DIR):  # old markers would be skipped
        shutil.rmtree(work / old, ignore_errors=True)
    demo = make_demo_data(work, args.candidates, args.draws, "java_lcg", 1000, None,
                          args.rng_seed)
    nodes = ",".join(f"rig-{chr(ord('a') + index)}" for index in range(args.nodes))
    generate_scoring_jobs(demo.survivors, "train_history.json", nodes, args.chunks, "java_lcg",
                          1000, work / "scoring_jobs.json", DEFAULT_CHUNK_DIR,
                          DEFAULT_OUTPUT_DIR, workdir=work)
    print(f"demo: {args.candidates} candidates, {args.draws} draws of java_lcg mod 1000, "
          f"{args.chunks} chunks over {nodes}, in {work}", file=sys.stderr, flush=True)
    plan = prepare(work / "scoring_jobs.json", SubmitOptions(workdir=work, scripts_dir=work))
    worker_env = {} if args.cold else warm_env(None)
    following = argparse.Namespace(timeout=None, workdir=str(work), failover=None, joblog=None)
    code = run_local(plan, work, None, worker_env, following)
    secret = json.loads(demo.secret.read_text())["secret_seed"]
    merged = work / DEFAULT_OUTPUT_DIR / "survivors_with_scores.json"
    top = json.loads(merged.read_text())["results"][0] if merged.exists() else {}
    found = top.get("seed") == secret
    print(f"secret seed {secret} {'found' if found else 'NOT found'} at rank 1 "
          f"({top.get('matches', 0)} matches)")
    return code if code or found else ExitCode.JOBS_FAILED


def cmd_examples(args: argparse.Namespace) -> int:
    """The example jobs files and scripts, copied out of the installed package."""
    source = Path(__file__).resolve().parent.parent / "examples"
    target = Path(args.directory) / "examples"
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copy2(path, target / path.name)
            print(f"wrote {target / path.name}")
    return ExitCode.OK


def cmd_shims(args: argparse.Namespace) -> int:
    from coordinator.shims import write_shims

    for path in write_shims(args.directory):
        print(f"wrote {path}")
    print(f"the pipeline's lines now run scripts-coordinator: cd {args.directory} && "
          f"python3 scripts_coordinator.py --jobs-file scoring_jobs.json")
    return ExitCode.OK


DEMO_EXITS = (
    (ExitCode.OK, "every chunk succeeded and the secret seed ranks first"),
    (ExitCode.JOBS_FAILED, "a chunk failed, or the secret seed is not at rank 1"),
    (ExitCode.CLUSTER_FAILED, "the local cluster could not start"))
# Commands that only write files here.
WRITE_EXITS = ((ExitCode.OK, "the files were written"),)


def register(command: CommandFactory) -> None:
    sub = command("demo", "run the Step 3 demo from any directory: synthetic data from a secret "
                          "seed, 36 chunks on a local cluster, the secret found at rank 1",
                  "coordinator demo --candidates 1000000 --nodes 4",
                  DEMO_EXITS)
    sub.add_argument("--dir", default="demo", help="where it works (default: ./demo)")
    sub.add_argument("--candidates", type=int, default=1_000_000,
                     help="candidate seeds, the secret one included (default: 1000000)")
    sub.add_argument("--nodes", type=int, default=4, help="local nodes (default: 4)")
    sub.add_argument("--chunks", type=int, default=36, help="jobs (default: 36)")
    sub.add_argument("--draws", type=int, default=100, help="history length (default: 100)")
    sub.add_argument("--rng-seed", type=int, default=2026, help="makes the data reproducible")
    add_warm_flags(sub, preload=False)
    sub.set_defaults(handler=cmd_demo)

    sub = command("examples", "copy the example jobs files and scripts into DIR/examples",
                  "coordinator examples . && coordinator local --jobs-file "
                  "examples/hello_jobs.json",
                  WRITE_EXITS)
    sub.add_argument("directory", nargs="?", default=".", metavar="DIR",
                     help="where the examples/ directory goes (default: .)")
    sub.set_defaults(handler=cmd_examples)

    sub = command("shims", "write scripts_coordinator.py and coordinator_adapter.py into a "
                           "pipeline's directory, so its shell scripts run unchanged",
                  "coordinator shims /opt/pipeline   # then: python3 scripts_coordinator.py "
                  "--jobs-file scoring_jobs.json",
                  WRITE_EXITS)
    sub.add_argument("directory", metavar="DIR", help="the pipeline's directory")
    sub.set_defaults(handler=cmd_shims)

    jobs = command("jobs", "write jobs files for a workload",
                   "coordinator jobs scoring --help",
                  WRITE_EXITS)
    kinds = jobs.add_subparsers(dest="kind", metavar="KIND", required=True)
    sub = kinds.add_parser(
        "scoring", formatter_class=formatter,
        help="Step 3: split survivors into chunk jobs over the nodes' GPUs",
        description="Split a survivors file into chunk files and write a jobs file in the "
                    "original format, dealt evenly over the nodes' GPUs.",
        epilog="example:\n  coordinator jobs scoring --survivors survivors.json "
               "--train-history train_history.json \\\n      --nodes rig-a,rig-b:2 --chunks 36 "
               "--prng-type java_lcg --mod 1000 \\\n      --jobs-file scoring_jobs.json "
               "--chunk-dir scoring_chunks\n\n" + exit_table(WRITE_EXITS))
    sub.add_argument("--survivors", required=True, help="JSON list of seeds or survivor objects")
    sub.add_argument("--train-history", required=True,
                     help="history path, as the workers will see it (relative to their workdir)")
    sub.add_argument("--nodes",
                     help="comma-separated nodes; NAME:K for a node with K GPUs (default: the "
                          "inventory's nodes and their gpus)")
    add_inventory_flag(sub, "cluster inventory for the default --nodes (default: "
                            "$SC_INVENTORY, else ./cluster.toml)")
    sub.add_argument("--chunks", type=int, default=36, help="number of jobs (default: 36)")
    sub.add_argument("--prng-type", required=True)
    sub.add_argument("--mod", type=int, required=True)
    sub.add_argument("--skip", type=int, default=0)
    sub.add_argument("--jobs-file", default="scoring_jobs.json")
    sub.add_argument("--chunk-dir", default=DEFAULT_CHUNK_DIR)
    sub.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    sub.add_argument("--balance", action="store_true",
                     help="write floating jobs (node \"any\"): each chunk runs on the first "
                          "free node or GPU, so fast nodes take more chunks (mixed clusters); "
                          "with --nodes (or an inventory) the chunks shrink as they go "
                          "(factoring: each batch half of the seeds left, one chunk per slot), "
                          "so the last ones, where the run's end is decided, are small")
    sub.set_defaults(handler=cmd_jobs_scoring)

    sub = command("demo-data", "write a synthetic draw history from a secret seed, and survivors",
                  "coordinator demo-data --out-dir demo --candidates 1000000 --prng-type java_lcg "
                  "--mod 1000",
                  WRITE_EXITS)
    sub.add_argument("--out-dir", default="demo", help="where the files go (default: demo)")
    sub.add_argument("--candidates", type=int, default=1_000_000,
                     help="number of candidate seeds, the secret one included (default: 1000000)")
    sub.add_argument("--draws", type=int, default=100, help="history length (default: 100)")
    sub.add_argument("--prng-type", default="java_lcg")
    sub.add_argument("--mod", type=int, default=1000)
    sub.add_argument("--secret-seed", type=int,
                     help="the seed the history is drawn from (default: drawn from --rng-seed, "
                          "so the same one every time unless --rng-seed changes)")
    sub.add_argument("--rng-seed", type=int, default=2026,
                     help="seeds the candidates and the default secret seed (default: "
                          "%(default)s): the same files every time")
    sub.set_defaults(handler=cmd_demo_data)
