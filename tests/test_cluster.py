"""Cluster launchers (conf/hydra/launcher/): the SLURM launcher's config and sbatch script, and real multiruns through
hydra-submitit-launcher's local executor (one process per job, as on a cluster), including a requeued job.

hydra-submitit-launcher is a dependency: without it these tests fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _submitit_launcher_installed():
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        import submitit  # noqa: F401
    except ImportError as err:
        pytest.fail(
            f"hydra-submitit-launcher is not installed ({err}); it is a dependency of diffkd (pyproject.toml): "
            "make install, or pip install hydra-submitit-launcher",
            pytrace=False,
        )


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


SLURM_2x8 = [
    "hydra/launcher=slurm",
    "experiment=imagenet_r34_r18",
    "trainer=ddp",
    "trainer.devices=8",
    "trainer.num_nodes=2",
    "hydra.launcher.partition=gpu",
]


def test_slurm_launcher_config_composes():
    cfg = _compose_with_hydra(SLURM_2x8)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # the job's shape follows the trainer: one srun task per device, as Lightning's SLURMEnvironment requires
    raw = OmegaConf.to_container(launcher, resolve=False)
    assert raw["nodes"] == "${trainer.num_nodes}"
    assert raw["tasks_per_node"] == raw["gpus_per_node"] == "${trainer.devices}"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu"
    assert launcher.timeout_min == 1440 and launcher.cpus_per_task == 8
    # requeue: USR2 120 s before the time limit, then the job runs again (and resumes from last.ckpt)
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 20
    assert raw["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2


def test_slurm_launcher_schema_rejects_unknown_keys():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose_with_hydra([*SLURM_2x8, "hydra.launcher.gpus_per_nod=8"])


def test_slurm_sbatch_script_asks_for_one_task_per_gpu(tmp_path, monkeypatch):
    """The sbatch script submitit writes from our config (as hydra-submitit-launcher's ``launch`` builds it)."""
    import hydra.utils
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit's SlurmExecutor refuses to start without srun
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = _compose_with_hydra(
        [
            *SLURM_2x8,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.job.name=train",
            "hydra.launcher.account=lab",
            "+hydra.launcher.additional_parameters.exclusive=true",
            "hydra.launcher.setup=['source /shared/venv/bin/activate']",
        ]
    )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)  # as Hydra does: interpolations resolved
    params = dict(launcher.params)
    assert params["submitit_folder"] == f"{tmp_path / 'sweep'}/.submitit/%j"
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit folder", "uid")
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=1440",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=train",
        "#SBATCH --exclusive",
    ]:
        assert line in script, script
    # the setup lines, then one srun step: Lightning's SLURM environment reads its SLURM_PROCID & co.
    assert script.index("source /shared/venv/bin/activate\n") < script.index("\nsrun ")
    assert "--mem" not in script  # null: the partition's default


def _cluster_section() -> str:
    """The README's "On a cluster" section."""
    match = re.search(r"^## On a cluster\n.*?(?=^## |\Z)", (REPO / "README.md").read_text(), re.S | re.M)
    assert match, "README lost its 'On a cluster' section"
    return match.group(0)


