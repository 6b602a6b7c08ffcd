#!/usr/bin/env bash
# The GPU measurement set of issue 15 in one command: the GPU tests, then the sampler and the GRPO-step
# benchmarks at both shapes (tiny: SimpleStories-1.25M's; qwen05b: Qwen2.5-0.5B's body, 361.5M) in fp32
# and then bf16, each writing bench/results/<name>.json with the device's name. fp32 and the tiny shape
# come first, so a cut-short run still holds the headline rows; a failing step is reported and the
# rest still run (exit status 1 at the end). Budget: about 10 minutes on an H100/H200 (an estimate: no
# GPU was available to the session that wrote this script).
#
#   bash bench/gpu.sh                    # or: make bench-gpu
#   PY=python3 PYTHONPATH=/tmp/site:src bash bench/gpu.sh   # a machine with mechrl's wheels in /tmp/site (STACK.md)
#   SKIP_TESTS=1 SHAPES=tiny DTYPES=fp32 bash bench/gpu.sh  # a subset
#   CONTENDERS=mechrl,mechrl_eager,generate bash bench/gpu.sh   # the sampler without transformers' compiled generate
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:-src}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device on this machine')" || exit 2
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
failed=()
run() { log "$PY $*"; "$PY" "$@" || { log "FAILED: $*"; failed+=("$*"); }; }
start=$(date +%s)
log "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'))"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  run -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_speed.py
fi

contenders=()
if [ -n "${CONTENDERS:-}" ]; then contenders=(--contenders "$CONTENDERS"); fi
for dtype in ${DTYPES:-fp32 bf16}; do
  for shape in ${SHAPES:-tiny qwen05b}; do
    if [ "$shape" = tiny ]; then batch=(--prompts 32 --generations 16 --new-tokens 64)
    else batch=(--prompts 8 --generations 8 --new-tokens 128); fi
    run bench/rollout_vs_generate.py --device cuda --shape "$shape" --dtype "$dtype" "${batch[@]}" \
      --repeats 5 --warmup 2 "${contenders[@]}" --name "rollout_vs_generate_cuda_${shape}_${dtype}"
    run bench/grpo_vs_trl.py --device cuda --shape "$shape" --dtype "$dtype" "${batch[@]}" \
      --warmup 2 --steps 5 --name "grpo_vs_trl_cuda_${shape}_${dtype}"
  done
done
log "done in $(( $(date +%s) - start )) s: bench/results/*_cuda_*.json"
if [ ${#failed[@]} -gt 0 ]; then
  log "${#failed[@]} step(s) failed:"; printf '  %s\n' "${failed[@]}"; exit 1
fi
