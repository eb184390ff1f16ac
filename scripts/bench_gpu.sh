#!/usr/bin/env bash
# GPU checks in one go (make bench-gpu), sized for a short lease: at most 595 s in all (each part has its own
# time limit, so one hang cannot eat the rest; run it with a 600 s limit):
#   1. GPU tests (no host sync in the training step, bf16 finite)
#   2. eager matrix, CIFAR pair: student alone / KD / DiffKD (+ the official code's KD and DiffKD steps when a
#      clone is present) × fp32, bf16 × channels_last off, on
#   3. compiled, CIFAR pair, bf16 + channels_last: DiffKD with compile=teacher and compile=on, then compile=on
#      with CUDA graphs (compile_mode=reduce-overhead); the demo's small pair (fp32, channels_last): student / KD /
#      DiffKD eager and with the heads compiled into CUDA graphs — its DiffKD/KD time ratio against the FLOP ratio
#      (issue 15's target: within 1.1x; the heads' thousands of tiny kernels are launch-bound on a GPU)
#   4. ResNet-34 → ResNet-18 at 224², bf16 + channels_last: KD, DiffKD (+ official DiffKD)
#   5. a 1-GPU DDP smoke run (bf16, channels_last)
#   6. a timed CIFAR-shaped run on the GPU-resident data path (bf16 teacher, channels_last, compile), projected
#      to 240 epochs from its steady epochs
# Uses the real CIFAR-100 under $DATA_DIR when present, else writes a CIFAR-shaped random data set.
# Env: PY (python), DATA_DIR, OUT (results folder), EPOCHS (timed run, default 2), COMPILE_MODE (timed run's
#      model.compile_mode, default null), OFFICIAL_DIR (a clone of https://github.com/hunto/DiffKD; default
#      .official/DiffKD when present), REHEARSE=cpu (every part at toy size on the CPU: checks that the commands
#      still run, on a machine without a GPU; its timings mean nothing; the slow test suite does this).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench_results/gpu-$(date +%Y%m%d-%H%M%S)}
DATA_DIR=${DATA_DIR:-$OUT/data}
OFFICIAL_DIR=${OFFICIAL_DIR:-.official/DiffKD}
if [ "${REHEARSE:-}" = cpu ]; then
  DEVICE=cpu EPOCHS=${EPOCHS:-2} SCALE=5  # the CPU compiles and trains far slower: longer time limits
  TINY_BENCH=(--steps 1 --warmup 1 --batch 4)
  ON_DEVICE=(trainer.accelerator=cpu trainer.sync_batchnorm=false trainer.limit_train_batches=2 trainer.limit_val_batches=1)
  DATA_SIZE=(--n-train 256 --n-test 64)
elif [ -n "${REHEARSE:-}" ]; then
  echo "REHEARSE must be 'cpu' or unset, got '$REHEARSE'" >&2; exit 2
else
  DEVICE=cuda EPOCHS=${EPOCHS:-2} SCALE=1 TINY_BENCH=() ON_DEVICE=() DATA_SIZE=()
fi
mkdir -p "$OUT"
status() { printf '%-52s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
verdict() { case $1 in 0) echo ok ;; 124) echo "TIMED OUT" ;; *) echo "FAILED (rc $1)" ;; esac; }
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true; }

if [ ! -f "$DATA_DIR/cifar-100-python/train" ]; then
  $PY scripts/make_cifar_shaped.py "$DATA_DIR" "${DATA_SIZE[@]}" >/dev/null && DATA_NOTE="CIFAR-shaped random data" || DATA_NOTE="no data"
else
  DATA_NOTE="real CIFAR-100"
fi
OFFICIAL=()
METHODS=none,kd,diffkd
# the official files at the clone's root (hunto/DiffKD at 5367f44) or in its classification submodule (its head)
if [ -f "$OFFICIAL_DIR/diffkd.py" ] || [ -f "$OFFICIAL_DIR/classification/lib/models/losses/diffkd/diffkd.py" ]; then
  OFFICIAL=(--official-dir "$OFFICIAL_DIR"); METHODS=$METHODS,official_kd,official_diffkd; fi
BENCH=($PY -m diffkd.bench --device "$DEVICE" --no-heads "${TINY_BENCH[@]}")

# 1. GPU tests
timeout $((75 * SCALE)) $PY -m pytest -q tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
status "1. GPU tests (no host sync, bf16 finite)" "$(verdict $?) ($OUT/gpu_tests.txt)"

# 2. eager matrix
timeout $((80 * SCALE)) "${BENCH[@]}" --pairs cifar --methods "$METHODS" --precision fp32,bf16 --channels-last off,on \
  "${OFFICIAL[@]}" --out "$OUT/bench_eager.json" 2>&1 | tee "$OUT/bench_eager.txt"
