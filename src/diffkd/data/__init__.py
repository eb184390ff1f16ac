"""LightningDataModules. They know nothing of distillation; what a task may ask of them is declared in
:mod:`diffkd.data.protocol` (:class:`DistillDataModule`, :class:`ClassificationData`, :class:`SampleIndexData`,
and the ``task`` each data module class declares: :func:`task_of`)."""

from diffkd.data.protocol import (
    DATA_TASKS,
    ClassificationData,
    DistillDataModule,
    SampleIndexData,
    require_protocol,
    task_of,
)

__all__ = ["DATA_TASKS", "ClassificationData", "DistillDataModule", "SampleIndexData", "require_protocol", "task_of"]
