#!/usr/bin/env bash
# Step 3 (full scoring) the way the pipeline's own run_step3_full_scoring.sh does it, on
# scripts-coordinator. Run it in the pipeline's directory, which holds survivors.json,
# train_history.json and the two shims that `coordinator shims .` writes; the nodes'
# workers must be up (coordinator cluster up, or coordinator worker --node NAME on each).
#   usage: examples/run_step3_full_scoring.sh [NODES]      (default: rig-a,rig-b; NAME:K for K GPUs)
set -euo pipefail
nodes="${1:-rig-a,rig-b}"

# 1. The jobs: survivors split into 36 chunk files, dealt over the nodes' GPUs.
coordinator jobs scoring --survivors survivors.json --train-history train_history.json \
    --nodes "$nodes" --chunks 36 --prng-type java_lcg --mod 1000 \
    --jobs-file scoring_jobs.json --chunk-dir scoring_chunks

# 2. The pipeline's own line, unchanged: exit 0 only if every chunk succeeded.
python3 scripts_coordinator.py --jobs-file scoring_jobs.json

# 3. Hand the merged ranking to Step 5.
survivors=full_scoring_results/survivors_with_scores.json
test -s "$survivors"
echo "step 3 done: next, step 5 with --survivors $survivors"
