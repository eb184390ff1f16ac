"""Execute the notebooks top to bottom and keep their outputs (``make notebooks``; tests/test_notebooks.py).

    python notebooks/execute.py                      # every notebooks/*.ipynb → notebooks/executed/
    python notebooks/execute.py 02_denoising --out /tmp/nb --timeout 900

The notebooks run with the repository's ``notebooks/`` as their working folder and write their training runs where
their knobs say (``outputs/notebooks/<name>/`` by default). The committed notebooks stay without outputs; the
executed copies (git-ignored) are for reading. Needs the ``notebooks`` extra: ``pip install -e ".[notebooks]"``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks(names: list[str] | None = None) -> list[Path]:
    """The committed notebooks (``notebooks/*.ipynb``), or those named (with or without ``.ipynb``)."""
    found = sorted(HERE.glob("*.ipynb"))
    if not names:
        return found
    by_name = {p.stem: p for p in found}
    missing = [n for n in names if n.removesuffix(".ipynb") not in by_name]
    if missing:
        raise SystemExit(f"no notebook {missing} in {HERE}; there are {sorted(by_name)}")
    return [by_name[n.removesuffix(".ipynb")] for n in names]


def execute(path: Path, out_dir: Path | None = None, timeout: int = 1800) -> tuple[object, float]:
    """Run the notebook at ``path`` in a fresh kernel (cwd ``notebooks/``); write it with its outputs to
    ``out_dir/<name>`` when given. Returns (the executed notebook, seconds). A failing cell raises nbclient's
    ``CellExecutionError`` after the partly executed notebook is written."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / path.name)
    return nb, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "executed", help="where the executed copies go")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = []
    for path in notebooks(args.names):
        print(f"{path.name} ...", flush=True)
        try:
            _, seconds = execute(path, args.out, args.timeout)
        except Exception as err:  # report every notebook, then fail
            print(f"{path.name}: FAILED ({type(err).__name__}); see {args.out / path.name}\n{err}", flush=True)
            failed.append(path.name)
            continue
        print(f"{path.name}: {seconds:.0f} s → {args.out / path.name}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
