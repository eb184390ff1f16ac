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