def _documented_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _cluster_section(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if args[:3] == ["python", "-m", "diffkd.train"]:
                commands.append(args[3:])
    return commands


def test_documented_cluster_commands_compose():
    commands = _documented_commands()
    assert len(commands) >= 4
    for args in commands:
        overrides, tokens = [], iter(args)
        for token in tokens:
            if token in ("--cfg", "-c", "--package", "-p"):
                next(tokens)  # and its value
            elif not token.startswith("-"):
                key, _, value = token.partition("=")
                if not set(value) & set("[{'\""):
                    value = value.split(",")[0]  # a sweep's first point
                overrides.append(f"{key}={value}")
        cfg = _compose_with_hydra(overrides)
        launcher = cfg.hydra.launcher._target_.rsplit(".", 1)[-1]
        assert launcher in ("SlurmLauncher", "LocalLauncher"), args
        if launcher == "SlurmLauncher":
            assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices == cfg.hydra.launcher.gpus_per_node
            assert cfg.hydra.launcher.nodes == cfg.trainer.num_nodes


def test_local_launcher_config_composes():
    cfg = _compose_with_hydra(["hydra/launcher=local"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert launcher.tasks_per_node == 1 and launcher.gpus_per_node is None


# --------------------------------------------------------------------------------------------------------------------
# real multiruns through submitit's local executor


def _run_cli(args: list[str], cwd: Path, timeout: int, path_prefix: Path | None = None) -> str:
    """``python -m diffkd.train *args`` in its own process group; fails the test unless it exits 0. Returns its
    stdout and stderr."""
    # this tree's diffkd (src/) and tests (the preemption callback below), whatever is installed
    # a DDP run earlier in this pytest process leaves MASTER_PORT (and friends) in os.environ: inherited, every
    # array job would take that one port instead of its own (SLURM_JOB_ID's) and the jobs' ranks would cross-join
    ddp_vars = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    # and an in-process W&B run of an earlier test leaves WANDB_SERVICE: the child would log through the pytest
    # process's W&B service, which writes the run file after the child has exited (the test reads it half-written)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ddp_vars and not k.startswith("WANDB_SERVICE")},
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    # its own process group: on a timeout, kill the launcher and the jobs it started
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffkd.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"multirun still running after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # jobs left behind (none when it ends normally)
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out + err


def _tiny_multirun(tmp_path: Path, data: Path) -> list[str]:
    # in a multirun each job writes to its own folder, so paths.output_dir keeps its default
    tiny = [o for o in tiny_overrides(tmp_path, data) if not o.startswith("paths.output_dir")]
    return [*tiny, "data.download=false", "model.teacher.weights=null", "logger=csv", "test=false"]


def _job_folders(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _submitit_log(sweep: Path) -> str:
    """What submitit itself logged in the jobs' processes (each line once: its stdout copy)."""
    lines = (line for p in sorted((sweep / ".submitit").glob("*/*_log.out")) for line in p.read_text().splitlines())
    return "\n".join(line for line in lines if line.startswith("submitit "))


def _final_results(sweep: Path) -> list[str]:
    """The state of each job task's result as submitit keeps it (the last attempt's), as ``success:COMPLETED``."""
    from submitit.core.utils import pickle_load

    results = [pickle_load(p) for p in sorted((sweep / ".submitit").glob("*/*_result.pkl"))]
    return [f"{kind}:{getattr(ret, 'status', ret).name if kind == 'success' else ret}" for kind, ret in results]


def test_local_launcher_runs_two_jobs(tmp_path, cifar_root):
    sweep = tmp_path / "sweep"
    _run_cli(
        [
            "-m",
            "hydra/launcher=local",
            "experiment=cifar_wrn40_wrn16",
            "distill=kd,none",
            *_tiny_multirun(tmp_path, cifar_root),
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert _job_folders(sweep) == ["0", "1"]
    for job, distill in [("0", "kd"), ("1", "none")]:
        assert f"distill={distill}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2  # max_epochs=1 × limit_train_batches=2
        assert (sweep / job / "csv" / "version_0" / "metrics.csv").is_file()
    # each job ran in a process of its own, started by submitit, and finished
    assert _final_results(sweep) == ["success:COMPLETED"] * 2


# --------------------------------------------------------------------------------------------------------------------
# preemption: the job is requeued, runs again in the same folder and resumes from its last.ckpt


class PreemptOnce(L.Callback):
    """Test helper (instantiated inside the job from ``callbacks.preempt``): at the start of epoch ``at_epoch`` of the
    first attempt, every rank sends itself the signal SLURM sends all tasks of a job before preemption or its time
    limit; ``{marker}.rank<r>`` records that it did."""

    def __init__(self, at_epoch: int, marker: str) -> None:
        self.at_epoch, self.marker = at_epoch, marker

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        marker = Path(f"{self.marker}.rank{trainer.global_rank}")
        if trainer.current_epoch == self.at_epoch and not marker.exists():
            marker.touch()
            import submitit

            trainer.strategy.barrier("preempt")  # all ranks at once, as SLURM signals them
            os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())


def _preempt_job_0(tmp_path: Path) -> list[str]:
    """A second sweep axis of one value per job: job 0 is preempted at the start of epoch 1, job 1 never."""
    return [
        "+callbacks.preempt._target_=tests.test_cluster.PreemptOnce",
        "+callbacks.preempt.at_epoch=1,99",
        f"+callbacks.preempt.marker={tmp_path / 'preempted'}",
    ]


def _epochs_logged(version: Path) -> set[int]:
    with open(version / "metrics.csv") as f:
        return {int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch")}


def _assert_job_0_resumed_exactly(sweep: Path, epochs: int, steps_per_epoch: int) -> None:
    """Job 0's first attempt logged epoch 0 (csv/version_0); the second resumed at epoch 1 (version_1) and ended with
    the uninterrupted job 1's step count and bit-identical weights."""
    job0, job1 = sweep / "0", sweep / "1"
    assert _epochs_logged(job0 / "csv" / "version_0") == {0}
    assert _epochs_logged(job0 / "csv" / "version_1") == set(range(1, epochs))
    assert _epochs_logged(job1 / "csv" / "version_0") == set(range(epochs))
    assert not (job1 / "csv" / "version_1").exists()
    a = torch.load(job0 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(job1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == steps_per_epoch * epochs
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=0, atol=0, msg=f"{key} differs after the requeue")


@pytest.mark.slow
def test_local_launcher_requeued_job_resumes_from_its_last_ckpt(tmp_path, cifar_root):
    """Job 0 is signalled at the start of epoch 1: submitit's local executor runs it again, in the same folder (the
    sweep folder's timestamp included), and it resumes from its own checkpoints/last.ckpt of epoch 0. Job 1 runs
    uninterrupted."""
    epochs = 3
    _run_cli(
        [
            "-m",
            "hydra/launcher=local",
            "experiment=cifar_wrn40_wrn16",
            "distill=kd",
            *_tiny_multirun(tmp_path, cifar_root),
            f"trainer.max_epochs={epochs}",
            *_preempt_job_0(tmp_path),
        ],
        cwd=tmp_path,
        timeout=900,
    )
    # the default sweep folder, <log_dir>/<task_name>/multiruns/<launch time>: one, the requeue included
    [sweep] = (tmp_path / "logs" / "cifar_wrn40_wrn16" / "multiruns").iterdir()
    logs = _submitit_log(sweep)
    assert logs.count("this job is preempted") == 1 and logs.count("Requeued job") == 1
    assert _final_results(sweep) == ["success:COMPLETED"] * 2
    _assert_job_0_resumed_exactly(sweep, epochs, steps_per_epoch=2)


# --------------------------------------------------------------------------------------------------------------------
# the SLURM launcher end to end, with sbatch, srun and scontrol played on this machine

_FAKE_SBATCH = """#!{python}
# sbatch on one machine: each array task's batch script runs in the background under _slurm_job, with the job's
# SLURM_* variables; prints the job id as sbatch does
import os, re, subprocess, sys

script = sys.argv[-1]
opts = dict(re.findall(r"^#SBATCH --([\\w-]+)=?(.*)$", open(script).read(), re.M))
job = str(os.getpid())
nodes, per_node = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
assert nodes == 1, "this sbatch plays one node"
first, last = (int(x) for x in opts["array"].split("%")[0].split("-")) if "array" in opts else (0, 0)
for index in range(first, last + 1):
    # an array task has a job id of its own; a single job, the one sbatch prints
    job_id = str(int(job) + 1 + index) if "array" in opts else job
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NAME=opts["job-name"],
               SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node),
               SLURM_NTASKS=str(nodes * per_node), SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost")
    name = env["SLURM_JOB_ID"]
    if "array" in opts:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(index))
        name = f"{{job}}_{{index}}"
    job_runner = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "_slurm_job")
    subprocess.Popen([job_runner, script, name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job}}", flush=True)
"""

_FAKE_JOB = """#!{python}
# one SLURM job: runs the batch script; `scontrol requeue <job>` makes it do what SLURM does (SIGTERM to every
# process of the job, SIGKILL after KillWait, run the batch script again with SLURM_RESTART_COUNT + 1)
import os, signal, subprocess, sys, time

script, job = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(sys.argv[0]))
flag = os.path.join(here, "requeue_" + job)
for restarts in range(4):
    env = dict(os.environ, SLURM_RESTART_COUNT=str(restarts))
    proc = subprocess.Popen(["bash", script], env=env, start_new_session=True)
    with open(os.path.join(here, "job_groups"), "a") as f:
        f.write(f"{{proc.pid}}\\n")
    while proc.poll() is None and not os.path.exists(flag):
        time.sleep(0.2)
    if not os.path.exists(flag):
        break
    os.remove(flag)
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(wait)
    proc.wait()
"""

_FAKE_SRUN = """#!{python}
# srun on one machine: SLURM_NTASKS copies of the command, each with its SLURM_PROCID / SLURM_LOCALID
import os, subprocess, sys

args, files = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    if args[0] in ("--output", "--error"):
        files[args[0]], args = args[1], args[2:]
    else:
        args = args[1:]


def name(pattern, task):
    for key, value in (("%A", os.environ.get("SLURM_ARRAY_JOB_ID", "")), ("%a", os.environ.get("SLURM_ARRAY_TASK_ID", "")),
                       ("%j", os.environ["SLURM_JOB_ID"]), ("%t", str(task))):
        pattern = pattern.replace(key, value)
    return pattern


tasks = []
for task in range(int(os.environ["SLURM_NTASKS"])):
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NODEID="0", SLURM_STEP_ID="0")
    out = open(name(files["--output"], task), "a")
    err = open(name(files["--error"], task), "a") if "--error" in files else subprocess.STDOUT
    tasks.append(subprocess.Popen(args, env=env, stdout=out, stderr=err))
sys.exit(max(t.wait() for t in tasks))
"""

_FAKE_SCONTROL = """#!/bin/sh
# scontrol requeue <job>: tells that job's _slurm_job
[ "$1" = requeue ] && touch "$(dirname "$0")/requeue_$2"
"""


def install_fake_slurm(bin_dir: Path) -> None:
    """Write sbatch, srun, scontrol and sacct that play SLURM on this machine into ``bin_dir`` (put it first on
    PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    fakes = {"sbatch": _FAKE_SBATCH, "_slurm_job": _FAKE_JOB, "srun": _FAKE_SRUN, "scontrol": _FAKE_SCONTROL}
    for name, text in {**fakes, "sacct": "#!/bin/sh\n"}.items():
        (bin_dir / name).write_text(text.format(python=sys.executable) if text.startswith("#!{") else text)
        (bin_dir / name).chmod(0o755)


@contextlib.contextmanager
def fake_slurm_jobs_killed_after(bin_dir: Path) -> Iterator[None]:
    """On leaving, kill the process groups of the jobs the fake sbatch started, should any outlive the launcher."""
    try:
        yield
    finally:
        groups = (bin_dir / "job_groups").read_text().split() if (bin_dir / "job_groups").exists() else []
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(group), signal.SIGKILL)


@pytest.mark.slow
def test_slurm_launcher_array_of_two_ddp_jobs_one_preempted(tmp_path, cifar_root):
    """hydra/launcher=slurm with sbatch/srun/scontrol played here: one array job of 2 sweep points, each 2 srun tasks
    that Lightning's SLURM environment joins into one DDP run (CPU, gloo) in the job's own folder. Job 0's tasks get
    the preemption signal at the start of epoch 1: rank 0 requeues the job (scontrol), the job runs again and both
    ranks resume from its last.ckpt; it ends identical to the uninterrupted job 1."""
    bin_dir = tmp_path / "bin"
    install_fake_slurm(bin_dir)
    sweep, epochs = tmp_path / "sweep", 3
    with fake_slurm_jobs_killed_after(bin_dir):
        _run_cli(
            [
                "-m",
                "hydra/launcher=slurm",
                "experiment=cifar_wrn40_wrn16",
                "distill=kd",
                *_tiny_multirun(tmp_path, cifar_root),
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.sync_batchnorm=false",
                "trainer.precision=32-true",
                "trainer.benchmark=null",
                "data.batch_size=4",  # × 2 ranks: the global batch of 8
                f"trainer.max_epochs={epochs}",
                *_preempt_job_0(tmp_path),
                f"hydra.sweep.dir={sweep}",
            ],
            cwd=tmp_path,
            timeout=900,
            path_prefix=bin_dir,
        )
    [script] = {p.read_text() for p in (sweep / ".submitit").glob("*/*_submission.sh")}
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --ntasks-per-node=2" in script
    assert _job_folders(sweep) == ["0", "1"]
    logs = "\n".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.*")))
    # 3 DDP runs (job 0 twice, job 1 once) of 2 processes each, ranks from SLURM_PROCID (Lightning started none)
    assert logs.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 3, logs[-3000:]
    events = _submitit_log(sweep)
    assert events.count("this job is preempted") == 2  # both ranks of job 0 got the signal
    assert events.count("Not checkpointing nor requeuing since I am a slave") == 1  # rank 1 left it to rank 0
    assert events.count("Requeued job") == 1
    assert _final_results(sweep) == ["success:COMPLETED"] * 4  # 2 jobs × 2 tasks, job 0's of its second attempt
    assert not (tmp_path / "logs").exists()  # no run folders outside the sweep
    _assert_job_0_resumed_exactly(sweep, epochs, steps_per_epoch=2)
