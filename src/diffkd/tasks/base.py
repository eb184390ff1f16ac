"""``DistillationModule``: the LightningModule every task builds on.

It owns the frozen teacher, the student and the distiller (whose heads are registered children, so the optimizer,
DDP, checkpoints and EMA include them), runs one training step as

    batch → teacher forward (no grad, eval mode; taps keep the named features) → student forward (taps)
          → distiller terms → task loss · task_weight + Σ terms → backward

and leaves to a task subclass only: how a batch reaches the models (``model_input``), the task loss, and the
evaluation steps and metrics. No tensor leaves the device inside the step: non-finite checks accumulate on the
device and are read every ``nonfinite_check_every`` steps and before any checkpoint is written.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from diffkd.distill import Distiller, FeatureTaps
from diffkd.method.profile import format_count, point_profiles, record_output_shapes

__all__ = ["DistillationModule", "NonFiniteLossError"]

log = logging.getLogger(__name__)

# The frozen teacher is in eval mode on purpose; Lightning warns about any eval-mode module at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

COMPILE_PARTS = ("student", "teacher", "heads")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops without writing a checkpoint of the bad weights."""


class DistillationModule(L.LightningModule):
    """Teacher + student + distiller, task-agnostic.

    Args:
        student: the network being trained; its ``forward`` output is the task output.
        distiller: the distillation losses (``diffkd.distill.Distiller``); no points means plain training.
        teacher: the frozen teacher (``None`` for plain training).
        optimizer: a partial taking ``params`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.05)``).
        scheduler: a partial taking the optimizer, or ``None``.
        scheduler_interval: ``epoch`` or ``step``.
        no_decay_bias_norm: weight decay 0 for biases and normalisation weights (all 1-D parameters).
        lr_base_batch_size: when set, the learning rate scales linearly with the global batch:
            ``lr × (batch_size × devices × nodes × accumulate) / lr_base_batch_size``.
        input_size: (C, H, W) of the dry-run input; default: the datamodule's ``in_chans``/``image_size``.
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
    """

    def __init__(
        self,
        student: nn.Module,
        distiller: Distiller,
        teacher: nn.Module | None = None,
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[[Optimizer], Any] | None = None,
        scheduler_interval: str = "epoch",
        no_decay_bias_norm: bool = False,
        lr_base_batch_size: int | None = None,
        input_size: Iterable[int] | None = None,
        channels_last: bool = False,
        compile: bool | str | Iterable[str] = False,
        compile_mode: str | None = None,
        teacher_dtype: str | None = None,
        nonfinite_check_every: int = 50,
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
        self.lr_base_batch_size = lr_base_batch_size
        self.input_size = tuple(input_size) if input_size is not None else None
        self.channels_last = channels_last
        self.compile_parts = _compile_parts(compile)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode={compile_mode!r}; choose from {list(COMPILE_MODES)}")
        self.compile_mode = compile_mode
        self.teacher_dtype = getattr(torch, teacher_dtype) if teacher_dtype else None
        self.nonfinite_check_every = max(1, int(nonfinite_check_every))
        self.run_config: dict[str, Any] | None = None  # the composed Hydra config, stored in checkpoints
        self.student_taps: FeatureTaps | None = None
        self.teacher_taps: FeatureTaps | None = None
        self._term_names: list[str] = []
        self._bad_flags: Tensor | None = None
        self._steps_since_check = 0

    # ------------------------------------------------------------------ what a task provides
    def model_input(self, batch: Any) -> Tensor:
        """The tensor both models see (classification: the images)."""
        raise NotImplementedError

    def task_loss(self, student_output: Any, batch: Any) -> Tensor:
        raise NotImplementedError

    def distill_target(self, batch: Any) -> Tensor | None:
        """Labels for distances that need them (DKD); ``None`` where the task has none."""
        return None

    def prepare_batch(self, batch: Any) -> Any:
        """Training-batch transform on the device (e.g. Mixup/CutMix)."""
        return batch

    # ------------------------------------------------------------------ setup
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm keeps its statistics, dropout stays off
        return self

    def example_input(self) -> Tensor:
        size = self.input_size
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if size is None and dm is not None and hasattr(dm, "image_size"):
            size = (dm.in_chans, dm.image_size, dm.image_size)
        if size is None:
            raise ValueError("cannot infer the input size for the dry run: set model.input_size=[C, H, W]")
        return torch.randn(2, *size, device=self.device)

    def setup(self, stage: str) -> None:
        if self.student_taps is not None:
            return
        example = self.example_input()
        self.build(example)

    def build(self, example: Tensor) -> None:
        """Infer shapes, create the heads and the taps (called once, from ``setup`` or by hand)."""
        with record_output_shapes() as shapes:  # the tap shapes of the build's dry runs, for the heads' MACs
            points = self.distiller.build(self.student, self.teacher, example)
        profiles = point_profiles(self.distiller, self.student, self.teacher, example, shapes) if points else {}
        for name, info in points.items():
            cost = profiles.get(name)
            log.info(
                "distill point %-8s student %-14r teacher %-14r head %-8s distance %s  head params %s  MACs/sample %s",
                name,
                info["student"],
                info["teacher"],
                info["head"],
                info["distance"]["name"],
                f"{info['params']:,}",
                format_count(cost.macs) if cost is not None else 0,
            )
        s_paths, t_paths = self.distiller.tap_paths()
        self.student_taps = FeatureTaps(self.student, ["", *s_paths])
        if self.distiller.needs_teacher:
            self.teacher_taps = FeatureTaps(self.teacher, ["", *t_paths])
        if self.channels_last:
            for m in (self.student, self.teacher, self.distiller):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        if self.teacher_dtype is not None and self.teacher is not None:
            self.teacher.to(self.teacher_dtype)
        if self.compile_parts:
            self._compile()

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
                self.teacher.compile(**kwargs)
            if "heads" in self.compile_parts:
                # the heads share one forward: without dynamic=False the second head's other channel count would
                # turn the graph dynamic ("automatic dynamic shapes"), slower and worse for CUDA graphs
                for head in self.distiller.heads.values():
                    head.compile(dynamic=False, **kwargs)
        except Exception as err:
            log.warning("torch.compile failed (%s: %s); training continues in eager mode", type(err).__name__, err)

    def _teacher_compile_context(self) -> contextlib.AbstractContextManager:
        """Inductor freezing while the compiled teacher runs (its graphs compile lazily, at their first call).

        Scoped to the teacher: a frozen student graph (e.g. validation's) would keep stale weights as constants.
        """
        if "teacher" not in self.compile_parts:
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch(freezing=True)

    # ------------------------------------------------------------------ training
    def _to_memory_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward_teacher(self, x: Tensor) -> dict[str, Tensor]:
        """Teacher forward keeping only the tapped tensors: no autograd graph, eval mode.

        With ``teacher_dtype`` (the fast path) it runs under ``torch.inference_mode`` in that dtype and the taps
        are cast back to fp32 outside it — the cast is needed anyway and yields ordinary tensors the losses may
        save for backward. In fp32 it runs under ``no_grad``: inference tensors could not be saved by the
        distances, and copying them out would cost more than inference mode saves.
        """
        assert self.teacher_taps is not None
        if self.teacher_dtype is None:
            with torch.no_grad(), self._teacher_compile_context():
                return self.teacher_taps(x)[1]
        with torch.inference_mode(), self._teacher_compile_context():
            feats = self.teacher_taps(x.to(self.teacher_dtype))[1]
        return {k: v.float() for k, v in feats.items()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.compile_parts and self.compile_mode in ("reduce-overhead", "max-autotune"):
            # CUDA-graph outputs of the previous step may be overwritten from here on (one replay per step)
            torch.compiler.cudagraph_mark_step_begin()
        batch = self.prepare_batch(batch)
        x = self._to_memory_format(self.model_input(batch))
        assert self.student_taps is not None, "setup() has not run"
        s_out, s_feats = self.student_taps(x)
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        if self.distiller.needs_teacher:
            t_feats = self.forward_teacher(x)
            terms, stats = self.distiller(s_feats, t_feats, self.distill_target(batch), epoch=self.current_epoch + 1)
        task = self.task_loss(s_out, batch)
        loss = self.distiller.task_weight * task
        for term in terms.values():
            loss = loss + term
        all_terms = {"task": task, **terms}
        self._track_nonfinite(all_terms)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss/{k}": v.detach() for k, v in all_terms.items()})
        if stats:
            self.log_dict({f"train/{k}": v for k, v in stats.items()})
        self.training_step_extra(s_out, batch)
        return loss

    def training_step_extra(self, student_output: Any, batch: Any) -> None:
        """Task hook for training metrics."""

    # ------------------------------------------------------------------ non-finite guard
    def _track_nonfinite(self, terms: dict[str, Tensor]) -> None:
        if list(terms) != self._term_names:
            self._check_nonfinite()  # new term set: settle the old flags first
            self._term_names, self._bad_flags = list(terms), None
        values = [v.detach() for v in terms.values()]
        if all(v.dim() == 0 for v in values):  # the usual case: one isfinite over all terms, a handful of kernels
            bad = ~torch.isfinite(torch.stack([v.float() for v in values]))
        else:
            bad = torch.stack([~torch.isfinite(v).all() for v in values])
        self._bad_flags = bad if self._bad_flags is None else self._bad_flags | bad

    def _check_nonfinite(self) -> None:
        if self._bad_flags is None:
            return
        flags = self._bad_flags.tolist()  # the one host sync, every `nonfinite_check_every` steps
        self._bad_flags = None
        self._steps_since_check = 0
        bad = [n for n, f in zip(self._term_names, flags) if f]
        if bad:
            last = getattr(getattr(self._trainer, "checkpoint_callback", None), "last_model_path", "") or "none yet"
            raise NonFiniteLossError(
                f"loss term(s) {', '.join(bad)} became NaN/inf by global step {self.global_step} "
                f"(epoch {self.current_epoch}). Training stopped and no checkpoint of these weights was written; "
                f"the last good checkpoint is {last}. Try a lower learning rate, gradient clipping "
                "(trainer.gradient_clip_val=5) or check the inputs."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps_since_check += 1
        if self._steps_since_check >= self.nonfinite_check_every:
            self._check_nonfinite()

    def on_validation_start(self) -> None:
        self._check_nonfinite()

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_nonfinite()
        checkpoint["diffkd"] = {"points": self.distiller.describe(), "config": self.run_config}

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    def global_batch_size(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None)
        if per_device is None:
            raise ValueError("lr_base_batch_size needs the datamodule's batch_size")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (optim.optimizer)")
        params = self.trainable_parameters()
        if self.no_decay_bias_norm:
            decay = [p for n, p in params if p.ndim > 1]
            no_decay = [p for n, p in params if p.ndim <= 1]
            groups: Any = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        else:
            groups = [p for _, p in params]
        optimizer = self.optimizer_factory(groups)
        if self.lr_base_batch_size:
            factor = self.global_batch_size() / self.lr_base_batch_size
            for group in optimizer.param_groups:
                group["lr"] *= factor
                group["initial_lr"] = group["lr"]
            log.info("learning rate scaled ×%.4g for a global batch of %d", factor, self.global_batch_size())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, **self.scheduler_step_counts())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def scheduler_step_counts(self) -> dict[str, float]:
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
        if math.isinf(batches):
            raise ValueError(f"{wanted} need a train loader with a length (per-iteration schedules count epochs)")
        counts = {"steps_per_epoch": math.ceil(batches / self.trainer.accumulate_grad_batches), "total_steps": total}
        return {k: counts[k] for k in wanted}
