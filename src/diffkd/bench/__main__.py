"""``python -m diffkd.bench``: see :mod:`diffkd.bench.classification`."""

from diffkd.bench.classification import main

main()
