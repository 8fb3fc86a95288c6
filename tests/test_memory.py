"""agent.memory: the working-set trim drops only pages that are exact copies of their files, and what runs
afterwards still runs (in this very process: pytest, numpy and onnxruntime keep working after it)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.memory import release_free_heap, trim_code_pages, trimmable_mappings
from agent.runtime import OnnxBackend

SMAPS = """\
7f0000000000-7f0000100000 r-xp 00000000 08:01 42    /usr/lib/libcode.so
Rss:                1024 kB
Private_Clean:      1024 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000100000-7f0000102000 r--p 00100000 08:01 42    /usr/lib/libcode.so
Rss:                   8 kB
Private_Dirty:         8 kB
Anonymous:             8 kB
7f0000102000-7f0000104000 rw-p 00102000 08:01 42    /usr/lib/libcode.so
Rss:                   8 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Rss:                 512 kB
Private_Dirty:       512 kB
Anonymous:           512 kB
7f0000300000-7f0000301000 r--p 00000000 00:00 0    [vvar]
Rss:                   4 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000400000-7f0000410000 r--s 00000000 08:01 43    /var/cache/font.cache
Rss:                  16 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000500000-7f0000510000 r--p 00000000 08:01 44    /usr/lib/libold.so
Rss:                  16 kB
7f0000600000-7f0000610000 r--s 00000000 00:05 45    /dev/nvidia0
Rss:                  16 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000700000-7f0000710000 r-xp 00000000 08:01 46    /opt/my app/lib x.so (deleted)
Rss:                   8 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
"""


def test_only_clean_read_only_file_mappings_are_trimmable() -> None:
    # Relocated (dirty) read-only data, writable data, anonymous memory, kernel pseudo-files and device
    # mappings are never dropped; a mapping whose smaps lacks the dirty counters counts as dirty; paths
    # keep their spaces.
    assert trimmable_mappings(SMAPS) == [
        (0x7F0000000000, 0x7F0000100000, "/usr/lib/libcode.so", 1024 * 1024),
        (0x7F0000400000, 0x7F0000410000, "/var/cache/font.cache", 16 * 1024),
        (0x7F0000700000, 0x7F0000710000, "/opt/my app/lib x.so (deleted)", 8 * 1024),
    ]


def _conv_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((8 * 26 * 26, 10)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializer=[w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps; Linux only")
def test_a_model_gives_the_same_answers_after_the_trim(tmp_path: Path) -> None:
    model = OnnxBackend(threads=1).load(_conv_model(tmp_path / "tiny.onnx"))
    x = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    before = model.run(x)
    release_free_heap()
    result = trim_code_pages()
    assert result.mappings > 0 and result.released_bytes > 0  # onnxruntime's code at least
    assert np.array_equal(model.run(x), before)
    # a model loaded after the trim runs too (its kernels fault back in)
    again = OnnxBackend(threads=1).load(tmp_path / "tiny.onnx")
    assert np.array_equal(again.run(x), before)
