"""The single-graph ONNX form of a gated net, built only for ``bench/gated_speed.py`` to time against the
segments that bundles ship (:mod:`compiler.gating.deploy`).

Each block is a balanced tree of ``torch.cond`` over its widths, exported as ONNX ``If`` nodes. The
exporter leaves every branch's weights in the outer graph, where onnxruntime cannot pre-pack them, so
:func:`sink_initializers` moves each into its branch. :func:`load_gated_if` runs the file with the agent's
onnxruntime session options.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from agent.contract import BudgetInput
from agent.runtime import OnnxBackend
from compiler.export import _quiet
from compiler.gating.deploy import GatedDeploy
from compiler.gating.slim import SlimNet

__all__ = ["export_gated_if", "load_gated_if", "sink_initializers"]


def _cond_tree(
    branches: nn.ModuleList, idx: torch.Tensor, x: torch.Tensor, sc: torch.Tensor, *, lo: int, hi: int
) -> torch.Tensor:
    """Run ``branches[idx]`` through a balanced tree of ``torch.cond`` over ``[lo, hi)``."""
    if hi - lo == 1:
        return cast(torch.Tensor, branches[lo](x, sc))
    mid = (lo + hi) // 2

    def low(x: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return _cond_tree(branches, idx, x, sc, lo=lo, hi=mid)

    def high(x: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return _cond_tree(branches, idx, x, sc, lo=mid, hi=hi)

    return cast(torch.Tensor, torch.cond(idx < mid, low, high, (x, sc)))


class GatedIf(GatedDeploy):
    """:class:`GatedDeploy` with every block a ``torch.cond`` tree, so that one exported graph holds it all.

    Eager, it indexes directly (an eager ``torch.cond`` compiles on every call)."""

    def run_block(
        self, branches: nn.ModuleList, idx: torch.Tensor, h: torch.Tensor, shortcut: torch.Tensor
    ) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().run_block(branches, idx, h, shortcut)
        return _cond_tree(branches, idx, h, shortcut, lo=0, hi=len(branches))


def sink_initializers(model: object) -> int:
    """Move every initializer used only inside one ``If`` branch into that branch, recursively.

    Returns how many moved. Works on an ``onnx.ModelProto`` in place.
    """
    import onnx

    def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
        out = []
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.append(a.g)
            out.extend(a.graphs)
        return out

    def used(graph: onnx.GraphProto) -> set[str]:
        names: set[str] = set()
        for node in graph.node:
            names.update(node.input)
            for g in subgraphs(node):
                names |= used(g)
        return names

    def sink(graph: onnx.GraphProto) -> int:
        here: set[str] = set()
        users: dict[str, list[onnx.GraphProto]] = {}
        for node in graph.node:
            here.update(node.input)
            for g in subgraphs(node):
                for name in used(g):
                    users.setdefault(name, []).append(g)
        keep, moved = [], 0
        for init in graph.initializer:
            owners = {id(g): g for g in users.get(init.name, [])}
            if init.name not in here and len(owners) == 1:
                next(iter(owners.values())).initializer.append(init)
                moved += 1
            else:
                keep.append(init)
        del graph.initializer[:]
        graph.initializer.extend(keep)
        for node in graph.node:
            for g in subgraphs(node):
                moved += sink(g)
        return moved

    return sink(cast(onnx.ModelProto, model).graph)


def export_gated_if(
    slim: SlimNet, example: torch.Tensor, path: Path, *, budget: BudgetInput, widths_output: str
) -> int:
    """``slim`` -> one ONNX graph with ``If`` nodes, branch weights sunk into their branches -> ``path``.

    Inputs ``input`` and ``budget.name``, outputs ``logits`` and ``widths_output``. Returns how many
    weights moved into their branches."""
    import onnx

    b = torch.tensor(budget.default, dtype=torch.float32)
    program = torch.export.export(GatedIf(slim).eval(), (example[:1], b), strict=True)
    with _quiet():
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            input_names=["input", budget.name],
            output_names=["logits", widths_output],
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model_proto
    moved = sink_initializers(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return moved


def load_gated_if(
    path: Path, *, budget: BudgetInput, threads: int = 1
) -> Callable[[np.ndarray, float], tuple[np.ndarray, tuple[int, ...]]]:
    """``(x, budget) -> (logits, width indices)`` of a file from :func:`export_gated_if` in onnxruntime."""
    run = OnnxBackend(threads=threads)._session(path).run

    def call(x: np.ndarray, b: float) -> tuple[np.ndarray, tuple[int, ...]]:
        logits, widths = run(None, {"input": x, budget.name: np.array(b, dtype=np.float32)})
        return logits, tuple(int(i) for i in widths)

    return call
