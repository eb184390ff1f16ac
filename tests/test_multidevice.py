"""Multi-device runs: fit then test with 2 processes on the CPU under each strategy we document (``ddp``,
``ddp_spawn``, SLURM) with every logger (csv, tensorboard, W&B offline), each run's test metrics logged once.

The default suite runs the design card's way (``trainer.devices=2``: Lightning's ``auto`` picks DDP with its script
launcher); the spawned and the SLURM runs are slow. What the trainer config composes to: tests/test_configs.py.
"""

from __future__ import annotations

import csv
import pickle
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_overrides
from tests.test_cluster import _final_results, _run_cli, fake_slurm_jobs_killed_after, install_fake_slurm

ALL_LOGGERS = "logger=[csv,tensorboard,wandb]"
TEST_METRICS = ("test/acc", "test/acc_top5", "test/loss")


def _tiny_run(tmp_path: Path, data: Path, output_dir: bool = True) -> list[str]:
    """A 2-batch CIFAR fit and a 1-batch test with the three loggers."""
    keep = [o for o in tiny_overrides(tmp_path, data) if o != "logger=none"]
    if not output_dir:  # a multirun writes each job into its own folder
        keep = [o for o in keep if not o.startswith("paths.output_dir")]
    return [
        "experiment=cifar_wrn40_wrn16",
        "distill=kd",
        *keep,
        "data.download=false",
        "model.teacher.weights=null",
        "data.batch_size=4",  # × 2 ranks: the global batch of 8
        ALL_LOGGERS,
    ]


# --------------------------------------------------------------------------------------------------------------------
# reading what each logger wrote


def _csv_rows(run: Path) -> list[dict[str, str]]:
    [metrics] = sorted(run.glob("csv/*/metrics.csv"))  # one version folder: fit and test in one run
    with metrics.open(newline="") as f:
        return list(csv.DictReader(f))


