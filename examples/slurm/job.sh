#!/bin/bash
#SBATCH --job-name=tunnel-example
#SBATCH --output=tunnel-example-%j.out
#
# A batch job whose programs reach the far site through the tunnel. Two lines do it
# (the `set` line is only good practice): an agent must be running for this user on
# the node (the systemd user unit, or `tunnel-agent run` started earlier); the
# `eval` exports LD_PRELOAD and the routes for every program that follows.
set -euo pipefail
eval "$(tunnel-agent env)"
curl -sS --fail "${TUNNEL_EXAMPLE_URL:-http://web.site-b.internal:8080/hello.txt}"
