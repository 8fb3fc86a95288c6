"""Structured and unstructured pruning, laid out like Torch-Pruning's own split.

- :mod:`compiler.prune.importance` -- which channels matter (the criteria);
- :mod:`compiler.prune.static` -- cutting channels out physically (dependency graph from Torch-Pruning),
  recording and replaying the JSON plan;
- :mod:`compiler.prune.sensitivity` -- how much to cut per layer, from a scan under an accuracy bound;
- :mod:`compiler.prune.unstructured` -- zeroing weights for smaller compressed downloads.
"""