def _tensorboard_scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    [version] = sorted(run.glob("tensorboard/version_*"))
    scalars: dict[str, list[float]] = {}
    for events in sorted(version.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                number = (
                    value.simple_value if value.WhichOneof("value") == "simple_value" else make_ndarray(value.tensor)
                )
                scalars.setdefault(value.tag, []).append(float(number))
    return scalars


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte W&B header, then the LevelDB log
    format (32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type 1 full / 2 first / 3 middle /
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, record = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def _wandb_key(item: Any) -> str:
    """A history or summary item's key: W&B stores ``train/loss`` as the nested key ``["train", "loss"]``."""
    return item.key or "/".join(item.nested_key)


def _wandb_run(run: Path) -> tuple[Counter, dict[str, float]]:
    """(how many times each key was logged to the history, the final summary) of the run's one offline W&B run."""
    [folder] = sorted(run.glob("wandb/offline-run-*"))
    [path] = sorted(folder.glob("run-*.wandb"))
    history, summary = Counter(), {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.update(_wandb_key(item) for item in record.history.item)
        elif kind == "summary":
            summary.update({_wandb_key(item): item.value_json for item in record.summary.update})
    return history, {k: float(v) for k, v in summary.items() if k in TEST_METRICS}


def assert_test_metrics_logged_once(run: Path) -> float:
    """Each logger of ``run`` (an output folder) holds the fit's metrics and, in the same run, the test's once, with
    the same values in all three. Returns test/acc."""
    rows = _csv_rows(run)
    assert any(r.get("train/loss") for r in rows), "the fit's metrics are missing from metrics.csv"
    [test_row] = [r for r in rows if r.get("test/acc")]
    csv_values = {k: float(test_row[k]) for k in TEST_METRICS}

    scalars = _tensorboard_scalars(run)
    assert scalars.get("train/loss"), "the fit's metrics are missing from the TensorBoard events"
    for key in TEST_METRICS:
        assert len(scalars.get(key, [])) == 1, f"{key} in the TensorBoard events: {scalars.get(key)}"
        assert scalars[key][0] == pytest.approx(csv_values[key])

    history, summary = _wandb_run(run)
    assert history["train/loss"] >= 1, "the fit's metrics are missing from the W&B run"
    for key in TEST_METRICS:
        assert history[key] == 1, f"{key} logged {history[key]} times to the W&B run"
        assert summary[key] == pytest.approx(csv_values[key])
    return csv_values["test/acc"]


# --------------------------------------------------------------------------------------------------------------------
# the default suite: the design card's way, trainer.devices=2 with the default trainer (strategy auto: ddp)


def test_two_devices_fit_then_test_with_every_logger(tmp_path, cifar_root):
    """The default trainer with ``trainer.devices=2`` on the CPU: Lightning's ``auto`` strategy is DDP with its
    script launcher (rank 1 runs the command again). The test after fit runs in the same 2 processes (it used to
    stop with "The launcher can only create subprocesses once")."""
    out = _run_cli([*_tiny_run(tmp_path, cifar_root), "trainer.devices=2"], cwd=tmp_path, timeout=600)
    assert "Traceback" not in out, out[-3000:]
    # what `auto` chose on this CPU, said once (by rank 0)
    assert out.count("trainer: cpu × 2 device(s) × 1 node(s), strategy DDPStrategy, precision 32-true") == 1, out
    # one process group of 2 for fit and test: rank 1 started once, by Lightning
    assert out.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 1, out[-3000:]
    assert out.count("Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2") == 1, out[-3000:]
    assert_test_metrics_logged_once(tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# slow: spawned processes, SLURM


@pytest.mark.slow
def test_ddp_spawn_fit_then_test_with_every_logger(tmp_path, cifar_root):
    """``trainer=ddp_spawn``: fit and test each run in 2 spawned processes; the test's loggers are the main process's,
    which were never told what the fit's wrote (the CSV logger used to fail on its own file: "dict contains fields
    not in fieldnames")."""
    out = _run_cli([*_tiny_run(tmp_path, cifar_root), "trainer=ddp_spawn", "trainer.devices=2"], tmp_path, timeout=600)
    assert "Traceback" not in out, out[-3000:]
    assert out.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2, out[-3000:]  # fit, then test
    assert_test_metrics_logged_once(tmp_path / "out")


@pytest.mark.slow
def test_slurm_job_fit_then_test_with_every_logger(tmp_path, cifar_root):
    """``hydra/launcher=slurm`` with sbatch and srun played here (tests/test_cluster.py): one job of 2 srun tasks
    that Lightning's SLURM environment joins into one DDP run; each task fits then tests."""
    bin_dir, sweep = tmp_path / "bin", tmp_path / "sweep"
    install_fake_slurm(bin_dir)
    args = [
        "-m",
        "hydra/launcher=slurm",
        *_tiny_run(tmp_path, cifar_root, output_dir=False),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.sync_batchnorm=false",
        f"hydra.sweep.dir={sweep}",
    ]
    with fake_slurm_jobs_killed_after(bin_dir):
        _run_cli(args, cwd=tmp_path, timeout=300, path_prefix=bin_dir)
    logs = "\n".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.*")))
    assert "Traceback" not in logs, logs[-3000:]
    assert logs.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 1, logs[-3000:]
    assert _final_results(sweep) == ["success:COMPLETED"] * 2  # both tasks
    assert_test_metrics_logged_once(sweep / "0")


# --------------------------------------------------------------------------------------------------------------------
# the logger state a spawned fit leaves behind, without processes


def test_csv_logger_continues_the_file_a_spawned_fit_wrote(tmp_path):
    """What ``ddp_spawn`` does to a CSV logger, played with pickled copies: the fit's copy writes metrics.csv, the
    test's copy is made from the main process's logger afterwards. Without ``adopt_spawned_logs`` the test's copy
    rewrites the file under its own columns and fails on the fit's rows."""
    from lightning.pytorch.loggers import CSVLogger

    from diffkd.utils.loggers import adopt_spawned_logs, pin_log_dirs

    def run(adopt: bool) -> list[dict[str, str]]:
        logger = CSVLogger(tmp_path / ("adopted" if adopt else "plain"), name="csv")
        logger.log_hyperparams({"lr": 0.1})  # as diffkd.training does, in the main process
        pin_log_dirs([logger])
        fit = pickle.loads(pickle.dumps(logger))
        fit.log_metrics({"train/loss": 2.0}, step=0)
        fit.log_metrics({"val/acc": 0.5}, step=1)
        fit.save()
        if adopt:
            adopt_spawned_logs([logger])
        test = pickle.loads(pickle.dumps(logger))
        test.log_metrics({"test/acc": 0.25}, step=2)
        test.save()
        with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
            return list(csv.DictReader(f))

    with pytest.raises(ValueError, match="dict contains fields not in fieldnames"):
        run(adopt=False)
    rows = run(adopt=True)
    assert [r["train/loss"] for r in rows] == ["2.0", "", ""]
    assert [r["test/acc"] for r in rows] == ["", "", "0.25"]


def test_spawned_copies_of_a_logger_share_its_version_folder(tmp_path):
    """A logger pickled to a spawned process before its version is known picks the next free folder there: the fit's
    process would log to version_0 and the test's to version_1. ``pin_log_dirs`` fixes it in the main process."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from diffkd.utils.loggers import pin_log_dirs

    def log_dirs(pin: bool) -> list[str]:
        logger = TensorBoardLogger(tmp_path / ("pinned" if pin else "plain"), name=None, default_hp_metric=False)
        if pin:
            pin_log_dirs([logger])
        dirs = []
        for _process in ("fit", "test"):
            copy = pickle.loads(pickle.dumps(logger))
            copy.log_metrics({"x": 1.0}, step=0)
            copy.finalize("success")
            dirs.append(Path(copy.log_dir).name)
        return dirs

    assert log_dirs(pin=False) == ["version_0", "version_1"]
    assert log_dirs(pin=True) == ["version_0", "version_0"]