status "2. eager matrix, CIFAR pair" "$(verdict "${PIPESTATUS[0]}") ($OUT/bench_eager.txt)"

# 3. compiled
timeout $((90 * SCALE)) "${BENCH[@]}" --pairs cifar --methods diffkd --precision bf16 --channels-last on \
  --compile teacher,on --out "$OUT/bench_compile.json" 2>&1 | tee "$OUT/bench_compile.txt"
status "3a. compile teacher / all, CIFAR pair, bf16 + cl" "$(verdict "${PIPESTATUS[0]}") ($OUT/bench_compile.txt)"
timeout $((90 * SCALE)) "${BENCH[@]}" --pairs cifar --methods diffkd --precision bf16 --channels-last on --compile on \
  --compile-mode reduce-overhead --out "$OUT/bench_cudagraphs.json" 2>&1 | tee "$OUT/bench_cudagraphs.txt"
status "3b. compile all + CUDA graphs, CIFAR pair" "$(verdict "${PIPESTATUS[0]}") ($OUT/bench_cudagraphs.txt)"
timeout $((60 * SCALE)) "${BENCH[@]}" --pairs small --methods none,kd,diffkd --precision fp32 --channels-last on \
  --compile off,heads --compile-mode reduce-overhead --out "$OUT/bench_small.json" 2>&1 | tee "$OUT/bench_small.txt"
status "3c. demo pair, eager / heads in CUDA graphs" "$(verdict "${PIPESTATUS[0]}") ($OUT/bench_small.txt)"

# 4. ImageNet-sized pair
IMETHODS=kd,diffkd
if [ ${#OFFICIAL[@]} -gt 0 ]; then IMETHODS=$IMETHODS,official_diffkd; fi
timeout $((45 * SCALE)) "${BENCH[@]}" --pairs imagenet --methods "$IMETHODS" --precision bf16 --channels-last on \
  "${OFFICIAL[@]}" --out "$OUT/bench_imagenet.json" 2>&1 | tee "$OUT/bench_imagenet.txt"
status "4. ResNet-34 -> ResNet-18, bf16 + cl" "$(verdict "${PIPESTATUS[0]}") ($OUT/bench_imagenet.txt)"

COMMON=(experiment=cifar_wrn40_wrn16 paths.data_dir="$DATA_DIR" data.download=false model.teacher.weights=null
        logger=csv callbacks.progress_bar.refresh_rate=50)

# 5. 1-GPU DDP smoke (bf16, channels_last)
timeout $((55 * SCALE)) $PY -m diffkd.train "${COMMON[@]}" trainer=ddp trainer.devices=1 debug=fast model.channels_last=true \
    hydra.run.dir="$OUT/ddp_smoke" "${ON_DEVICE[@]}" > "$OUT/ddp_smoke.txt" 2>&1
status "5. 1-GPU DDP smoke (bf16, channels_last)" "$(verdict $?) ($OUT/ddp_smoke.txt)"

# 6. timed CIFAR-shaped run, GPU-resident data, bf16 teacher, channels_last, compile
start=$(date +%s)
timeout $((100 * SCALE)) $PY -m diffkd.train "${COMMON[@]}" trainer=gpu trainer.max_epochs="$EPOCHS" data.gpu_preload=true \
    data.num_workers=0 model.channels_last=true model.compile=true model.compile_mode="${COMPILE_MODE:-null}" \
    model.teacher_dtype=bfloat16 test=false hydra.run.dir="$OUT/timed_run" "${ON_DEVICE[@]}" > "$OUT/timed_run.txt" 2>&1
rc=$?
wall=$(( $(date +%s) - start ))
epoch_times=$($PY - "$OUT/timed_run/csv/version_0/metrics.csv" "${REHEARSE:-}" <<'PYEOF' 2>/dev/null
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/epoch_time_s")]
t = [float(r["train/epoch_time_s"]) for r in rows]
steady = t[1:] or t
if sys.argv[2]:  # a rehearsal trains 2 batches an epoch: nothing to project
    print(" ".join(f"{x:.1f}" for x in t), "| rehearsal: no projection")
else:
    mean = sum(steady) / len(steady)
    print(" ".join(f"{x:.1f}" for x in t), f"| steady {mean:.2f} s/epoch -> 240 epochs ≈ {240 * mean / 60:.1f} min")
PYEOF
)
status "6. timed run ($EPOCHS epochs, $DATA_NOTE)" "$(verdict $rc) wall ${wall}s; epoch times: ${epoch_times:-n/a}"
echo; echo "== summary ($OUT/summary.txt) =="; cat "$OUT/summary.txt"
