"""Write a CIFAR-100-shaped data set (random pixels, real python-pickle format) for GPU timing runs on machines
without the real files: python scripts/make_cifar_shaped.py <data_dir> [--n-train 50000 --n-test 10000]."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.fake_data import write_cifar100

parser = argparse.ArgumentParser()
parser.add_argument("data_dir")
parser.add_argument("--n-train", type=int, default=50_000)
parser.add_argument("--n-test", type=int, default=10_000)
args = parser.parse_args()
write_cifar100(args.data_dir, n_train=args.n_train, n_test=args.n_test)
print(
    f"wrote a CIFAR-100-shaped data set ({args.n_train} train / {args.n_test} test, random pixels) to {args.data_dir}"
)
