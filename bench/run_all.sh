#!/usr/bin/env bash
# Run every benchmark, one after the other, and update bench/RESULTS.md.
#
#   bench/run_all.sh                          # CPU, fp32, all cores
#   BENCH_THREADS=1 bench/run_all.sh          # one torch thread per process (a shared, busy machine)
#   bench/run_all.sh --device cuda --dtype bf16
#
# Extra arguments go to every script. PYTHON is the main environment's interpreter (default: the
# Makefile's .venv). The PPO peer (trl 1.12.0) lives in its own venv, built by
# bench/setup_peer_venv.sh on first use; if that cannot be built (no network, say), PPO runs our
# side only. BENCH_PPO_SIDES=ours skips the peer on purpose.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python3 )}"
export HF_HUB_OFFLINE=1
args=("$@")
[[ -n "${BENCH_THREADS:-}" ]] && args+=(--threads "$BENCH_THREADS")

ppo_sides="${BENCH_PPO_SIDES:-ours,peer}"
if [[ "$ppo_sides" == *peer* ]] && ! bench/setup_peer_venv.sh; then
    echo "warning: the trl-1.12 peer venv could not be built; PPO runs our side only" >&2
    ppo_sides=ours
fi

"$PYTHON" -m bench.bench_matmul "${args[@]}"
"$PYTHON" -m bench.bench_generate "${args[@]}"
"$PYTHON" -m bench.bench_sft "${args[@]}"
"$PYTHON" -m bench.bench_reward "${args[@]}"
"$PYTHON" -m bench.bench_ppo --sides "$ppo_sides" "${args[@]}"
echo "results: bench/RESULTS.md"
