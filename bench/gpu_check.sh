#!/usr/bin/env bash
# The cluster path on one GPU, in about 4 minutes on an H200 (bf16):
#   1. bench/gpu_check.py: SFT, RM and PPO through `rlhf run` under single-GPU, DDP, FSDP2, ZeRO-2 and
#      ZeRO-3 (one process each, the repo's accelerate files), tiny model and SmolLM2-135M shape;
#   2. bench/bench_ppo.py on the GPU: our PPO stage against trl 1.12.0's PPOTrainer, side by side.
# Usage: bash bench/gpu_check.sh OUT_DIR [SMOLLM2_DIR]
#   SMOLLM2_DIR: SmolLM2-135M-Instruct's folder (config + tokenizer; weights optional, random if absent).
#   Default: the converted model in the model cache (`make install` or any run provisions it).
# Offline GPU machines: put wheels of what the machine lacks in .whl/ (trl 1.12.0 alone in .whl/trl112/)
# and they are installed into /tmp. With network, install the project beforehand (`pip install -e .`;
# `.[gpu]` adds DeepSpeed, for the pending ZeRO rows) and trl 1.12.0 in bench/.venv-trl112.
set -euo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [SMOLLM2_DIR]}
smollm2=${2:-${RLHF_CACHE:-$HOME/.cache/rlhf}/models/smollm2-135m-instruct}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mkdir -p "$out"
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gc-site .whl/*.whl
  export PYTHONPATH=/tmp/gc-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
peer_python=${PEER_PYTHON:-bench/.venv-trl112/bin/python}
if [ -d .whl/trl112 ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gc-trl112 .whl/trl112/*.whl
  printf '#!/bin/sh\nPYTHONPATH=/tmp/gc-trl112:$PYTHONPATH exec %s "$@"\n' "$(command -v $py)" > /tmp/gc-peer-python
  chmod +x /tmp/gc-peer-python
  peer_python=/tmp/gc-peer-python
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L || true
$py -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
$py -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || echo "deepspeed: not installed (zero2/zero3 rows will fail)"
$py -m bench.gpu_check --out "$out/runs" --smollm2-dir "$smollm2" --timeout "${GPU_CHECK_RUN_TIMEOUT:-300}" || true
cp "$out/runs/gpu_check.md" "$out/runs/gpu_check.jsonl" "$out/" 2>/dev/null || true
$py -m bench.bench_ppo --device cuda --dtype bf16 --model "$(cat "$out/runs/smollm2_path.txt")" --no-write \
    --peer-python "$peer_python" --log-dir "$out/bench_ppo_logs" 2>&1 | tee "$out/bench_ppo.txt" || true
