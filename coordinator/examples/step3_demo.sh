#!/usr/bin/env bash
# Step 3 end to end on this machine: synthetic history from a secret seed, 1,000,000
# candidates in 36 chunks over 4 nodes, a private local cluster, and the merged ranking,
# which must put the secret seed first (exit 1 if it does not).
#   usage: examples/step3_demo.sh [WORKDIR] [coordinator demo flags]   (default: demo)
set -euo pipefail
work="${1:-demo}"
shift || true
exec coordinator demo --dir "$work" "$@"
