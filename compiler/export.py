"""Export a variant to ExecuTorch (.pte, XNNPACK delegate) and ONNX, then verify each file in its runtime.

Each stage hands the next a checked result, in the manner of ExecuTorch's own lowering: a file enters a
bundle only after it was loaded by its runtime and reproduced the eager outputs on random and real
inputs (:func:`verify`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.contract import Runtime
from agent.runtime import BackendError, make_backend
from compiler.errors import ExportError, VerificationError

__all__ = ["EXPORTERS", "export_onnx", "export_pte", "load_runner", "verify"]

log = logging.getLogger(__name__)

# Noise on every compile that says nothing about the user's model: torch.onnx lists each torchvision
# operator it cannot register (no model here uses one), torchao (pulled in by ExecuTorch) reports CUDA
# kernels and Triton missing on a CPU host, torch's pytree and torch.export's own deserialisation trip
# deprecation checks, and ExecuTorch's pybindings announce that they are experimental.
for _name in ("torch.onnx._internal.exporter._registration", "torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
warnings.filterwarnings(
    "ignore", message="This API is experimental and subject to change", module="executorch"
)

Runner = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def _quiet() -> object:
    # torch.onnx prints its progress to stdout; keep ours clean.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def export_pte(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export -> to_edge_transform_and_lower(XNNPACK) -> to_executorch -> ``path``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.to(memory_format=torch.contiguous_format).eval()  # XNNPACK's layout pass needs NCHW weights
    try:
        program = torch.export.export(model, (example,), strict=False)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        outside = outside_delegate(edge.exported_program())
        lowered = edge.to_executorch()
    except Exception as exc:
        raise ExportError(
            f"ExecuTorch export failed: {type(exc).__name__}: {str(exc)[:500]}",
            hint="the model must be exportable with torch.export (no data-dependent Python control flow)",
        ) from exc
    if outside:
        log.warning(
            "%s: %d op(s) run outside XNNPACK, in ExecuTorch's portable kernels (slow, and each splits the "
            "delegated graph): %s; e.g. a global mean needs keepdim=True (then flatten) to be delegated",
            path.name,
            len(outside),
            ", ".join(outside),
        )
    path.write_bytes(lowered.buffer)


def outside_delegate(program: Any) -> list[str]:
    """Names of the operators of a lowered ExecuTorch program that no delegate took."""
    names = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name != "executorch_call_delegate":
            names.append(name)
    return names


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, input_name: str = "input") -> None:
    """torch.onnx.export with the torch.export-based exporter (``dynamo=True``) -> ``path``."""
    try:
        with _quiet():
            program = torch.onnx.export(
                model.eval(),
                (example,),
                dynamo=True,
                input_names=[input_name],
                output_names=["logits"],
                optimize=True,
                verbose=False,
            )
            program.save(str(path))
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:500]}") from exc


EXPORTERS: dict[Runtime, tuple[str, Callable[[nn.Module, torch.Tensor, Path], None]]] = {
    "executorch": (".pte", export_pte),
    "onnx": (".onnx", export_onnx),
}


def load_runner(path: Path, runtime: Runtime, *, threads: int = 1) -> Runner:
    """A function ``x -> logits`` running ``path`` in ``runtime`` at batch 1.

    It goes through the agent's runtime facade (:mod:`agent.runtime`), so the compiler verifies and times
    exactly what a device will run, with the same session options.
    """
    return make_backend(runtime, threads=threads).load(path).run


def verify(
    model: nn.Module, path: Path, runtime: Runtime, inputs: torch.Tensor, *, atol: float = 1e-4
) -> float:
    """Run ``inputs`` one by one through the file and eager; raise if any logit differs by more than ``atol``.

    Returns the largest absolute difference seen.
    """
    try:
        runner = load_runner(path, runtime)
    except BackendError as exc:
        raise VerificationError(f"{path.name} does not load in {runtime}: {exc}") from exc
    worst = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(inputs.shape[0]):
            x = inputs[i : i + 1].contiguous()
            expected = model(x).numpy()
            try:
                got = runner(x.numpy())
            except Exception as exc:
                raise VerificationError(f"{path.name} failed to run in {runtime}: {exc}") from exc
            if got.shape != expected.shape:
                raise VerificationError(
                    f"{path.name} returns shape {got.shape} in {runtime}, eager {expected.shape}"
                )
            worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= atol:
        raise VerificationError(
            f"{path.name} differs from eager by {worst:.3g} in {runtime} (limit {atol})",
            hint="this is an exporter or runtime bug for this model; the bundle was not written",
        )
    return worst
