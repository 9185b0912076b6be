#!/usr/bin/env bash
# GPU verification in one go: every CUDA op against the CPU reference, the tiny job on the GPU
# against the CPU, ranks sharing the GPU against one rank, and GPT-2 124M timed beside PyTorch,
# its measured per-op table set beside the roofline prediction.
#
#   scripts/gpu-check.sh --prepare   on a build machine: release build with every kernel compiled,
#                                    copied with the PyTorch anchor into gpu-bin/ (git-ignored)
#   scripts/gpu-check.sh             on the GPU machine: uses gpu-bin/shardtrain, or builds with
#                                    cargo when the machine has it; exits non-zero if a check fails
#
# Environment: OUT (where run directories and the log go; default a temp dir), SKIP_ANCHOR=1 (no
# PyTorch), GPT2_STEPS (timed GPT-2 steps, default 30), STEP_LIMIT (seconds any one step may take,
# default 300). Takes about 5-6 minutes on an H100.
#
# Every run of the binary or of python is under `timeout`: a step that hangs (a collective waiting
# on a peer, a GPU fault) is killed at STEP_LIMIT, counts as FAILED, and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    if [ -d .venv-cuda ] && [ -z "${NVCC:-}" ]; then
        NVCC=$(ls .venv-cuda/lib/python*/site-packages/nvidia/cu13/bin/nvcc | head -1)
        export NVCC
    fi
    SHARDTRAIN_REQUIRE_CUDA=1 cargo build --release --locked
    mkdir -p gpu-bin
    # Without its line tables the binary is a third of the size: the device tool carries 64 MiB.
    strip -o gpu-bin/shardtrain target/release/shardtrain 2>/dev/null \
        || cp target/release/shardtrain gpu-bin/shardtrain
    anchor=../shared/anchors/torch_gpt2_anchor.py
    [ -f "$anchor" ] && cp "$anchor" gpu-bin/
    ls -la gpu-bin
    exit 0
fi

if command -v cargo >/dev/null 2>&1; then
    SHARDTRAIN_REQUIRE_CUDA=1 cargo build --release --locked || exit 1
    BIN=target/release/shardtrain
elif [ -x gpu-bin/shardtrain ]; then
    BIN=gpu-bin/shardtrain
else
    echo "no cargo here and no gpu-bin/shardtrain: run scripts/gpu-check.sh --prepare on a build machine" >&2
    exit 2
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
FAILED=()
STEP_LIMIT=${STEP_LIMIT:-300}
note() { printf '\n=== %s\n' "$*"; }
limited() { # seconds, command...: runs a program under timeout (its whole process group), says so
    local limit=$1; shift
    timeout --kill-after=20 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "TIMED OUT after ${limit}s: $*" >&2; fi
    return $rc
}
check() { # name, command...: runs it (a program under STEP_LIMIT; shell functions limit their own
          # programs), records a failure; a timeout is one
    local name=$1; shift
    local rc
    if declare -F "$1" >/dev/null; then "$@"; rc=$?; else limited "$STEP_LIMIT" "$@"; rc=$?; fi
    if [ $rc -ne 0 ]; then FAILED+=("$name"); echo "FAILED: $name" >&2; fi
}

note "card"
limited 60 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
check "binary starts" "$BIN" --version

note "1. every CUDA op against the CPU reference"
check "op checks" "$BIN" check --device cuda --seed 1
check "op checks (seed 2)" "$BIN" check --device cuda --seed 2 >/dev/null

quiet_train() { # run-dir, args...: trains with progress off, prints the final lines; a failed or
                # timed-out run is recorded (its stdout is kept in <run-dir>.log)
    local dir=$1; shift
    rm -rf "$dir"
    limited "$STEP_LIMIT" "$BIN" train --run-dir "$dir" --set logging.progress=plain \
        --set logging.every_steps=1000 "$@" > "$dir.log"
    local rc=$?
    grep -E "^(done|device):" "$dir.log"
    if [ $rc -ne 0 ]; then
        FAILED+=("train $(basename "$dir")")
        echo "FAILED: train $(basename "$dir") (exit $rc; $dir.log)"
    fi
    return $rc
}

