"""The embedded demos beyond classification (``diffkd.demo``): detection (and segmentation) on synthetic scenes
composed from Fashion-MNIST's real pixels (:mod:`diffkd.demos.scenes`)."""
