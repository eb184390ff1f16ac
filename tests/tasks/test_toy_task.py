"""A new task is its forward contract and its metrics: the evaluation contract (one metric set per split, the best
so far, the validation-loss check, logging and resets) comes from the task-agnostic module.

The toy task below — regression with a mean-squared error whose best value is the *lowest* — is the whole task: one
class, five short methods, no validation or test step, no epoch-end hook, no best-metric bookkeeping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric, MeanSquaredError, Metric

from diffkd.distill import Distiller
from diffkd.tasks import DistillationModule, NonFiniteLossError


class RegressionModule(DistillationModule):
    """Batches ``(x (B, 4), y (B, 1))``; the student maps x to y."""

    best_metric = "mse"
    best_mode = "min"

    def student_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch[0],), {}

    def task_losses(self, student_output: Tensor, batch: Any) -> dict[str, Tensor]:
        return {"mse": F.mse_loss(student_output, batch[1])}

    def synthetic_batch(self, input_size: tuple[int, ...]) -> Any:
        return torch.randn(2, *input_size), torch.randn(2, 1)

    def metrics(self) -> dict[str, Metric]:
        return {"loss": MeanMetric(), "mse": MeanSquaredError()}

    def update_metrics(self, metrics: Mapping[str, Metric], batch: Any) -> None:
        x, y = batch
        prediction = self.student(x)
        metrics["loss"].update(F.mse_loss(prediction, y))
        metrics["mse"].update(prediction, y)


class _Record(L.Callback):
    """The logged values after every validation epoch outside the sanity check."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _module(student: nn.Module) -> RegressionModule:
    optimizer = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    return RegressionModule(student, Distiller(), optimizer=optimizer, input_size=(4,))


def test_a_toy_task_gets_metrics_per_split_and_the_lowest_best():
    torch.manual_seed(0)
    module = _module(nn.Linear(4, 1))
    record = _Record()
    trainer = _trainer(max_epochs=3, callbacks=[record], num_sanity_val_steps=1)
    trainer.fit(module, train_dataloaders=_loader(0), val_dataloaders=_loader(1))
    assert len(record.epochs) == 3
    for i, epoch in enumerate(record.epochs):
        assert {"val/loss", "val/mse", "val/mse_best"} <= set(epoch)
        assert epoch["val/mse_best"] == pytest.approx(min(e["val/mse"] for e in record.epochs[: i + 1]))
    assert record.epochs[-1]["val/mse"] < record.epochs[0]["val/mse"]  # it learns: the best is the last
    # one set per split, registered (they move with the module), reset after every epoch
    assert isinstance(module.val_mse, MeanSquaredError) and module.test_mse is not module.val_mse
    assert {"val_loss", "val_mse", "val_mse_best", "test_loss", "test_mse"} <= {n for n, _ in module.named_children()}
    assert int(module.val_mse.total) == 0
    results = trainer.test(module, dataloaders=_loader(1), verbose=False)[0]
    assert set(results) == {"test/loss", "test/mse"}  # no best outside validation
    assert results["test/mse"] == pytest.approx(record.epochs[-1]["val/mse"], rel=1e-5)  # same data, same weights


class _BlowsUpInEvaluation(nn.Module):
    """Finite in training, NaN in evaluation: only the validation contract can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y if self.training else y * float("nan")


def test_the_validation_loss_check_holds_for_any_task():
    module = _module(_BlowsUpInEvaluation())
    trainer = _trainer(max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match=r"val/loss is nan|outputs \(student\) held NaN/inf"):
        trainer.fit(module, train_dataloaders=_loader(0), val_dataloaders=_loader(1))


def test_a_best_metric_the_task_does_not_compute_is_refused():
    class Misnamed(RegressionModule):
        best_metric = "rmse"

    module = Misnamed(nn.Linear(4, 1), Distiller(), input_size=(4,))
    module.build(module.example_batch())
    module.update_metrics(module.split_metrics("val"), next(iter(_loader(0))))
    with pytest.raises(KeyError, match="not best_metric 'rmse'"):
        module.log_split("val")
