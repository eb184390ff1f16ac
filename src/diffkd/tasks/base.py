"""``DistillationModule``: the LightningModule every task builds on.

It owns the frozen teacher, the student and the distiller (whose heads are registered children, so the optimizer,
DDP, checkpoints and EMA include them), runs one training step as

    batch → student forward (taps keep the named values) → teacher forward (no grad, eval mode, taps)
          → distiller terms → task_weight · Σ_k w_k · task loss k + Σ terms → backward

and leaves to a task subclass only the *forward contract* — how a batch reaches each model and what comes back:

- ``student_inputs(batch)`` → ``(args, kwargs)`` of the student's training call (a detector:
  ``(images, targets)``), and ``teacher_inputs(batch)`` for the teacher's (default: the same); or, where the
  teacher needs something the student's call produced (a detector's resized batch), ``teacher_forward(batch)``;
- ``task_losses(student_output, batch)`` → ``{name: loss}`` (a detector's own loss dict; classification
  ``{"ce": ...}``), each logged as ``train/loss/<name>``, weighted by ``task_weights`` and guarded;
- ``distill_inputs(batch)`` → what the distances may declare they need (``labels``, ``valid_mask``, ...);
- its evaluation metrics: ``metrics()`` → ``{name: torchmetrics.Metric}`` (fresh ones; a ``loss`` among them is the
  validation loss the contract checks), ``best_metric``/``best_mode`` (the metric whose best value so far is logged
  as ``val/<name>_best``), ``update_metrics(metrics, batch)`` (runs the student on an evaluation batch) and, where a
  metric's value is not what is logged, ``compute_metrics(metrics)`` (detection: one mAP → ``map``, ``map_50``, ...);
  ``report_metrics`` prints what a task wants printed after an epoch (segmentation's per-class table); and for the
  validation contract ``watched_outputs()`` (the modules whose outputs must stay finite; default the student).

The evaluation contract, the same for every task: the base builds one set of the task's metrics per evaluation split
(``val``, ``test``; registered children ``val_<name>``/``test_<name>``, so they move with the module and synchronise
over the ranks) and the best-so-far tracker ``val_<best_metric>_best``; ``validation_step``/``test_step`` update
them, every epoch ends with their values logged as ``<split>/<name>`` (``best_metric`` in the progress bar, then
``val/<best_metric>_best`` outside the sanity check) and the metrics reset.

The validation contract, the same for every task: in a fit, every validation epoch checks the task's validation
loss and the watched outputs for NaN/inf *before* its metrics are logged and before any checkpoint is written, and
every checkpoint (best, periodic, ``last.ckpt``) is written only from weights that are finite, whose losses so far
were finite and whose outputs on the dry run's batch are finite; "the last good checkpoint" named in the stop
message is the newest such file on disk.

Memory format (``channels_last``), the teacher's dtype and ``torch.compile`` apply to whatever the task passes
(every 4-D float tensor of the inputs, at any depth). The dry run that sizes the heads runs this same contract on a
real batch of the datamodule (``example_batch``). No tensor leaves the device inside the step: the non-finite guard
(:mod:`diffkd.tasks.nonfinite`) accumulates flags on the device.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MaxMetric, Metric, MinMetric

from diffkd.data.protocol import DistillDataModule, require_protocol
from diffkd.distill import Distiller, FeatureTaps, dry_run
from diffkd.distill.taps import AUTO_FEATURE, DryRun, TapAddress
from diffkd.method.profile import format_count
from diffkd.optim.lr_scaling import global_batch_size, scale_learning_rate
from diffkd.tasks.nonfinite import ADVICE, NonFiniteGuard, NonFiniteLossError, OutputWatch
from diffkd.utils.seeding import lightning_seed, seed_step

__all__ = ["DistillationModule", "NonFiniteLossError", "map_tensors"]

log = logging.getLogger(__name__)

COMPILE_PARTS = ("student", "teacher", "heads")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EVAL_SPLITS = ("val", "test")  # each gets its own set of the task's metrics


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor of a nested structure (tuples, lists, dicts; other leaves kept)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())  # keeps OrderedDict
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuples
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _compile_parts(value: bool | str | Iterable[str] | None) -> tuple[str, ...]:
    """``model.compile`` as a tuple of parts: True → all three, False/None → none, a name or a list of names."""
    if value is None or value is False:
        return ()
    if value is True:
        return COMPILE_PARTS
    names = [value] if isinstance(value, str) else list(value)
    bad = [n for n in names if n not in COMPILE_PARTS]
    if bad:
        raise ValueError(
            f"model.compile: unknown part(s) {bad}; use true, false, one of {list(COMPILE_PARTS)} or a list of them"
        )
    return tuple(n for n in COMPILE_PARTS if n in names)


class DistillationModule(L.LightningModule):
    """Teacher + student + distiller, task-agnostic.

    Args:
        student: the network being trained.
        distiller: the distillation losses (``diffkd.distill.Distiller``); no points means plain training.
        teacher: the frozen teacher (``None`` for plain training).
        optimizer: a partial taking ``params`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.05)``).
        scheduler: a partial taking the optimizer, or ``None``.
        scheduler_interval: ``epoch`` or ``step``.
        no_decay_bias_norm: weight decay 0 for biases and normalisation weights (all 1-D parameters).
        bias_lr_mult, bias_decay_mult: the learning rate and weight decay of every bias outside a normalisation
            layer, times these (MMDetection's ``paramwise_cfg``; its FCOS configs: 2 and 0).
        lr_base_batch_size: when set, the learning rate scales linearly with the global batch:
            ``lr × (batch_size × devices × nodes × accumulate) / lr_base_batch_size``.
        input_size: (C, H, W) of a synthetic dry-run batch, for use without a datamodule; by default the dry run
            uses a real batch of the datamodule (``example_batch``).
        task_weights: ``{loss name: weight}`` of the task's loss components (unnamed ones weigh 1).
        channels_last: run student and teacher in channels_last memory format.
        compile: which parts to ``torch.compile`` — ``True`` (student, teacher and DiffKD heads), ``False``, one of
            ``"student"``, ``"teacher"``, ``"heads"`` or a list of them. A graph that fails falls back to eager with
            a message. The frozen teacher is compiled with inductor's *freezing* (its weights become constants:
            BatchNorm folded into the convolutions, weights pre-packed), scoped to the teacher's calls; on the CPU
            ``"teacher"`` alone is the fastest choice (BENCHMARKS.md).
        compile_mode: ``torch.compile`` mode for every compiled part (``None``: the default;
            ``"reduce-overhead"``: CUDA graphs, which pay off for CIFAR-sized batches on a GPU; ``"max-autotune"``).
        teacher_dtype: ``bfloat16``/``float16`` to run the teacher in that dtype (its outputs are cast back).
        nonfinite_check_every: read the device-side non-finite flags every N steps (1 = every step).
        reseed_every_step: seed the global generators from ``(seed, epoch, batch index, rank)`` before every
            training batch, so the DiffKD noise and dropout of a step do not depend on what ran before it — a
            resumed run draws what the uninterrupted one drew, on every rank.
    """

    best_metric: str | None = None  # logged as val/<name>_best, its best so far (see metrics())
    best_mode: Literal["max", "min"] = "max"

    def __init__(
        self,
        student: nn.Module,
        distiller: Distiller,
        teacher: nn.Module | None = None,
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[[Optimizer], Any] | None = None,
        scheduler_interval: str = "epoch",
        no_decay_bias_norm: bool = False,
        bias_lr_mult: float = 1.0,
        bias_decay_mult: float = 1.0,
        lr_base_batch_size: int | None = None,
        input_size: Iterable[int] | None = None,
        task_weights: Mapping[str, float] | None = None,
        channels_last: bool = False,
        compile: bool | str | Iterable[str] = False,
        compile_mode: str | None = None,
        teacher_dtype: str | None = None,
        nonfinite_check_every: int = 50,
        reseed_every_step: bool = True,
    ) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        if distiller.needs_teacher and teacher is None:
            raise ValueError(f"distiller points {sorted(distiller.specs)} need a teacher (model.teacher is null)")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.scheduler_interval = scheduler_interval
        self.no_decay_bias_norm = no_decay_bias_norm
        self.bias_lr_mult = float(bias_lr_mult)
        self.bias_decay_mult = float(bias_decay_mult)
        self.lr_base_batch_size = lr_base_batch_size
        self.input_size = tuple(input_size) if input_size is not None else None
        self.task_weights = {str(k): float(v) for k, v in (task_weights or {}).items()}
        self.channels_last = channels_last
        self.compile_parts = _compile_parts(compile)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode={compile_mode!r}; choose from {list(COMPILE_MODES)}")
        self.compile_mode = compile_mode
        self.teacher_dtype = getattr(torch, teacher_dtype) if teacher_dtype else None
        self.nonfinite = NonFiniteGuard(nonfinite_check_every)
        self.output_watch = OutputWatch()
        self._probe_batch: Any = None  # the dry run's batch: a checkpoint's weights must give finite outputs on it
        self.reseed_every_step = reseed_every_step
        self.run_config: dict[str, Any] | None = None  # the composed Hydra config, stored in checkpoints
        self.resume_changes: list[Any] = []  # diffkd.runs.Change of a resume_changes=apply resume
        self.student_taps: FeatureTaps | None = None
        self.teacher_taps: FeatureTaps | None = None
        self._task_loss_names: set[str] | None = None
        self._teacher_cast = False  # inputs go to teacher_dtype once the teacher is in it (after the dry run)

    @property
    def nonfinite_check_every(self) -> int:
        return self.nonfinite.check_every

    # ------------------------------------------------------------------ the forward contract (a task provides)
    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the student's training call for ``batch`` (classification: ``((images,), {})``)."""
        raise NotImplementedError

    def teacher_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the teacher's call (default: the student's, so both see the same batch)."""
        return self.student_inputs(batch)

    def task_losses(self, student_output: Any, batch: Any) -> dict[str, Tensor]:
        """The task's loss components ``{name: scalar}`` (classification ``{"ce": ...}``; a torchvision detector's
        training output is already such a dict)."""
        raise NotImplementedError

    def distill_inputs(self, batch: Any) -> dict[str, Any]:
        """What distances may declare they need from the batch: ``labels``, ``valid_mask``, ``boxes``, ..."""
        return {}

    def prepare_batch(self, batch: Any) -> Any:
        """Training-batch transform on the device (e.g. Mixup/CutMix)."""
        return batch

    def synthetic_batch(self, input_size: tuple[int, ...]) -> Any:
        """A random batch of two samples of ``input_size``, for a dry run without a datamodule."""
        raise NotImplementedError(f"{type(self).__name__} needs a datamodule with example_batch() for its dry run")

    def on_dry_run(self, student_output: Any) -> None:
        """Task hook: what the student's dry-run output tells (e.g. the number of classes)."""

    def metrics(self) -> dict[str, Metric]:
        """The task's evaluation metrics, fresh: ``{name: metric}`` (called once per split, after the dry run, so
        they may read e.g. ``num_classes``). A ``loss`` metric is the validation loss the validation contract
        checks. ``{}``: the task evaluates nothing."""
        return {}

    def update_metrics(self, metrics: Mapping[str, Metric], batch: Any) -> None:
        """Run the student on an evaluation ``batch`` and update ``metrics`` (one split's set of :meth:`metrics`)."""
        raise NotImplementedError(f"{type(self).__name__} declares metrics() but no update_metrics(metrics, batch)")

    def compute_metrics(self, metrics: Mapping[str, Metric]) -> dict[str, Tensor]:
        """The epoch's values ``{name: scalar}``, each logged as ``<split>/<name>`` (default: every metric's
        ``compute()``, synchronised over the ranks). Must hold ``best_metric``."""
        return {name: metric.compute() for name, metric in metrics.items()}

    def report_metrics(self, split: str, metrics: Mapping[str, Metric], values: Mapping[str, Tensor]) -> None:
        """Task hook after an evaluation epoch's values were logged, outside the sanity check (e.g. a table)."""

    def validation_values(self) -> dict[str, Tensor]:
        """The finished validation epoch's values that are finite in a healthy run: the ``loss`` metric, as
        ``{"val/loss": ...}`` (synchronised over the ranks) — NaN logits read as class 0 would give an accuracy of
        nothing; ``{}`` for a task without a validation loss (its outputs are watched)."""
        loss = self.split_metrics("val").get("loss")
        return {"val/loss": loss.compute()} if loss is not None else {}

    def watched_outputs(self) -> dict[str, nn.Module]:
        """``{name: module}`` whose outputs must be finite in validation and on the probe batch (default: the
        student's own output)."""
        return {"student": self.student}

    def probe_forward(self, batch: Any) -> None:
        """The student's evaluation call on ``batch`` (eval mode, no grad) whose watched outputs are checked before
        a checkpoint is written."""
        args, kwargs = self.to_memory_format(self.student_inputs(batch))
        self.student(*args, **kwargs)

    def log_validation_epoch(self) -> None:
        """Log the validation epoch's metrics (after the validation contract's checks passed): :meth:`log_split`."""
        self.log_split("val")

    # ------------------------------------------------------------------ calling the models
    def to_memory_format(self, obj: Any) -> Any:
        """``obj`` with every 4-D floating tensor in channels_last when ``channels_last`` is on."""
        if not self.channels_last:
            return obj

        def convert(x: Tensor) -> Tensor:
            if x.dim() == 4 and x.is_floating_point():
                return x.contiguous(memory_format=torch.channels_last)
            return x

        return map_tensors(obj, convert)

    def student_forward(self, batch: Any) -> Any:
        """The student's training call on ``batch`` (its output goes to :meth:`task_losses`)."""
        args, kwargs = self.to_memory_format(self.student_inputs(batch))
        return self.student(*args, **kwargs)

    def teacher_forward(self, batch: Any) -> Any:
        """The teacher's call on ``batch`` (after the student's; under no_grad/inference mode, in eval mode)."""
        args, kwargs = self.to_memory_format(self.teacher_inputs(batch))
        if self._teacher_cast:
            dtype = self.teacher_dtype
            args, kwargs = map_tensors((args, kwargs), lambda x: x.to(dtype) if x.is_floating_point() else x)
        return self.teacher(*args, **kwargs)

    def teacher_features(self, batch: Any) -> dict[str, Tensor]:
        """Teacher forward keeping only the tapped values: no autograd graph, eval mode.

        With ``teacher_dtype`` (the fast path) it runs under ``torch.inference_mode`` in that dtype and the taps
        are cast back to fp32 outside it — the cast is needed anyway and yields ordinary tensors the losses may
        save for backward. In fp32 it runs under ``no_grad``: inference tensors could not be saved by the
        distances, and copying them out would cost more than inference mode saves.
        """
        assert self.teacher_taps is not None, "setup() has not run"
        if self.teacher_dtype is None:
            with torch.no_grad(), self._teacher_compile_context():
                return self.teacher_taps.collect(self.teacher_forward(batch))[1]
        with torch.inference_mode(), self._teacher_compile_context():
            feats = self.teacher_taps.collect(self.teacher_forward(batch))[1]
        return map_tensors(feats, lambda x: x.float() if x.is_floating_point() else x.clone())

    # ------------------------------------------------------------------ setup
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm keeps its statistics, dropout stays off
        return self

    def datamodule(self) -> Any:
        """The attached trainer's datamodule, or ``None``."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def example_batch(self, split: str = "train") -> Any:
        """The dry run's batch, on the module's device: ``input_size`` when set, else two real samples of
        ``split`` from the datamodule (``example_batch(2, split)``; no random state is consumed either way)."""
        if self.input_size is not None:
            with torch.random.fork_rng(devices=[]):
                return move_data_to_device(self.synthetic_batch(self.input_size), self.device)
        dm = self.datamodule()
        if dm is None:
            raise ValueError(
                "cannot infer shapes without data: attach a datamodule (trainer.fit(module, datamodule=...)), "
                "call module.build(batch) yourself, or set model.input_size=[C, H, W]"
            )
        require_protocol(dm, DistillDataModule, "the dry run")
        try:
            batch = dm.example_batch(2, split=split)
        except ValueError as err:  # a split of one sample (evaluating one image): the dry run runs in eval mode
            if "example_batch" not in str(err):
                raise
            batch = dm.example_batch(1, split=split)
        return move_data_to_device(batch, self.device)

    def setup(self, stage: str) -> None:
        indexed = stage == "fit" and self._prepare_sample_index()  # also for a fit after a validate/test
        if self.student_taps is not None:
            return
        example = self.example_batch("train" if stage == "fit" else "val")
        if indexed:
            example = self.split_sample_index(example)[0]
        self.build(example)
        if stage == "fit":
            self._probe_batch = example

    def _prepare_sample_index(self) -> bool:
        """For a distance that needs ``sample_index`` (CRD): the datamodule appends each training sample's position
        to its batches from now on; every distance gets the data facts it declares (``num_train_samples``,
        ``train_labels``) before the heads are built. True when training batches carry the index."""
        needing = self.distiller.points_needing("sample_index")
        facts = self.distiller.data_facts_needed()
        if not needing and not facts:
            return False
        points = {**needing, **{p: self.distiller.specs[p].distance["name"] for p in facts}}
        methods = ", ".join(f"{d} (point {p!r})" for p, d in points.items())
        dm = self.datamodule()
        dm_name = type(dm).__name__ if dm is not None else "no datamodule"
        if dm is None or not callable(getattr(dm, "enable_sample_index", None)):
            raise TypeError(
                f"distance {methods} needs each training sample's index in the training set, but {dm_name} cannot "
                "give them (no enable_sample_index()): train with a datamodule of diffkd.data (each of them gives "
                "sample indices), or give yours enable_sample_index(), num_train_samples() and train_labels() "
                "(diffkd.data.sample_index.SampleIndexCapability)"
            )
        if needing:
            try:
                dm.enable_sample_index()
            except TypeError as err:
                raise TypeError(f"distance {methods} needs sample indices: {err}") from None
        values: dict[str, Any] = {}
        for name in dict.fromkeys(n for names in facts.values() for n in names):
            getter = getattr(dm, name, None)
            if not callable(getter):
                raise TypeError(f"distance {methods} reads {name}() from the datamodule; {dm_name} has no {name}()")
            try:
                values[name] = getter()
            except TypeError as err:
                raise TypeError(f"distance {methods} reads {name}() from {dm_name}: {err}") from None
        self.distiller.bind_data(values)
        return bool(needing)

    def split_sample_index(self, batch: Any) -> tuple[Any, Tensor | None]:
        """``(batch, index)``: a training batch of a datamodule with ``enable_sample_index()`` on is
        ``(*batch, index (B,) int64)``; ``(batch, None)`` when no distance needs the index."""
        if not self.distiller.points_needing("sample_index"):
            return batch, None
        if not isinstance(batch, (tuple, list)) or not isinstance(batch[-1], Tensor) or batch[-1].dim() != 1:
            raise TypeError(
                f"a distance needs the sample index, but the training batch does not end with one (B,) tensor of "
                f"sample indices (got {type(batch).__name__}); the datamodule's enable_sample_index() adds it"
            )
        return tuple(batch[:-1]), batch[-1]

    def build(self, example: Any) -> None:
        """Infer shapes and layouts, create the heads and the taps (called once, from ``setup`` or by hand).

        Args:
            example: a batch in the task's format (classification also takes a bare image tensor), on the
                module's device. The student and then the teacher run on it once, in eval mode under no_grad,
                leaving BatchNorm statistics and random states as they were.
        """
        distiller = self.distiller
        s_hooks, t_hooks = self._dry_run_paths()
        s_run = dry_run(self.student, lambda: self.student_forward(example), s_hooks, "student")
        self.on_dry_run(s_run.output)
        t_run: DryRun | None = None
        if distiller.needs_teacher:
            with self._teacher_compile_context():
                t_run = dry_run(self.teacher, lambda: self.teacher_forward(example), t_hooks, "teacher")
        points = distiller.build(self.student, self.teacher, s_run, t_run)
        profiles = distiller.profile() if points else {}
        for name, info in points.items():
            cost = profiles.get(name)
            log.info(
                "distill point %-8s student %-14r %s teacher %-14r %s head %-8s distance %s  head params %s  "
                "MACs/sample %s",
                name,
                info["student"],
                tuple(info["student_shape"]),
                info["teacher"],
                tuple(info["teacher_shape"]),
                info["head"] + (" (shared)" if info["shared_head"] else ""),
                info["distance"]["name"],
                f"{info['params']:,}",
                format_count(cost.macs) if cost is not None else 0,
            )
        s_paths, t_paths = distiller.tap_paths()
        self.student_taps = FeatureTaps(self.student, ["", *s_paths], _multi_call(s_run))
        if distiller.needs_teacher:
            assert t_run is not None
            self.teacher_taps = FeatureTaps(self.teacher, ["", *t_paths], _multi_call(t_run))
        if self.channels_last:
            for m in (self.student, self.teacher, self.distiller):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        if self.teacher_dtype is not None and self.teacher is not None:
            self.teacher.to(self.teacher_dtype)
            self._teacher_cast = True
        if self.compile_parts:
            self._compile()
        self.build_metrics()

    def _dry_run_paths(self) -> tuple[list[str] | None, list[str] | None]:
        """Module paths the dry runs record: every module where a point asks for ``@feature``."""
        specs = self.distiller.specs.values()
        out = []
        for side in ("student", "teacher"):
            addresses = [a for s in specs for a in s.tap_addresses(side)]
            if AUTO_FEATURE in addresses:
                out.append(None)
            else:
                out.append([TapAddress.parse(a).path for a in addresses if TapAddress.parse(a).path])
        return out[0], out[1]

    def _compile(self) -> None:
        import torch._dynamo

        # a graph that fails to compile later, at its first call, runs eagerly instead of stopping the run
        torch._dynamo.config.suppress_errors = True
        # graphs cached for another instance of the same class (an earlier run in this process, e.g. the demo's
        # or the benchmark's) can be reused with that instance's hooks: start from an empty cache
        torch._dynamo.reset()
        log.info(
            "torch.compile (mode %s): %s (failures fall back to eager with a warning)",
            self.compile_mode or "default",
            ", ".join(self.compile_parts),
        )
        kwargs = {"mode": self.compile_mode} if self.compile_mode else {}
        try:
            if "student" in self.compile_parts:
                self.student.compile(**kwargs)
            if "teacher" in self.compile_parts and self.teacher is not None:
                for part in self.teacher_compile_targets():
                    part.compile(**kwargs)
            if "heads" in self.compile_parts:
                # the heads share one forward: without dynamic=False the second head's other channel count would
                # turn the graph dynamic ("automatic dynamic shapes"), slower and worse for CUDA graphs
                for head in self.distiller.heads.values():
                    head.compile(dynamic=False, **kwargs)
        except Exception as err:
            log.warning("torch.compile failed (%s: %s); training continues in eager mode", type(err).__name__, err)

    def teacher_compile_targets(self) -> list[nn.Module]:
        """The teacher modules ``model.compile=teacher`` compiles: those the task calls (``torch.compile`` of a
        module compiles its ``__call__`` only). The whole teacher by default."""
        return [self.teacher] if self.teacher is not None else []

    def _teacher_compile_context(self) -> contextlib.AbstractContextManager:
        """Inductor freezing while the compiled teacher runs (its graphs compile lazily, at their first call).

        Scoped to the teacher: a frozen student graph (e.g. validation's) would keep stale weights as constants.
        """
        if "teacher" not in self.compile_parts:
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch(freezing=True)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.compile_parts and self.compile_mode in ("reduce-overhead", "max-autotune"):
            # CUDA-graph outputs of the previous step may be overwritten from here on (one replay per step)
            torch.compiler.cudagraph_mark_step_begin()
        assert self.student_taps is not None, "setup() has not run"
        batch, sample_index = self.split_sample_index(batch)
        batch = self.prepare_batch(batch)
        try:
            s_out, s_feats = self.student_taps.collect(self.student_forward(batch))
        except ValueError as err:
            if "Expected more than 1 value per channel when training" not in str(err):
                raise
            raise ValueError(
                f"{err}: the student's BatchNorm saw one value per channel, i.e. a training batch of one sample on "
                "this device reached a layer that pools away the spatial size (e.g. the image-pooling branch of "
                "DeepLabV3's ASPP). Use at least 2 samples per device: data.batch_size is per device (CIRKD: 2 on "
                "each of 8 GPUs), and keep data.drop_last=true so that no last batch of one is left"
            ) from err
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        if self.distiller.needs_teacher:
            t_feats = self.teacher_features(batch)
            inputs = self.distill_inputs(batch)
            if sample_index is not None:
                inputs = {**inputs, "sample_index": sample_index}
            terms, stats = self.distiller(s_feats, t_feats, inputs, epoch=self.current_epoch + 1)
        losses = self.task_losses(s_out, batch)
        self._check_task_weights(losses)
        if not losses:
            raise ValueError(f"{type(self).__name__}.task_losses returned no loss")
        # every logged term is a summand of train/loss: a task loss times its model.task_weights entry and the
        # distiller's task_weight (KD's 0.1 on CE), a distillation term times its own weight
        weighted: dict[str, Tensor] = {}
        for name, value in losses.items():
            weight = self.task_weights.get(name, 1.0) * self.distiller.task_weight
            weighted[name] = value if weight == 1.0 else weight * value
        first, *rest = (*weighted.values(), *terms.values())
        loss = first
        for term in rest:
            loss = loss + term
        all_terms = {**weighted, **terms}
        self.nonfinite.track(all_terms, self.global_step, self._where())
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss/{k}": v.detach() for k, v in all_terms.items()})
        if stats:
            self.log_dict({f"train/{k}": v for k, v in stats.items()})
        self.training_step_extra(s_out, batch)
        return loss

    def _check_task_weights(self, losses: Mapping[str, Tensor]) -> None:
        if self._task_loss_names is not None:
            return
        self._task_loss_names = set(losses)
        unknown = sorted(set(self.task_weights) - self._task_loss_names)
        if unknown:
            raise ValueError(
                f"model.task_weights names {unknown}, but the task's losses are {sorted(losses)}; "
                "weigh those names instead"
            )

    def training_step_extra(self, student_output: Any, batch: Any) -> None:
        """Task hook for training metrics."""

    # ------------------------------------------------------------------ reproducible steps, non-finite guard
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.reseed_every_step:
            seed_step(lightning_seed(), self.current_epoch, batch_idx, self.global_rank, self.device)

    def _where(self) -> str:
        return f"global step {self.global_step} (epoch {self.current_epoch})"

    def _last_good_checkpoint(self) -> str:
        """The newest checkpoint file of this run that passed the checks when it was written (every checkpoint
        written by a fit did), or the one this run resumed from; ``"none yet"``."""
        trainer = self._trainer
        if trainer is None:
            return "none yet"
        paths = [getattr(cb, attr, "") for cb in trainer.callbacks for attr in ("last_model_path", "best_model_path")]
        paths.append(trainer.ckpt_path or "")
        existing = {Path(p) for p in paths if p and Path(p).is_file()}
        if not existing:
            return "none yet"
        return str(max(existing, key=lambda p: p.stat().st_mtime))

    def _check_nonfinite(self, when: str) -> None:
        """Loss terms since the last check, then every trainable parameter."""
        last = self._last_good_checkpoint()
        self.nonfinite.check(self._where(), last)
        self.nonfinite.check_parameters(self.trainable_parameters(), f"{when} at {self._where()}", last)

    def _raise_bad_outputs(self, bad: list[str], during: str) -> None:
        names = ", ".join(bad)
        raise NonFiniteLossError(
            f"the student's outputs ({names}) held NaN/inf {during} after {self._where()}, although its weights are "
            "finite: they are too large (a blow-up), so its metrics mean nothing. "
            + ADVICE.format(last=self._last_good_checkpoint())
        )

    def _check_probe_outputs(self) -> None:
        """The student's evaluation outputs on the dry run's batch are finite (before a checkpoint is written)."""
        if self._probe_batch is None:
            return
        watched = self.watched_outputs()
        was_training = self.student.training
        self.output_watch.start(watched)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                self.student.eval()
                self.probe_forward(self._probe_batch)
        finally:
            self.student.train(was_training)
            self.output_watch.stop()
        bad = self.output_watch.bad(watched, self.device)
        if bad:
            self._raise_bad_outputs(bad, "on the dry run's batch, before writing a checkpoint,")

    def _in_fit(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking

    def on_validation_epoch_start(self) -> None:
        if self._in_fit():
            self.output_watch.start(self.watched_outputs())

    def on_validation_epoch_end(self) -> None:
        """The validation contract (fit only), then the task's metrics (:meth:`log_validation_epoch`)."""
        if self._in_fit():
            where = f"after {self._where()}"
            for name, value in self.validation_values().items():
                self.nonfinite.check_value(name, value, where, self._last_good_checkpoint())
            watched = list(self.watched_outputs())
            self.output_watch.stop()
            bad = self.output_watch.bad(watched, self.device)
            if bad:
                self._raise_bad_outputs(bad, "in validation")
        self.log_validation_epoch()

    def teardown(self, stage: str) -> None:
        self.output_watch.stop()

    # ------------------------------------------------------------------ evaluation: metrics per split, the best
    def build_metrics(self) -> None:
        """One set of :meth:`metrics` per evaluation split as registered children ``<split>_<name>`` and the
        best-so-far tracker ``val_<best_metric>_best``, on the module's device (from :meth:`build`)."""
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"{type(self).__name__}.best_mode must be 'max' or 'min', got {self.best_mode!r}")
        self._metric_names: dict[str, tuple[str, ...]] = {}
        for split in EVAL_SPLITS:
            metrics = self.metrics()
            bad = [n for n in metrics if not n.isidentifier()]
            if bad:
                raise ValueError(f"{type(self).__name__}.metrics() names {bad}: use Python identifiers")
            if self.best_metric is not None and split == "val" and not metrics:
                raise ValueError(f"{type(self).__name__}.best_metric is {self.best_metric!r} but metrics() is empty")
            self._metric_names[split] = tuple(metrics)
            for name, metric in metrics.items():
                setattr(self, f"{split}_{name}", metric.to(self.device))
        if self.best_metric is not None:
            tracker = MaxMetric() if self.best_mode == "max" else MinMetric()
            setattr(self, f"val_{self.best_metric}_best", tracker.to(self.device))

    def split_metrics(self, split: str) -> dict[str, Metric]:
        """``{name: metric}`` of ``split`` (``val`` or ``test``); ``{}`` before :meth:`build`."""
        names = getattr(self, "_metric_names", {}).get(split, ())
        return {name: getattr(self, f"{split}_{name}") for name in names}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        metrics = self.split_metrics("val")
        if metrics:
            self.update_metrics(metrics, batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        metrics = self.split_metrics("test")
        if metrics:
            self.update_metrics(metrics, batch)

    def on_test_epoch_end(self) -> None:
        self.log_split("test")

    def log_split(self, split: str) -> dict[str, Tensor]:
        """Log ``split``'s epoch values as ``<split>/<name>`` (and ``val/<best_metric>_best`` outside the sanity
        check), hand them to :meth:`report_metrics`, reset the split's metrics; returns the values."""
        metrics = self.split_metrics(split)
        if not metrics:
            return {}
        values = self.compute_metrics(metrics)
        best = self.best_metric
        if best is not None and best not in values:
            raise KeyError(f"{type(self).__name__}.compute_metrics gave {sorted(values)}, not best_metric {best!r}")
        for name, value in values.items():  # values synchronised by the metrics: the mean over ranks keeps them
            self.log(f"{split}/{name}", value.to(self.device), prog_bar=name == best, sync_dist=True)
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if split == "val" and best is not None and not sanity:
            tracker = getattr(self, f"val_{best}_best")
            tracker.update(values[best].to(self.device))
            self.log(f"val/{best}_best", tracker.compute(), prog_bar=True, sync_dist=True)
        if not sanity:
            self.report_metrics(split, metrics, values)
        for metric in metrics.values():
            metric.reset()
        return values

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.nonfinite.step_done(self._last_good_checkpoint)  # asked only when a check fails

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._check_nonfinite("before validation")

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite("at the end of the epoch")
        skipped = getattr(self.datamodule(), "skipped_images", None)  # data.skip_bad_images: what it replaced
        if skipped and any(skipped.values()):
            log.warning("data.skip_bad_images: unreadable images replaced so far: %s", dict(skipped))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._check_nonfinite("before writing a checkpoint")
            self._check_probe_outputs()
        checkpoint["diffkd"] = {
            "points": self.distiller.describe(),
            "config": self.run_config,
            "wandb_id": self._wandb_id(),
        }

    def _wandb_id(self) -> str | None:
        if self._trainer is None:
            return None
        for lg in self.trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                return getattr(lg, "version", None)
        return None

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    def global_batch_size(self) -> int:
        dm = self.datamodule()
        if dm is None:
            raise ValueError("optim.lr_base_batch_size needs a datamodule (its batch_size is the per-device batch)")
        require_protocol(dm, DistillDataModule, "optim.lr_base_batch_size")
        return global_batch_size(dm.batch_size, self.trainer.world_size, self.trainer.accumulate_grad_batches)

    def on_train_start(self) -> None:
        if self.resume_changes:
            self.apply_resume_changes()

    def apply_resume_changes(self) -> None:
        """``resume_changes=apply``: after Lightning restored the checkpoint's optimizer and schedule, set every
        hyper-parameter of the optimizer's groups (learning rate, momentum, weight decay, ...) to a fresh build's
        from this run's config, and replace the schedule by a fresh one advanced to the restored step — so that the
        new values train from here on, as the run's config says. The optimizer's state (momentum buffers, Adam
        moments) is kept."""
        trainer = self.trainer
        optimizer = trainer.optimizers[0]
        fresh = self._build_optimizer()
        before = [g["lr"] for g in optimizer.param_groups]
        for group, new in zip(optimizer.param_groups, fresh.param_groups):
            for key, value in new.items():
                if key != "params":
                    group[key] = value
            group["initial_lr"] = new["lr"]
        configs = trainer.lr_scheduler_configs
        if configs and self.scheduler_factory is not None:
            done = int(configs[0].scheduler.last_epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()" while advancing
                scheduler = self.scheduler_factory(optimizer, **self._step_counts())
                for _ in range(done):
                    scheduler.step()
            configs[0].scheduler = scheduler
        after = [g["lr"] for g in optimizer.param_groups]
        keys = ", ".join(str(c.key) for c in self.resume_changes)
        log.warning(
            "resume_changes=apply (%s): the optimizer's hyper-parameters and the schedule were rebuilt from this run's "
            "config at global step %d: learning rate %s → %s",
            keys,
            self.global_step,
            ", ".join(f"{v:.6g}" for v in before),
            ", ".join(f"{v:.6g}" for v in after),
        )

    def _build_optimizer(self) -> Optimizer:
        """The optimizer of this run's config over the trainable parameters (weight-decay groups, LR scaling)."""
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (optim.optimizer)")
        params = self.trainable_parameters()
        if self.no_decay_bias_norm:
            decay = [p for n, p in params if p.ndim > 1]
            no_decay = [p for n, p in params if p.ndim <= 1]
            groups: Any = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        else:
            groups = [p for _, p in params]
        mults = self.bias_lr_mult != 1.0 or self.bias_decay_mult != 1.0
        if mults:
            if self.no_decay_bias_norm:
                raise ValueError("optim.no_decay_bias_norm and bias_lr_mult/bias_decay_mult: choose one rule")
            biases = self._plain_biases()
            groups = [
                {"params": [p for n, p in params if n not in biases]},
                {"params": [p for n, p in params if n in biases]},
            ]
        optimizer = self.optimizer_factory(groups)
        if mults:  # the second group: the biases outside normalisation layers
            optimizer.param_groups[1]["lr"] *= self.bias_lr_mult
            optimizer.param_groups[1]["weight_decay"] *= self.bias_decay_mult
        if self.lr_base_batch_size:
            factor = scale_learning_rate(optimizer, self.global_batch_size(), self.lr_base_batch_size)
            log.info("learning rate scaled ×%.4g for a global batch of %d", factor, self.global_batch_size())
        return optimizer

    def _plain_biases(self) -> set[str]:
        """Names of the trainable biases that do not belong to a normalisation layer (MMDetection's rule)."""
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        names = set()
        for module_name, module in self.named_modules():
            if isinstance(module, norms) or type(module).__name__ == "FrozenBatchNorm2d":
                continue
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.requires_grad and not module_name.startswith("teacher."):
                names.add(f"{module_name}.bias" if module_name else "bias")
        return names

    def configure_optimizers(self) -> Any:
        optimizer = self._build_optimizer()
        if self.scheduler_factory is None:
            return optimizer
        counts = self.scheduler_step_counts()
        self._forget_early_train_loader()
        scheduler = self.scheduler_factory(optimizer, **counts)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def scheduler_step_counts(self) -> dict[str, float]:
        """See :meth:`_step_counts` (public name kept)."""
        return self._step_counts()

    def _step_counts(self) -> dict[str, float]:
        """``steps_per_epoch`` / ``total_steps`` for a scheduler whose signature names them and whose config leaves
        them unset (``diffkd.optim.WarmupStepLR``/``WarmupCosineLR``: lengths in epochs, stepped every iteration);
        ``{}`` for any other scheduler. Counts are optimizer steps of this process, from the trainer."""
        try:
            params = inspect.signature(self.scheduler_factory).parameters
        except (TypeError, ValueError):
            return {}
        wanted = [
            k
            for k in ("steps_per_epoch", "total_steps")
            if k in params and params[k].default in (None, params[k].empty)
        ]
        if not wanted:
            return {}
        total = self.trainer.estimated_stepping_batches  # sets up the train loader when needed
        batches = self.trainer.num_training_batches
        if math.isinf(batches):  # max_epochs=-1: Lightning answers max_steps without setting the loader up
            self.trainer.fit_loop.setup_data()
            batches = self.trainer.num_training_batches
        if math.isinf(batches):
            raise ValueError(f"{wanted} need a train loader with a length (per-iteration schedules count epochs)")
        counts = {"steps_per_epoch": math.ceil(batches / self.trainer.accumulate_grad_batches), "total_steps": total}
        return {k: counts[k] for k in wanted}

    def _forget_early_train_loader(self) -> None:
        """Drop the train loader that counting the steps set up, when the run resumes from a checkpoint.

        ``configure_optimizers`` runs before Lightning restores a checkpoint's loop progress, and setting the loader
        up creates its iterator there and then: a run resumed mid-epoch would start that epoch from its first batch
        (the resumable loaders read where to start when their iterator is created), and Lightning would not restore
        a stateful loader's state either. Forgotten, the loader is set up again by the fit loop, after the restore.
        """
        trainer = self.trainer
        if not trainer.ckpt_path:
            return
        fit_loop = trainer.fit_loop
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            fetcher.teardown()  # stops the early iterator's worker processes
        fit_loop._data_fetcher = None
        fit_loop._combined_loader = None


def _multi_call(run: DryRun) -> set[str]:
    """Module paths that ran more than once in a dry run."""
    return {path for path, outs in run.calls.items() if len(outs) > 1}
