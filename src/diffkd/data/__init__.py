"""LightningDataModules. They know nothing of distillation; what a task may ask of them is declared in
:mod:`diffkd.data.protocol` (:class:`DistillDataModule`, :class:`ClassificationData`)."""

from diffkd.data.protocol import ClassificationData, DistillDataModule, require_protocol

__all__ = ["ClassificationData", "DistillDataModule", "require_protocol"]