compare() { # label, summary a, summary b, max rel diff first 10 steps, max rel diff all steps
    limited 120 python3 - "$@" <<'EOF'
import json, sys
label, a, b, tol10, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
la, lb = json.load(open(a))["losses"], json.load(open(b))["losses"]
assert len(la) == len(lb), f"{len(la)} vs {len(lb)} steps"
rel = [abs(x - y) / abs(y) for x, y in zip(la, lb)]
d10, dall = max(rel[:10]), max(rel)
ok = d10 <= tol10 and dall <= tol
print(f"{label}: max relative loss difference steps 1-10 {d10:.2e} (limit {tol10:.0e}), all {len(rel)} steps {dall:.2e} (limit {tol:.0e}) -> {'ok' if ok else 'FAIL'}")
print("  losses a:", " ".join(f"{x:.4f}" for x in la[:5]), "...", f"{la[-1]:.4f}")
print("  losses b:", " ".join(f"{x:.4f}" for x in lb[:5]), "...", f"{lb[-1]:.4f}")
sys.exit(0 if ok else 1)
EOF
}

TINY=(--set train.max_steps=60 --set train.warmup_steps=20 --set train.eval_every=0 --set checkpoint.save_final=false)
note "2. tiny job: GPU against CPU (f32, then the bf16 policy)"
quiet_train "$OUT/tiny-gpu" "${TINY[@]}" --set device=cuda
quiet_train "$OUT/tiny-cpu" "${TINY[@]}" --set device=cpu
check "tiny gpu=cpu f32" compare "tiny f32, gpu vs cpu" "$OUT/tiny-gpu/summary.json" "$OUT/tiny-cpu/summary.json" 1e-4 2e-2
BF16=(--set parallel.mixed_precision.param_dtype=bf16)
quiet_train "$OUT/tiny-gpu-bf16" "${TINY[@]}" "${BF16[@]}" --set device=cuda
quiet_train "$OUT/tiny-cpu-bf16" "${TINY[@]}" "${BF16[@]}" --set device=cpu
check "tiny gpu=cpu bf16" compare "tiny bf16, gpu vs cpu" "$OUT/tiny-gpu-bf16/summary.json" "$OUT/tiny-cpu-bf16/summary.json" 1e-2 3e-2

note "3. four ranks sharing the GPU against one rank"
quiet_train "$OUT/tiny-gpu-w4" "${TINY[@]}" --set device=cuda --world 4 --set parallel.strategy=full_shard
check "world 4 = world 1 (gpu)" compare "tiny f32 on the gpu, world 4 vs world 1" "$OUT/tiny-gpu-w4/summary.json" "$OUT/tiny-gpu/summary.json" 1e-5 2e-2
quiet_train "$OUT/tiny-gpu-w4-hybrid" "${TINY[@]}" --set device=cuda --world 4 --set parallel.strategy=hybrid_shard --set parallel.shard_group_size=2
check "world 4 hybrid = world 1 (gpu)" compare "tiny f32 on the gpu, world 4 hybrid_shard vs world 1" "$OUT/tiny-gpu-w4-hybrid/summary.json" "$OUT/tiny-gpu/summary.json" 1e-5 2e-2

note "3b. NCCL through the launcher (world 1: NCCL refuses two ranks on one GPU)"
rm -rf "$OUT/tiny-nccl"
check "nccl launch world 1" "$BIN" launch --nproc-per-node 1 --master-port 29533 -- train \
    --run-dir "$OUT/tiny-nccl" "${TINY[@]}" --set device=cuda --set logging.progress=plain \
    --set logging.every_steps=1000 > "$OUT/tiny-nccl.log"
grep -E "done:" "$OUT/tiny-nccl.log"
check "nccl world 1 = local world 1 (gpu)" compare "tiny f32 on the gpu, NCCL launch vs threads" "$OUT/tiny-nccl/summary.json" "$OUT/tiny-gpu/summary.json" 1e-5 2e-2

