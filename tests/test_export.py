"""Student export: RepDistiller {"model": ...} and safetensors, logits equal to the trained module's."""

import torch

from diffkd.export import export_student, load_student, main
from diffkd.models import create_model, load_weights
from diffkd.train import train


def test_export_round_trip(cifar_cfg, tmp_path, capsys):
    _, objs = train(cifar_cfg("cifar_wrn40_wrn16", "distill=diffkd"))
    ckpt = objs["last_ckpt"]
    main([ckpt, str(tmp_path / "export" / "wrn_16_2")])
    assert "wrote" in capsys.readouterr().out
    pth, st = tmp_path / "export" / "wrn_16_2.pth", tmp_path / "export" / "wrn_16_2.safetensors"
    blob = torch.load(pth, map_location="cpu", weights_only=True)
    assert set(blob) >= {"model"} and not any(k.startswith(("teacher", "distiller")) for k in blob["model"])
    module = objs["module"].cpu().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = module.student(x)
        for source in (pth, st):
            model = create_model("wrn_16_2").eval()
            load_weights(model, source)
            torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(load_student(ckpt)(x), expected)
    assert export_student(ckpt, tmp_path / "only", ("safetensors",)) == [tmp_path / "only.safetensors"]
