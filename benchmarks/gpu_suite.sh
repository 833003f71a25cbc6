#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Every GPU measurement of docs/performance.md, in at most 8 minutes on one H100/H200 (the limits below add up to
# 470 s plus ~10 s of installs and checks: 8 min at worst; expected ~5-6 min). Run from the repository root:  bash benchmarks/gpu_suite.sh
# Writes one JSON report and one log per measurement under $OUT (default ./out-gpu). Each measurement runs in its own
# process under `timeout`, so one failure or overrun does not lose the others.
set -u
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

# palpcompose imports rich, the equivalence tests need pytest: their pure-Python wheels sit in .whl/ too.
python3 -c "
import importlib.util
missing = [m for m in ('rich', 'pytest', 'PIL', 'numpy', 'accelerate', 'peft', 'transformers', 'diffusers')
           if importlib.util.find_spec(m) is None]
print('missing modules:', ', '.join(missing) if missing else 'none')
"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. The levers must not change the math on the GPU either (CUDA graphs, graphed rendering).
step gpu_tests 60 python3 -m pytest -q -m gpu tests/test_step_equivalence.py tests/test_benchmarks.py -p no:cacheprovider

# 2. SD-1.5 shapes, bf16, 512 px, batch 1: the peer, our step without and with PALP, CUDA graphs (guidance passes,
#    then the personalization pass too); then each other
#    lever on its own (two processes, so a timeout loses at most half).
step train_b1 85 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 1 --steps 15 --warmup 3 \
    --profile-steps 3 --json --variants reference,none,palp,palp+graphs,palp+graphs+fused,palp+graphs+graphs_pers+fused
step train_b1_levers 85 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 1 --steps 15 --warmup 3 \
    --profile-steps 3 --json --variants palp+fused,palp+channels_last,palp+sdpa=flash,palp+sdpa=cudnn,palp+lowmem

# 3. Batch 8: samples/s against GPU-busy time, and what the low-memory candidate saves there.
step train_b8 80 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 8 --steps 8 --warmup 2 \
    --profile-steps 3 --json \
    --variants reference,palp,palp+graphs+graphs_pers+fused,palp+lowmem

# 4. Regional compilation (compile time counts in the 500-step total), alone and with graphs.
step train_compile 85 python3 -m benchmarks.train_step --arch sd15 --device cuda --batch 1 --steps 15 --warmup 3 \
    --profile-steps 3 --json \
    --variants palp+compile,palp+compile+graphs+fused

# 5. Rendering, fp16, DPM++ 2M, 30 steps, 512 px: the plain diffusers call vs our path and its levers.
step render_b1 45 python3 -m benchmarks.render --arch sd15 --device cuda --batch 1 --batches 3 --json \
    --variants diffusers,ours,ours+fuse,ours+graphs,ours+fuse+graphs,ours+fuse+graphs+channels_last
step render_b4 30 python3 -m benchmarks.render --arch sd15 --device cuda --batch 4 --batches 2 --json \
    --variants diffusers,ours+fuse+graphs

echo "=== done in $(( $(date +%s) - START ))s; JSON under $OUT:"
ls -l "$OUT"
for f in "$OUT"/*.json; do echo "--- $f"; cat "$f"; echo; done
