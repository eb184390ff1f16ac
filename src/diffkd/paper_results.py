"""The paper's published numbers per experiment and method, for ``python -m diffkd.report``'s "paper" column.

Copied from the DiffKD paper's tables as the project's spec transcribes them (``docs/diffkd-spec.md`` §E): keys are
this package's experiment names (``conf/experiment/<name>.yaml``) and ``distill`` config names (``conf/distill/``),
plus ``teacher`` and ``none`` (the student alone). Values are ``(mean, std)`` in percent, ``std`` ``None`` where the
paper prints none. Only the paper's own rows are here: a method the paper does not report on a pair has no entry.
"""

from __future__ import annotations

__all__ = ["PAPER_RESULTS", "PAPER_TABLES", "paper_result"]

#: Which paper table each experiment's numbers come from.
PAPER_TABLES: dict[str, str] = {
    "cifar_wrn40_wrn40_1": "Table 9 (CIFAR-100 top-1, A1)",
    "cifar_res56_res20": "Table 9 (CIFAR-100 top-1, A1)",
    "cifar_res32x4_res8x4": "Table 9 (CIFAR-100 top-1, A1)",
    "cifar_res50_mbv2": "Table 9 (CIFAR-100 top-1, A1)",
    "cifar_res32x4_shuv1": "Table 9 (CIFAR-100 top-1, A1)",
    "cifar_res32x4_shuv2": "Table 9 (CIFAR-100 top-1, A1)",
}

# Table 9 — CIFAR-100, recipe A1, mean ± std over runs as printed (spec §E.7). Columns in the paper's order.
_TABLE9_PAIRS = (
    "cifar_wrn40_wrn40_1",
    "cifar_res56_res20",
    "cifar_res32x4_res8x4",
    "cifar_res50_mbv2",
    "cifar_res32x4_shuv1",
    "cifar_res32x4_shuv2",
)
_TABLE9: dict[str, tuple[str, ...]] = {
    "teacher": ("75.61", "72.34", "79.42", "79.34", "79.42", "79.42"),
    "none": ("71.98", "69.06", "72.50", "64.6", "70.5", "71.82"),
    "fitnet": ("72.24±0.24", "69.21±0.36", "73.50±0.28", "63.16±0.47", "73.59±0.15", "73.54±0.22"),
    "vid": ("73.30±0.13", "70.38±0.14", "73.09±0.21", "67.57±0.28", "73.38±0.09", "73.40±0.17"),
    "rkd": ("72.22±0.20", "69.61±0.06", "71.90±0.11", "64.43±0.42", "72.28±0.39", "73.21±0.28"),
    "pkt": ("73.45±0.19", "70.34±0.04", "73.64±0.18", "66.52±0.33", "74.10±0.25", "74.69±0.34"),
    "crd": ("74.14±0.22", "71.16±0.17", "75.51±0.18", "69.11±0.28", "75.11±0.32", "75.65±0.10"),
    "kd": ("73.54±0.20", "70.66±0.24", "73.33±0.25", "67.35±0.32", "74.07±0.19", "74.45±0.27"),
    "dist": ("74.73±0.24", "71.75±0.30", "76.31±0.19", "68.66±0.23", "76.34±0.18", "77.35±0.25"),
    "diffkd": ("74.09±0.09", "71.92±0.14", "76.72±0.15", "69.21±0.27", "76.57±0.13", "77.52±0.21"),
}


# Table 2 — ImageNet, recipe B1, top-1 (spec §E.1). "Review" is ReviewKD; DiffKD† (DIST on the logits) is
# distill=diffkd_dist. The authors' MSE baseline has no distill config of its own here and is left out.
_TABLE2: dict[str, dict[str, str]] = {
    "imagenet_r34_r18": {"teacher": "73.31", "none": "69.76", "kd": "70.66", "reviewkd": "71.61", "dkd": "71.70",
                         "dist": "72.07", "diffkd": "72.22", "diffkd_dist": "72.49"},
    "imagenet_r50_mbv1": {"teacher": "76.16", "none": "70.13", "kd": "70.68", "reviewkd": "72.56", "dkd": "72.05",
                          "dist": "73.24", "diffkd": "73.62", "diffkd_dist": "73.78"},
}  # fmt: skip

# Table 3 — ImageNet, stronger teachers, recipe B2 (Swin-T: B3), top-1 (spec §E.2).
_TABLE3_METHODS = ("teacher", "none", "kd", "rkd", "srrl", "dist", "diffkd")
_TABLE3: dict[str, tuple[str, ...]] = {
    "imagenet_b2_r50_r34": ("80.1", "76.8", "77.2", "76.6", "76.7", "77.8", "78.1"),
    "imagenet_b2_r50_mbv2": ("80.1", "73.6", "71.7", "73.1", "69.2", "74.4", "74.9"),
    "imagenet_b2_r50_effb0": ("80.1", "78.0", "77.4", "77.5", "77.3", "78.6", "78.8"),
    "imagenet_b2_swinl_r50": ("86.3", "78.5", "80.0", "78.9", "78.6", "80.2", "80.5"),
    "imagenet_b3_swinl_swint": ("86.3", "81.3", "81.5", "81.2", "81.5", "82.3", "82.5"),
}
PAPER_TABLES.update(dict.fromkeys(_TABLE2, "Table 2 (ImageNet top-1, B1)"))
PAPER_TABLES.update(dict.fromkeys(_TABLE3, "Table 3 (ImageNet top-1, B2/B3)"))


def _parse(text: str) -> tuple[float, float | None]:
    mean, _, std = text.partition("±")
    return float(mean), (float(std) if std else None)


#: ``{experiment: {method: (mean %, std % or None)}}``.
PAPER_RESULTS: dict[str, dict[str, tuple[float, float | None]]] = {
    **{pair: {method: _parse(row[i]) for method, row in _TABLE9.items()} for i, pair in enumerate(_TABLE9_PAIRS)},
    **{pair: {method: _parse(text) for method, text in row.items()} for pair, row in _TABLE2.items()},
    **{pair: {method: _parse(text) for method, text in zip(_TABLE3_METHODS, row)} for pair, row in _TABLE3.items()},
}


def paper_result(experiment: str, method: str) -> tuple[float, float | None] | None:
    """The paper's ``(mean, std)`` for ``method`` on ``experiment``, or ``None`` where the paper has no number."""
    return PAPER_RESULTS.get(experiment, {}).get(method)
