#!/usr/bin/env bash
# Step 3 end to end on this machine: synthetic history from a secret seed,
# 1,000,000 candidates in 36 chunks over 4 nodes, a private local cluster,
# and the merged ranking, which must put the secret seed first.
#   usage: examples/step3_demo.sh [WORKDIR]   (default: demo)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-demo}"
mkdir -p "$work"
cd "$work"
# Fresh data every time: old .done markers would make the new run skip its jobs (resume).
rm -rf full_scoring_results scoring_chunks
coordinator demo-data --out-dir . --candidates 1000000 --draws 100 --prng-type java_lcg --mod 1000
coordinator jobs scoring --survivors survivors.json --train-history train_history.json \
    --nodes rig-a,rig-b,rig-c,rig-d --chunks 36 --prng-type java_lcg --mod 1000 \
    --jobs-file scoring_jobs.json --chunk-dir scoring_chunks
coordinator local --jobs-file scoring_jobs.json --output-dir full_scoring_results \
    --scripts-dir "$here"
python3 - <<'PY'
import json
secret = json.load(open("secret.json"))["secret_seed"]
top = json.load(open("full_scoring_results/survivors_with_scores.json"))["results"][0]
verdict = "found" if top["seed"] == secret else "NOT found"
print(f"secret seed {secret} {verdict} at rank 1 ({top['matches']} matches)")
raise SystemExit(0 if top["seed"] == secret else 1)
PY
