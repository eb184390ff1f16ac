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


def _parse(text: str) -> tuple[float, float | None]:
    mean, _, std = text.partition("±")
    return float(mean), (float(std) if std else None)


#: ``{experiment: {method: (mean %, std % or None)}}``.
PAPER_RESULTS: dict[str, dict[str, tuple[float, float | None]]] = {
    pair: {method: _parse(row[i]) for method, row in _TABLE9.items()} for i, pair in enumerate(_TABLE9_PAIRS)
}


def paper_result(experiment: str, method: str) -> tuple[float, float | None] | None:
    """The paper's ``(mean, std)`` for ``method`` on ``experiment``, or ``None`` where the paper has no number."""
    return PAPER_RESULTS.get(experiment, {}).get(method)
