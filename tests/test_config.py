"""The one config layer of the tools (:mod:`diffkd.config`): ``conf/`` composed as ``diffkd.train`` composes it,
Hydra's override grammar on a stored config, a run's stored config, and the task a data config declares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffkd.config import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    compose,
    config_name_of,
    data_config_name,
    run_config,
    stored_config,
    task_of_data,
)
from tests.conftest import compose_config


def test_compose_is_trains_composition_with_the_grammar_of_hydra(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFKD_ROOT", str(tmp_path))
    overrides = ["experiment=cifar_wrn40_wrn16", "+extra.note=hi", "~callbacks", "optim.optimizer.lr=0.2"]
    cfg = compose(overrides, tool="evaluate")
    same = compose_config([f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/logs/evaluate", *overrides])
    assert cfg == same  # the Hydra app's train.yaml, defaults list and override grammar: nothing of its own
    assert (cfg.model.student.name, cfg.extra.note, "callbacks" in cfg) == ("wrn_16_2", "hi", False)
    assert cfg.paths.output_dir == f"{tmp_path}/logs/evaluate" and cfg.paths.data_dir == f"{tmp_path}/data"
    assert compose(["~experiment", "data=coco"]).data._target_.endswith("COCODataModule")  # group=option


def test_every_packaged_data_config_declares_its_task():
    tasks = {}
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        tasks[path.stem] = task_of_data(OmegaConf.load(path))
    assert tasks["segmentation_folder"] == "segmentation" and tasks["cityscapes"] == "segmentation"
    assert tasks["coco"] == "detection" and tasks["image_folder"] == tasks["cifar100"] == "classification"
    assert set(tasks.values()) <= {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}


class _NoTask:
    def __init__(self, root: str = "") -> None:
        self.root = root


class _OtherTask(_NoTask):
    task = "captioning"


def test_a_data_module_without_a_task_gets_a_clear_error():
    with pytest.raises(ConfigError, match=r"_NoTask declares no task: give the class a `task: ClassVar\[str\]`"):
        task_of_data({"_target_": f"{__name__}._NoTask"})
    with pytest.raises(ConfigError, match=r"task = 'captioning' names no conf/model/<task>.yaml \(classification"):
        task_of_data({"_target_": f"{__name__}._OtherTask"})
    with pytest.raises(ConfigError, match="no importable class"):
        task_of_data({"_target_": "diffkd.data.NoSuchModule"})


def test_names_of_configs_and_data_arguments(tmp_path):
    assert config_name_of("model", "diffkd.tasks.detection.DetectionModule") == "detection"
    assert config_name_of("model", "diffkd.tasks.DetectionModule") == "detection"  # one class, two import paths
    assert config_name_of("data", "my.own.Module") is None
    assert data_config_name("imagenet") == ("imagenet", None)
    assert data_config_name(str(tmp_path)) == ("image_folder", str(tmp_path))
    with pytest.raises(ValueError, match=r"'nope' is neither a data config \(.*cifar100.*\) nor a folder"):
        data_config_name("nope")


def test_overrides_on_a_stored_config():
    cfg = OmegaConf.create({"data": {"crop_pct": 0.875, "root": "???", "mean": [0.5]}, "model": {"name": "r8"}})
    changes = apply_overrides(cfg, ["crop_pct=0.95", "model.name=r18", "+data.extra=1", "~data.mean", "root=/d"])
    assert [(c.override, c.old, c.new) for c in changes] == [
        ("data.crop_pct=0.95", 0.875, 0.95),  # a key that starts with no config group is relative to data
        ("model.name=r18", "r8", "r18"),
        ("+data.extra=1", None, 1),
        ("~data.mean", [0.5], None),
        ("data.root=/d", None, "/d"),  # ??? counts as present: a plain override sets it
    ]
    assert OmegaConf.to_container(cfg) == {
        "data": {"crop_pct": 0.95, "root": "/d", "extra": 1},
        "model": {"name": "r18"},
    }

    def refused(override: str, message: str, **kwargs) -> None:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(cfg, [override], **kwargs)

    refused("nope=1", r"^nope=1: the config has no data.nope; add it with --set \+data.nope=...$", flag="--set ")
    refused(
        "crop_pt=1", r"the config has no data.crop_pt; add it with \+data.crop_pt=... \(did you mean data.crop_pct\?\)$"
    )
    refused("+crop_pct=1", r"data.crop_pct is already set; override it without '\+' \(or with '\+\+'\)")
    refused("~data.nope", "the config has no data.nope to delete")
    refused("crop_pct=0.9,0.95", r"one value per key \(no sweeps\)")
    refused("model=other", r"model is a config node, not a value: set its entries \(model.<entry>=...\)")
    refused("data=x", "data is a config node, not a value: use --data", node_hints={"data": "use --data <name>"})
    refused("crop_pct=[", "crop_pct=\\[: ")  # Hydra's own parser error
    apply_overrides(cfg, ["++data.crop_pct=0.5", "++data.new=2"])
    assert (cfg.data.crop_pct, cfg.data.new) == (0.5, 2)


def test_run_config_from_a_run_folder_and_from_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    stored = {"paths": {"output_dir": "${hydra:runtime.output_dir}"}, "model": {"a": 1}, "data": {"b": 2}}
    OmegaConf.save(OmegaConf.create(stored), run / ".hydra" / "config.yaml")
    OmegaConf.save(
        OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run)}, "env": {}}}), run / ".hydra" / "hydra.yaml"
    )
    assert run_config(run).paths.output_dir == str(run)  # ${hydra:...} from the run's own hydra.yaml
    assert run_config(run / ".hydra" / "config.yaml").model.a == 1

    checkpoint = {"state_dict": {}, "diffkd": {"config": {"model": {"a": 1}, "data": {"b": 2}}}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    assert OmegaConf.to_container(run_config(tmp_path / "last.ckpt")) == checkpoint["diffkd"]["config"]
    assert stored_config({"state_dict": {}, "diffkd": {"config": {"model": {"a": 1}}}}) is None
    assert stored_config({"state_dict": {}, "diffkd": {"config": {"model": {"a": 1}}}}, complete=False) is not None
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"old.ckpt carries no diffkd run config"):
        run_config(tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"no such file: .*nowhere"):
        run_config(tmp_path / "nowhere")


def test_the_data_layer_imports_no_config_layer():
    code = (
        "import sys, diffkd.data, diffkd.data.check, diffkd.data.coco, diffkd.data.cityscapes, "
        "diffkd.data.image_folder, diffkd.data.segmentation_folder; "
        "print(sorted(m for m in sys.modules if m in ('diffkd.config', 'diffkd.check', 'diffkd.utils.instantiate')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    assert out.stdout.strip() == "[]"
