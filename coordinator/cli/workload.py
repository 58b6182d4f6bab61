"""Workload verbs: ``jobs scoring`` (Step 3 jobs files) and ``demo-data``."""

from __future__ import annotations

import argparse

from coordinator.cli.common import CommandFactory, add_inventory_flag, formatter
from coordinator.cluster.inventory import find_inventory
from coordinator.errors import ExitCode, InvalidJobsError
from coordinator.submit import DEFAULT_CHUNK_DIR, DEFAULT_OUTPUT_DIR


def nodes_spec(args: argparse.Namespace) -> str:
    """``--nodes``, else every inventory node with its GPU count (``rig-a:2,rig-b:1``)."""
    if args.nodes:
        return str(args.nodes)
    inventory = find_inventory(args.inventory)
    if inventory is None:
        raise InvalidJobsError("--nodes is required without a cluster inventory "
                               "(./cluster.toml, $SC_INVENTORY or --inventory)")
    return ",".join(f"{label}:{node.config.gpus}" for label, node in inventory.nodes.items())


def cmd_jobs_scoring(args: argparse.Namespace) -> int:
    from coordinator.scoring_jobs import generate_scoring_jobs

    result = generate_scoring_jobs(
        args.survivors, args.train_history, nodes_spec(args), args.chunks, args.prng_type, args.mod,
        args.jobs_file, args.chunk_dir, args.output_dir, args.skip)
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


def cmd_shims(args: argparse.Namespace) -> int:
    from coordinator.shims import write_shims

    for path in write_shims(args.directory):
        print(f"wrote {path}")
    print(f"the pipeline's lines now run scripts-coordinator: cd {args.directory} && "
          f"python3 scripts_coordinator.py --jobs-file scoring_jobs.json")
    return ExitCode.OK


def register(command: CommandFactory) -> None:
    sub = command("shims", "write scripts_coordinator.py and coordinator_adapter.py into a "
                           "pipeline's directory, so its shell scripts run unchanged",
                  "coordinator shims /opt/pipeline   # then: python3 scripts_coordinator.py "
                  "--jobs-file scoring_jobs.json")
    sub.add_argument("directory", metavar="DIR", help="the pipeline's directory")
    sub.set_defaults(handler=cmd_shims)

    jobs = command("jobs", "write jobs files for a workload",
                   "coordinator jobs scoring --help")
    kinds = jobs.add_subparsers(dest="kind", metavar="KIND", required=True)
    sub = kinds.add_parser(
        "scoring", formatter_class=formatter,
        help="Step 3: split survivors into chunk jobs over the nodes' GPUs",
        description="Split a survivors file into chunk files and write a jobs file in the "
                    "original format, dealt evenly over the nodes' GPUs.",
        epilog="example:\n  coordinator jobs scoring --survivors survivors.json "
               "--train-history train_history.json \\\n      --nodes rig-a,rig-b:2 --chunks 36 "
               "--prng-type java_lcg --mod 1000 \\\n      --jobs-file scoring_jobs.json "
               "--chunk-dir scoring_chunks")
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
    sub.set_defaults(handler=cmd_jobs_scoring)

    sub = command("demo-data", "write a synthetic draw history from a secret seed, and survivors",
                  "coordinator demo-data --out-dir demo --candidates 1000000 --prng-type java_lcg "
                  "--mod 1000")
    sub.add_argument("--out-dir", default="demo", help="where the files go (default: demo)")
    sub.add_argument("--candidates", type=int, default=1_000_000,
                     help="number of candidate seeds, the secret one included (default: 1000000)")
    sub.add_argument("--draws", type=int, default=100, help="history length (default: 100)")
    sub.add_argument("--prng-type", default="java_lcg")
    sub.add_argument("--mod", type=int, default=1000)
    sub.add_argument("--secret-seed", type=int, help="default: a random one")
    sub.add_argument("--rng-seed", type=int, default=2026, help="makes the data reproducible")
    sub.set_defaults(handler=cmd_demo_data)
