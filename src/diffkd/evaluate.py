"""``python -m diffkd.evaluate`` — top-1 / top-5 accuracy and cross-entropy of a classifier on a validation set.

What to evaluate (one of):

* a diffkd training checkpoint (``.ckpt``): its student, rebuilt from the config stored inside
  (``--ema``: the EMA weights that :class:`diffkd.callbacks.EMA` saved instead of the trained ones);
* exported weights (``.pth`` / ``.safetensors``, or any checkpoint :func:`diffkd.models.load_weights` reads)
  with ``--model <registry name>``;
* a registry model with ``--model <name> --pretrained`` (its published weights; without ``--pretrained`` the
  model is randomly initialised, which is only useful as a smoke test).

On what: ``--data <Hydra data config>`` (``imagenet``, ``cifar100``, ``image_folder``, ... from ``conf/data/``)
with ``--data-dir`` (the config's ``data_dir``) or ``--root`` (``image_folder``'s ``root``), or ``--data <folder>``
holding ``train/`` and ``val/`` class folders. The config's validation split and transforms are used (ImageNet:
resize 256, centre-crop 224; CIFAR-100: the test split). ``--set key=value`` overrides any other config entry.

Examples::

    python -m diffkd.evaluate logs/imagenet_r34_r18/runs/<time>/checkpoints/last.ckpt --data imagenet \\
        --data-dir /data/imagenet
    python -m diffkd.evaluate exports/r18.safetensors --model tv_resnet18 --data imagenet --data-dir /data/imagenet
    python -m diffkd.evaluate --model tv_resnet34 --pretrained --data imagenet --data-dir /data/imagenet --json r34.json
    python -m diffkd.evaluate last.ckpt --data cifar100 --limit-batches 10 --device cpu

Prints one table row per run (images, top-1 %, top-5 %, mean loss); ``--json out.json`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EvalResult", "build_datamodule", "evaluate_model", "load_model", "main"]

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


@dataclass
class EvalResult:
    """One evaluation: accuracies in percent, ``loss`` the mean cross-entropy (nats) over ``images``."""

    model: str
    weights: str
    data: str
    images: int
    top1: float
    top5: float
    loss: float
    seconds: float
    device: str


# ----------------------------------------------------------------------------------------------------- data


def build_datamodule(
    data: str,
    data_dir: str | None = None,
    root: str | None = None,
    batch_size: int = 64,
    num_workers: int = 4,
    image_size: int | None = None,
    overrides: Sequence[str] = (),
) -> Any:
    """Instantiate ``conf/data/<data>.yaml`` (or ``image_folder`` on ``data`` when it is a folder) for evaluation.

    Args:
        data: a data config name, or a folder with ``train/`` and ``val/`` class sub-folders.
        data_dir, root: the config's ``data_dir`` / ``root`` (``None`` keeps the config's default).
        batch_size: evaluation batch (the config's ``batch_size``, which is its ``val_batch_size`` default).
        num_workers: loader workers.
        image_size: the config's ``image_size`` when it has one.
        overrides: further Hydra overrides of the data config, ``"key=value"`` relative to ``data``
            (``"crop_pct=0.95"``) or absolute (``"data.crop_pct=0.95"``).

    Returns:
        the LightningDataModule (not yet set up); its ``val_dataloader()`` gives (images (B, C, H, W) float,
        targets (B,) int64) batches.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffkd.train import _instantiate

    name = data
    if Path(data).is_dir() and not (Path(CONFIG_DIR) / "data" / f"{data}.yaml").is_file():
        name, root = "image_folder", data
    if not (Path(CONFIG_DIR) / "data" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))
        raise ValueError(f"--data {data!r} is neither a data config ({', '.join(known)}) nor a folder")
    base = os.environ.get("DIFFKD_ROOT", os.getcwd())
    ov = [
        "~experiment",
        f"data={name}",
        f"paths.root_dir={base}",
        f"data.batch_size={batch_size}",
        f"data.num_workers={num_workers}",
    ]
    if data_dir is not None:
        ov.append(f"data.data_dir={data_dir}")
    if root is not None:
        ov.append(f"data.root={root}")
    if image_size is not None:
        ov.append(f"data.image_size={image_size}")
    ov += [o if o.startswith(("data.", "+data.", "~data.")) else f"data.{o}" for o in overrides]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=ov)
    return _instantiate(cfg.data)


# ---------------------------------------------------------------------------------------------------- model


def _checkpoint_student(checkpoint: dict[str, Any]) -> nn.Module:
    """The student of a diffkd checkpoint (see :func:`diffkd.export.build_student`)."""
    from diffkd.export import build_student

    return build_student(checkpoint)


def _ema_weights(path: str | Path) -> dict[str, Tensor]:
    from diffkd.callbacks.ema import ema_state_from_checkpoint

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = ema_state_from_checkpoint(checkpoint)
    if state is None:
        raise KeyError(f"{path} holds no EMA weights (was it trained with callbacks=ema?)")
    return state


