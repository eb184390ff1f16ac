#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, torchvision, lightning, timm, torchmetrics, but no Hydra and no
# network): downloads them into .whl/ (git-ignored) for `device.run(carry=[".whl", ...])`. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime 4.9.3 (Hydra's parser runtime) exists only as a source archive: build its pure-Python wheel
$PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
