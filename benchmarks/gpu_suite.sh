#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md, in three parts that each fit one device call (at most 10 minutes;
# a session has 30 minutes of device time in all, machine start included, so run `core` first, then `levers`, then
# `extra` if time is left). Run from the repository root:
#     bash benchmarks/gpu_suite.sh core      # installs, GPU equivalence tests, SD-1.5 batch 1: limits add up to 510 s
#     bash benchmarks/gpu_suite.sh levers    # each other lever alone at batch 1, and batch 8: 500 s
#     bash benchmarks/gpu_suite.sh extra     # regional compilation, rendering: 560 s
#     bash benchmarks/gpu_suite.sh quant     # 8-bit frozen weights (train.frozen_weights): 330 s; needs torchao in .whl
#     bash benchmarks/gpu_suite.sh all       # everything, on a machine without the per-call limit (~26 min at worst)
# The limits are 2-3x what the 2026-11-23 H100 run needed per variant (~15 s setup and warm-up, 0.3-0.5 s per step,
# 10-60 s to parse a profile; docs/data/gpu-2026-11-23/): that run's limits (45-85 s per measurement) killed most
# measurements. Writes one JSON report and one log per measurement under $OUT (default ./out-gpu). Each measurement
# runs in its own process under `timeout`, so one failure or overrun does not lose the others.
set -u
PART=${1:-all}
case "$PART" in core|levers|extra|quant|all) ;; *) echo "usage: bash benchmarks/gpu_suite.sh core|levers|extra|quant|all" >&2; exit 2;; esac
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
OUT=${OUT:-$PWD/out-gpu}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
START=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run, tee the log, keep the last line (the JSON report) as NAME.json
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed): $*"
    timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    tail -n 1 "$OUT/$name.log" | python3 -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null \
        && tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "=== $name: exit $rc"
}

# The device image has no diffusers: benchmarks/gpu_wheels.sh fetches its wheel into .whl/ (here), the call carries
# .whl, and this installs it beside the image's own packages.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 -c "
import importlib.util
missing = [m for m in ('rich', 'pytest', 'PIL', 'numpy', 'accelerate', 'peft', 'transformers', 'diffusers')
           if importlib.util.find_spec(m) is None]
print('missing modules:', ', '.join(missing) if missing else 'none')
"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. The levers must not change the math on the GPU either (CUDA graphs, graphed rendering).
want core && step gpu_tests 150 python3 -m pytest -q -m gpu tests/test_step_equivalence.py tests/test_benchmarks.py \
    -p no:cacheprovider

# 2. SD-1.5 shapes, bf16, 512 px, batch 1: the peer, our step without and with PALP, CUDA graphs (guidance passes,
#    then the personalization pass too). One profiled step per variant (parsing a profile is slow).
want core && step train_b1 360 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 1 --steps 15 \
    --warmup 3 --profile-steps 1 --json \
    --variants reference,none,palp,palp+graphs,palp+graphs+fused,palp+graphs+graphs_pers+fused

# 3. Each other lever on its own at batch 1; batch 8: samples/s against GPU-busy time, the low-memory candidate.
want levers && step train_b1_levers 260 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 1 \
    --steps 15 --warmup 3 --profile-steps 1 --json \
    --variants palp+fused,palp+channels_last,palp+sdpa=flash,palp+sdpa=cudnn,palp+lowmem
want levers && step train_b8 240 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 8 --steps 8 \
    --warmup 2 --profile-steps 1 --json --variants reference,palp,palp+graphs+graphs_pers+fused,palp+lowmem

# 4. Regional compilation (compile time counts in the 500-step total), alone and with graphs; rendering, fp16,
#    DPM++ 2M, 30 steps, 512 px: the plain diffusers call vs our path and its levers.
want extra && step train_compile 320 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 1 --steps 15 \
    --warmup 3 --profile-steps 1 --json --variants palp+compile,palp+compile+graphs+fused
want extra && step render_b1 150 python3 -m benchmarks.render --arch sd15 --device cuda --batch 1 --batches 3 --json \
    --variants diffusers,ours,ours+fuse,ours+graphs,ours+fuse+graphs,ours+fuse+graphs+channels_last
want extra && step render_b4 90 python3 -m benchmarks.render --arch sd15 --device cuda --batch 4 --batches 2 --json \
    --variants diffusers,ours+fuse+graphs

# 5. 8-bit frozen weights (train.frozen_weights, docs/flow-memory.md): the product's int8 path trains tiny Flux on the
#    GPU; then Flux.1-dev widths, 2 + 2 blocks, 512 px, one forward + backward per variant: weights, bytes saved for
#    backward and the CUDA peak for bf16, torchao's int8 alone (its bf16 weight copies) and the int8 / fp8 wrapper.
want quant && step quant_tests 90 python3 -m pytest -q -m gpu tests/test_quantize.py -p no:cacheprovider
want quant && step quant_memory 240 python3 -m benchmarks.quant_memory --device cuda --json

echo "=== done in $(( $(date +%s) - START ))s; JSON under $OUT:"
ls -l "$OUT"
for f in "$OUT"/*.json; do echo "--- $f"; cat "$f"; echo; done
