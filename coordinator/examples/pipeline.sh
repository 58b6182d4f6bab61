#!/usr/bin/env bash
# The whole pipeline queued at once, then this script leaves: Step 3 (seed scoring), a
# Step 5-like trial step that waits for it (--after), and a Step 6-like prediction that
# waits for Step 5. Each run starts by itself once the one before it has succeeded; nobody
# has to follow them, and a head node that reboots meanwhile changes nothing (the holds
# live in Redis). If Step 3 fails, Steps 5 and 6 end cancelled, saying why.
#
#   usage: cd WORKDIR && coordinator local --up && bash examples/pipeline.sh
#          coordinator wait STEP6_RUN        # (optional) follow the last step
#
# Needs a cluster whose workers' workdir is this directory: `coordinator local --up` here
# (nodes rig-a and rig-b), or a real one named by $SC_BROKER_URL (NODES=a,b for its nodes).
# Step 3's merged ranking is written when its run is collected (coordinator collect or
# wait); the Step 5 and 6 jobs here only stand in for the real trial and prediction scripts.
set -euo pipefail
nodes="${NODES:-rig-a,rig-b}"
first="${nodes%%,*}"
last="${nodes##*,}"

coordinator demo-data --out-dir . --candidates 200000 --draws 100 --prng-type java_lcg \
    --mod 1000 >&2
coordinator jobs scoring --survivors survivors.json --train-history train_history.json \
    --nodes "$nodes" --chunks 4 --prng-type java_lcg --mod 1000 \
    --jobs-file step3_jobs.json >&2
step3=$(coordinator submit --jobs-file step3_jobs.json)

cat > step5_jobs.json <<JOBS
[{"job_id": "trial_a", "script": "examples/write_output.py", "node": "$first",
  "args": ["--output-file", "step5/trial_a.json", "--sleep", "1"]},
 {"job_id": "trial_b", "script": "examples/write_output.py", "node": "$last",
  "args": ["--output-file", "step5/trial_b.json", "--sleep", "1"]},
 {"job_id": "pick", "script": "examples/write_output.py", "node": "$first",
  "args": ["--output-file", "step5/best.json"], "after": ["trial_a", "trial_b"]}]
JOBS
step5=$(coordinator submit --jobs-file step5_jobs.json --preserve-paths --after "$step3")

cat > step6_jobs.json <<JOBS
[{"job_id": "predict", "script": "examples/write_output.py", "node": "$last",
  "args": ["--output-file", "step6/prediction.json"]}]
JOBS
step6=$(coordinator submit --jobs-file step6_jobs.json --preserve-paths --after "$step5")

echo "queued: step 3 run $step3; step 5 run $step5 (after it); step 6 run $step6 (after step 5)"
echo "see them with: coordinator runs    follow the last with: coordinator wait $step6"
