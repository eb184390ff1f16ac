"""W&B: offline without credentials, files written; CSV logger as the alternative."""

from __future__ import annotations

import pytest

from diffkd.train import train
from diffkd.utils.loggers import wandb_credentials_available


def test_no_credentials_detected(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials_available()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password key\n")
    assert wandb_credentials_available()


def test_wandb_offline_run_writes_its_files(cifar_cfg, tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cifar_cfg("cifar_wrn40_wrn16", "logger=wandb", "distill=kd", "test=false")
    train(cfg)
    import wandb

    wandb.finish()
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run folder"
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert "wandb sync" in caplog.text


def test_csv_logger_alternative(cifar_cfg, tmp_path):
    train(cifar_cfg("cifar_wrn40_wrn16", "logger=csv", "distill=kd", "test=false"))
    metrics = (tmp_path / "out" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss/logits/kd" in metrics and "val/acc" in metrics


def test_a_resumed_run_continues_its_wandb_run(cifar_cfg, tmp_path):
    import torch

    from diffkd.training import _resume_wandb, _stored_run

    ckpt = tmp_path / "last.ckpt"
    torch.save({"diffkd": {"wandb_id": "abc123"}}, ckpt)
    cfg = cifar_cfg("cifar_wrn40_wrn16", "logger=wandb")
    _resume_wandb(cfg, _stored_run(str(ckpt)))
    assert cfg.logger.wandb.id == "abc123" and cfg.logger.wandb.resume == "allow"
    chosen = cifar_cfg("cifar_wrn40_wrn16", "logger=wandb", "logger.wandb.id=mine")
    _resume_wandb(chosen, _stored_run(str(ckpt)))
    assert chosen.logger.wandb.id == "mine"  # an explicit id wins