def load_model(
    source: str | Path | None = None,
    model: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    ema: bool = False,
) -> tuple[nn.Module, str, str]:
    """The network to evaluate, in eval mode on the CPU.

    Args:
        source: a diffkd ``.ckpt`` (its student), or weights for ``model`` (``.pth``/``.safetensors``/...).
        model: a registry name (``diffkd.models.list_models()``, ``tv:<name>``, ``timm:<name>``).
        pretrained: load the registry's published weights for ``model`` (no ``source``).
        num_classes: classifier width for ``model`` (``None``: the entry's default, 1000 for ImageNet models).
        ema: with a ``.ckpt``: load the EMA weights saved in it.

    Returns:
        ``(network, model name, weights description)``.
    """
    from diffkd.export import student_spec
    from diffkd.models import create_model, load_weights

    if source is None:
        if model is None:
            raise ValueError("give a checkpoint/weights file, or --model <name> (with --pretrained for its weights)")
        net = create_model(model, num_classes=num_classes, pretrained=pretrained)
        return net.eval(), model, "pretrained" if pretrained else "random init"
    path = Path(source)
    checkpoint = None
    if path.suffix == ".ckpt" and model is None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint is not None and "state_dict" in checkpoint:
        net = _checkpoint_student(checkpoint)
        name = str(student_spec(checkpoint).get("name", type(net).__name__))
        weights = f"student of {path.name}"
        if ema:
            state = _ema_weights(path)
            result = net.load_state_dict(state, strict=False)
            unused = [k for k in state if k in result.unexpected_keys]
            missing = [k for k in result.missing_keys if torch.is_floating_point(net.state_dict()[k])]
            if unused or missing:
                raise RuntimeError(
                    f"EMA weights do not fit the student: missing {missing[:5]}, unexpected {unused[:5]}"
                )
            weights = f"EMA of the student of {path.name}"
        return net.eval(), name, weights
    if model is None:
        raise ValueError(f"{path.name}: exported weights need --model <registry name> (e.g. --model tv_resnet18)")
    if ema:
        raise ValueError("--ema reads a diffkd training checkpoint (.ckpt), not exported weights")
    net = create_model(model, num_classes=num_classes)
    load_weights(net, path, key="student" if path.suffix == ".ckpt" else None)
    return net.eval(), model, path.name


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    Args:
        model: maps images (B, C, H, W) to logits (B, K).
        loader: yields ``(images (B, C, H, W) float, targets (B,) int64)``.
        device: where to run.
        limit_batches: stop after this many batches.
        bf16: run the model under bf16 autocast (the loss and the ranking use fp32 logits).

    Returns:
        ``{"images": n, "top1": %, "top5": %, "loss": mean CE}``; top-5 is top-K when K < 5.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    n = 0
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (B, k)
        hit = top == y[:, None]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=-1).sum()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        n += y.shape[0]
    if n == 0:
        raise ValueError("the loader yielded no batches")
    return {
        "images": n,
        "top1": 100.0 * correct1.item() / n,  # the only host syncs: once, at the end
        "top5": 100.0 * correct5.item() / n,
        "loss": loss_sum.item() / n,
    }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def format_table(results: Sequence[EvalResult]) -> str:
    """The printed table: one header and one row per result."""
    head = f"{'model':<34} {'weights':<34} {'data':<20} {'images':>8} {'top-1':>7} {'top-5':>7} {'loss':>8}"
    rows = [head]
    for r in results:
        rows.append(
            f"{r.model[:34]:<34} {r.weights[:34]:<34} {r.data[:20]:<20} {r.images:>8d} "
            f"{r.top1:>7.2f} {r.top5:>7.2f} {r.loss:>8.4f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> EvalResult:
    parser = argparse.ArgumentParser(
        prog="python -m diffkd.evaluate",
        description="Top-1/top-5 accuracy and loss of a diffkd checkpoint's student, exported weights or a "
        "registry model on a validation set.",
    )
    parser.add_argument("weights", nargs="?", help="a diffkd .ckpt, or .pth/.safetensors weights for --model")
    parser.add_argument("--model", help="registry name (diffkd.models.list_models(), tv:<name>, timm:<name>)")
    parser.add_argument("--pretrained", action="store_true", help="the registry's published weights for --model")
    parser.add_argument("--ema", action="store_true", help="the EMA weights saved in a .ckpt")
    parser.add_argument("--num-classes", type=int, help="classifier width of --model (default: the data's)")
    parser.add_argument("--data", default="imagenet", help="data config name (conf/data/) or a folder")
    parser.add_argument("--data-dir", help="the data config's data_dir")
    parser.add_argument("--root", help="the data config's root (image_folder)")
    parser.add_argument("--image-size", type=int, help="the data config's image_size")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data config entry, e.g. --set crop_pct=0.95 (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--limit-batches", type=int, help="evaluate only the first N batches")
    parser.add_argument("--json", dest="json_path", help="also write the result to this JSON file")
    args = parser.parse_args(argv)

    dm = build_datamodule(
        args.data, args.data_dir, args.root, args.batch_size, args.num_workers, args.image_size, args.overrides
    )
    num_classes = args.num_classes
    if num_classes is None and not args.pretrained:
        num_classes = getattr(dm, "num_classes", None)
    model, name, weights = load_model(args.weights, args.model, args.pretrained, num_classes, args.ema)
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    dm.setup("validate")
    device = _resolve_device(args.device)
    start = time.perf_counter()
    numbers = evaluate_model(model, dm.val_dataloader(), device, args.limit_batches, args.bf16)
    seconds = time.perf_counter() - start
    data_label = Path(args.data).name if Path(args.data).is_dir() else args.data
    result = EvalResult(
        model=name,
        weights=weights,
        data=f"{data_label} (val)",
        images=int(numbers["images"]),
        top1=numbers["top1"],
        top5=numbers["top5"],
        loss=numbers["loss"],
        seconds=round(seconds, 3),
        device=str(device),
    )
    print(format_table([result]))
    if args.json_path:
        out = Path(args.json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**asdict(result), "source": args.weights, "limit_batches": args.limit_batches}
        out.write_text(json.dumps(payload, indent=2) + "\n")
    if not math.isfinite(result.loss):
        log.warning("the loss is not finite")
    return result


if __name__ == "__main__":
    main()
