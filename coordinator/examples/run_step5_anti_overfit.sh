#!/usr/bin/env bash
# Step 5 (anti-overfit trials) the way the pipeline runs it: its jobs write into per-trial
# paths of their own, so paths are preserved. Run it in the pipeline's directory (with the
# shims from `coordinator shims .`); the nodes' workers must be up.
#   usage: examples/run_step5_anti_overfit.sh [JOBS_FILE]   (default: anti_overfit_jobs.json)
set -euo pipefail
jobs="${1:-anti_overfit_jobs.json}"

python3 scripts_coordinator.py --jobs-file "$jobs" --output-dir anti_overfit_results \
    --preserve-paths
echo "step 5 done: each trial's outputs are where its jobs put them; summary in anti_overfit_results/"
