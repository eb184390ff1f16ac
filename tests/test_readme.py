"""The README's plain-PyTorch snippet runs exactly as printed."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_plain_pytorch_snippet_runs():
    text = README.read_text()
    match = re.search(r"<!-- snippet: plain-pytorch.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its plain-PyTorch snippet"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out, loss = namespace["out"], namespace["loss"]
    assert out.student.shape == (16, 32, 8, 8)
    assert loss.isfinite()


def test_new_distance_snippet_registers_a_working_distance():
    import torch

    from diffkd.distill import Distiller, FeatureTaps, get_distance

    text = README.read_text()
    match = re.search(r"<!-- snippet: new-distance.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its new-distance snippet"
    exec(compile(match.group(1), "README.md", "exec"), {})
    assert get_distance("masked_l1").accepts == ("valid_mask",)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    d = Distiller({"p": {"student": "0", "teacher": "0", "distance": {"name": "masked_l1"}}})
    x = torch.randn(2, 3, 6, 8)
    d.build(model, model, x)
    _, feats = FeatureTaps(model, ["0"])(x)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    assert d(feats, {"0": feats["0"] + 1}, {"valid_mask": mask | True}).terms["p/kd"].item() == 1.0
