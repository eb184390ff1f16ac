"""The embedded demos: one protocol (:mod:`diffkd.demos.protocol`: teacher once, seeds × methods, the table) and
one declaration per demo — classification on Fashion-MNIST (:mod:`~diffkd.demos.classification`), detection and
segmentation on synthetic scenes composed from Fashion-MNIST's real pixels (:mod:`~diffkd.demos.detection`,
:mod:`~diffkd.demos.segmentation`, :mod:`~diffkd.demos.scenes`)."""