note "4. GPT-2 124M, micro-batch 16 x 1024, bf16, full_shard world 1"
STEPS=${GPT2_STEPS:-30}
quiet_train "$OUT/gpt2" --config configs/gpt2-124m.yaml --set device=cuda \
    --set train.max_steps="$STEPS" --set train.warmup_steps=5 --set train.global_batch_size=16 \
    --set train.eval_every=0 --set checkpoint.save_final=false --set logging.profile_ops_steps=5
check "gpt2 timing" python3 - "$OUT/gpt2/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
L, d, T = 12, 768, 1024
flops_token = 6 * s["params"] + 12 * L * d * T     # FACTS.md: 0.860 GFLOP for GPT-2 124M
ms = s["median_step_seconds"] * 1e3
tok_s = 16 * T / s["median_step_seconds"]
print(f"shardtrain: {ms:.1f} ms/step (median, first step and op-timed steps left out), {tok_s:,.0f} tokens/s, "
      f"MFU {tok_s * flops_token / 989e12:.3f} (vs 989 TFLOP/s), peak device memory {s['device_memory_peak'] / 2**30:.2f} GiB, "
      f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}")
total = sum(t["total_ms"] for t in s["op_times"]) or 1.0
steps = 5  # logging.profile_ops_steps
print(f"{'op':<22}{'calls':>8}{'ms/step':>10}{'share':>8}")
for t in s["op_times"]:
    print(f"{t['op']:<22}{t['calls']:>8}{t['total_ms'] / steps:>10.2f}{100 * t['total_ms'] / total:>7.1f}%")
print(f"{'(sum of op times)':<22}{'':>8}{total / steps:>10.2f}")
EOF

note "4b. the measured per-op table beside the roofline prediction (bench --predict)"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$card" in *H200*) preset=h200 ;; *A100*) preset=a100 ;; *) preset=h100 ;; esac
check "gpt2 prediction vs measured" "$BIN" bench --predict --gpu "$preset" \
    --config configs/gpt2-124m.yaml --set train.global_batch_size=16 \
    --measured "$OUT/gpt2/summary.json"

note "6. collective bandwidth: 4 ranks sharing the GPU (device-to-device copies), for reference"
check "bench comm" "$BIN" bench comm --device cuda --world 4 --max-bytes 256M --iters 5

note "7. bench on the GPU: phases from CUDA events (exposed vs overlapped comm), then plan calibrated by it"
check "bench tiny" "$BIN" bench --config configs/tiny.yaml --device cuda --world 1,2,4 --steps 10
check "bench gpt2" "$BIN" bench --config configs/gpt2-124m.yaml --device cuda --world 1 \
    --strategy full_shard --steps 8 --set train.global_batch_size=16 --json > "$OUT/gpt2-bench.json"
check "bench gpt2 json" python3 - "$OUT/gpt2-bench.json" <<'EOF2'
import json, sys
b = json.load(open(sys.argv[1]))
for r in b["rows"]:
    p = r["phases_ms"]
    print(f"{b['card']}: world {r['world_size']} {r['strategy']}: {r['ms_per_step']['median']:.1f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']}, fwd {p['forward']:.1f} bwd {p['backward']:.1f} "
          f"opt {p['optimizer']:.1f} comm exposed {p['comm_exposed']:.1f} overlapped {p['comm_overlapped']:.1f} ms")
EOF2
limited "$STEP_LIMIT" "$BIN" plan --config configs/gpt2-124m.yaml --gpus 8 \
    --calibrate "$OUT/gpt2-bench.json" | tail -8 || FAILED+=("plan calibrated")

if [ "${SKIP_ANCHOR:-0}" != 1 ]; then
    note "5. PyTorch anchor on the same card (eager, torch.compile)"
    anchor=gpu-bin/torch_gpt2_anchor.py
    [ -f "$anchor" ] || anchor=../shared/anchors/torch_gpt2_anchor.py
    if [ -f "$anchor" ]; then
        check "anchor" python3 "$anchor" eager compile
    else
        echo "anchor script not found (run --prepare, or set SKIP_ANCHOR=1)"
        FAILED+=("anchor missing")
    fi
fi

note "summary"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "all GPU checks passed ($OUT)"
else
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
