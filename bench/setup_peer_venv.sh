#!/usr/bin/env bash
# Build the bench-only venv that holds the PPO peer: trl 1.12.0, the last TRL release that ships
# PPOTrainer (as trl.experimental.ppo). The main environment keeps its newer trl; only
# bench/bench_ppo.py --peer uses this venv. Idempotent: a finished venv is left alone.
#
#   bench/setup_peer_venv.sh            # CPU torch (the local 2.13.0 wheel)
#   TORCH_SPEC=torch==2.13.0 bench/setup_peer_venv.sh   # override, e.g. a CUDA build on a GPU box
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3.11}"
VENV="${PEER_VENV:-$HERE/.venv-trl112}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# trl 1.12.0 needs transformers>=4.56.2; use the main env's version (the Makefile's .venv) so both
# sides run the same model code and only the trainer differs.
MAIN_TRANSFORMERS="$("$REPO/.venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==${MAIN_TRANSFORMERS:-5.23.0}}"
STAMP="$VENV/.installed-trl112-${TRANSFORMERS_SPEC//[^A-Za-z0-9.=]/_}"

if [[ -f "$STAMP" ]]; then
    echo "peer venv ready: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "trl==1.12.0" "$TRANSFORMERS_SPEC" "accelerate>=1.4" "datasets>=4.7" psutil pyyaml
"$VENV/bin/python" -c "import trl, transformers, torch; from trl.experimental.ppo import PPOTrainer, PPOConfig; \
print('peer venv: trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "peer venv ready: $VENV (repo: $REPO)"
