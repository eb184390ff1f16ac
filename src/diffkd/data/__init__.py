"""LightningDataModules. They know nothing of distillation; what a task may ask of them is declared in
:mod:`diffkd.data.protocol` (:class:`DistillDataModule`, :class:`ClassificationData`, :class:`SampleIndexData`,
and the ``task`` each data module class declares: :func:`task_of`).

The layers, each written once:

* :mod:`~diffkd.data.loaders` — :class:`~diffkd.data.loaders.LoaderOptions` and
  :class:`~diffkd.data.loaders.DataModuleBase`: the loaders, exact resume (:mod:`~diffkd.data.resumable`), the
  training-split check, ``example_batch`` and the sample indices (:mod:`~diffkd.data.sample_index`) of every data
  module;
* :mod:`~diffkd.data.images` and :mod:`~diffkd.data.image_checks` — image files that may be broken
  (``data.verify``, ``data.skip_bad_images``);
* per task, a base on the loaders: :mod:`~diffkd.data.classification` (CIFAR-100, Fashion-MNIST, ImageNet, image
  folders; ``gpu_preload`` through :mod:`~diffkd.data.device_loader`), :mod:`~diffkd.data.segmentation` (a folder
  layout + a label map: :mod:`~diffkd.data.segmentation_folder`, :mod:`~diffkd.data.cityscapes`), and COCO
  detection (:mod:`~diffkd.data.coco`, plugging in its grouped batch sampler and list collate).

:mod:`diffkd.data.base` is the former home of the classification base and the image-file code, kept as a re-export.
"""

from diffkd.data.protocol import (
    DATA_TASKS,
    ClassificationData,
    DistillDataModule,
    SampleIndexData,
    require_protocol,
    task_of,
)

__all__ = ["DATA_TASKS", "ClassificationData", "DistillDataModule", "SampleIndexData", "require_protocol", "task_of"]
