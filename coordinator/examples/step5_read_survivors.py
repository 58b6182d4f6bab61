"""How Step 5 reads Step 3's merged ranking (a consumer of survivors_with_scores.json).

    python examples/step5_read_survivors.py \
        --survivors full_scoring_results/survivors_with_scores.json [--top 10] [--min-score 0]

It checks the file's shape as a consumer relies on it (see docs/step3.md, "The merged
Step 3 file") and prints the best seeds, one JSON object per line.
"""

import argparse
import json
import sys

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--survivors", required=True)
parser.add_argument("--top", type=int, default=10)
parser.add_argument("--min-score", type=float, default=0.0)
args = parser.parse_args()

with open(args.survivors) as fh:
    merged = json.load(fh)
if merged.get("format_version") != 1:
    sys.exit(f"{args.survivors}: format_version {merged.get('format_version')!r}, expected 1")
for name in ("prng_type", "mod", "skip", "n_draws", "n_seeds", "chunks", "results"):
    if name not in merged:
        sys.exit(f"{args.survivors}: no {name!r}")
results = merged["results"]
if len(results) != merged["n_seeds"]:
    sys.exit(f"{args.survivors}: {len(results)} results, n_seeds says {merged['n_seeds']}")
keys = [(-record["score"], record["seed"]) for record in results]
if keys != sorted(keys):
    sys.exit(f"{args.survivors}: not sorted by score (descending) then seed")
for record in results[:args.top]:
    if record["score"] < args.min_score:
        break
    print(json.dumps({"seed": record["seed"], "matches": record["matches"],
                      "score": record["score"], "prng_type": merged["prng_type"],
                      "mod": merged["mod"]}))
