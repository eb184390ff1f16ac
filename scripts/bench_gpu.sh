#!/usr/bin/env bash
# GPU checks in one go (make bench-gpu): benchmark matrix on the GPU (bf16, compile, channels_last),
# a 1-GPU DDP smoke run, and a timed short CIFAR-shaped run on the GPU-resident data path.
# Uses the real CIFAR-100 under $DATA_DIR when present, else writes a CIFAR-shaped random data set.
# Env: PY (python), DATA_DIR, OUT (results folder), EPOCHS (timed run, default 3), QUICK=1 (smaller matrix),
#      OFFICIAL_DIR (a clone of https://github.com/hunto/DiffKD, default .official/DiffKD when present): adds the
#      official implementation's KD and DiffKD steps to the matrix.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench_results/gpu-$(date +%Y%m%d-%H%M%S)}
DATA_DIR=${DATA_DIR:-$OUT/data}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"
status() { printf '%-44s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

if [ ! -f "$DATA_DIR/cifar-100-python/train" ]; then
  $PY scripts/make_cifar_shaped.py "$DATA_DIR" >/dev/null && DATA_NOTE="CIFAR-shaped random data" || DATA_NOTE="no data"
else
  DATA_NOTE="real CIFAR-100"
fi

# 1. benchmark matrix
if [ "${QUICK:-0}" = 1 ]; then MATRIX=(--pairs cifar --channels-last off,on --compile off,teacher,on)
else MATRIX=(--compile off,teacher,on); fi
OFFICIAL_DIR=${OFFICIAL_DIR:-.official/DiffKD}
if [ -f "$OFFICIAL_DIR/diffkd.py" ]; then
  MATRIX+=(--methods none,kd,diffkd,official_kd,official_diffkd --official-dir "$OFFICIAL_DIR")
fi
$PY -m pytest -q tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
status "GPU tests (no host sync, bf16 finite)" "$([ $? = 0 ] && echo ok || echo "FAILED, see $OUT/gpu_tests.txt")"
$PY -m diffkd.bench --device cuda "${MATRIX[@]}" --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
status "benchmark" "$([ "${PIPESTATUS[0]}" = 0 ] && echo ok || echo FAILED) ($OUT/bench.json)"

COMMON=(experiment=cifar_wrn40_wrn16 paths.data_dir="$DATA_DIR" data.download=false model.teacher.weights=null
        logger=csv callbacks.progress_bar.refresh_rate=50)

# 2. 1-GPU DDP smoke (bf16, channels_last, compile)
$PY -m diffkd.train "${COMMON[@]}" trainer=ddp trainer.devices=1 debug=fast model.channels_last=true \
    model.compile=true hydra.run.dir="$OUT/ddp_smoke" > "$OUT/ddp_smoke.txt" 2>&1
status "1-GPU DDP smoke (bf16, channels_last, compile)" "$([ $? = 0 ] && echo ok || echo "FAILED, see $OUT/ddp_smoke.txt")"

# 3. timed CIFAR-shaped run, GPU-resident data, bf16 teacher, channels_last, compile
start=$(date +%s)
$PY -m diffkd.train "${COMMON[@]}" trainer=gpu trainer.max_epochs="$EPOCHS" data.gpu_preload=true \
    data.num_workers=0 model.channels_last=true model.compile=true model.teacher_dtype=bfloat16 test=false \
    hydra.run.dir="$OUT/timed_run" > "$OUT/timed_run.txt" 2>&1
rc=$?
wall=$(( $(date +%s) - start ))
epoch_times=$($PY - "$OUT/timed_run/csv/version_0/metrics.csv" <<'PYEOF' 2>/dev/null
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/epoch_time_s")]
t = [float(r["train/epoch_time_s"]) for r in rows]
steady = t[1:] or t
print(" ".join(f"{x:.1f}" for x in t), f"| steady {sum(steady)/len(steady):.2f} s/epoch -> 240 epochs ≈ {240*sum(steady)/len(steady)/60:.1f} min")
PYEOF
)
status "timed run ($EPOCHS epochs, $DATA_NOTE)" "$([ $rc = 0 ] && echo ok || echo FAILED) wall ${wall}s; epoch times: ${epoch_times:-n/a}"
echo; echo "== summary ($OUT/summary.txt) =="; cat "$OUT/summary.txt"
