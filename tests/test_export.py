"""Every pruned tiny model exports to ExecuTorch (.pte, XNNPACK) and ONNX and reproduces eager outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compiler.errors import ExportError, VerificationError
from compiler.export import EXPORTERS, load_runner, verify
from compiler.prune.static import prunable_groups, prune
from tests.test_prune import X, calibration, make
from tests.tiny_models import TINY_MODELS, DataDependent

pytestmark = pytest.mark.export


@pytest.mark.parametrize("runtime", sorted(EXPORTERS))
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_pruned_variant_round_trips(tmp_path: Path, name: str, runtime: str) -> None:
    model = make(name)
    prune(
        model,
        X,
        ratios={g.root: 0.5 for g in prunable_groups(model, X)},
        criterion="l1",
        calibration=calibration(),
        source_model=name,
    )
    suffix, exporter = EXPORTERS[runtime]  # type: ignore[index]
    path = tmp_path / f"v{suffix}"
    exporter(model, X, path)
    worst = verify(model, path, runtime, torch.randn(6, 1, 28, 28))  # type: ignore[arg-type]
    assert worst < 1e-4


@pytest.mark.parametrize("runtime", sorted(EXPORTERS))
def test_verification_catches_a_wrong_file(tmp_path: Path, runtime: str) -> None:
    suffix, exporter = EXPORTERS[runtime]  # type: ignore[index]
    path = tmp_path / f"v{suffix}"
    exporter(make("residual"), X, path)
    other = make("residual")
    with torch.no_grad():
        other.head.bias.add_(1.0)  # a model that is not the one exported
    with pytest.raises(VerificationError, match="differs from eager"):
        verify(other, path, runtime, torch.randn(2, 1, 28, 28))  # type: ignore[arg-type]


def test_onnx_and_pte_agree(tmp_path: Path) -> None:
    model = make("depthwise")
    for suffix, exporter in EXPORTERS.values():
        exporter(model, X, tmp_path / f"m{suffix}")
    x = torch.randn(1, 1, 28, 28).numpy()
    a = load_runner(tmp_path / "m.onnx", "onnx")(x)
    b = load_runner(tmp_path / "m.pte", "executorch")(x)
    assert abs(a - b).max() < 1e-4


@pytest.mark.parametrize("runtime", sorted(EXPORTERS))
def test_unexportable_model_is_a_clear_error(tmp_path: Path, runtime: str) -> None:
    suffix, exporter = EXPORTERS[runtime]  # type: ignore[index]
    with pytest.raises(ExportError, match="export failed"):
        exporter(DataDependent().eval(), X, tmp_path / f"m{suffix}")
    assert not (tmp_path / f"m{suffix}").exists()


def _lowered_outside(model: torch.nn.Module, example: torch.Tensor) -> list[str]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from compiler.export import outside_delegate

    program = torch.export.export(model.eval(), (example,), strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return outside_delegate(edge.exported_program())


def test_the_reference_model_runs_wholly_inside_xnnpack() -> None:
    """A plain ``x.mean(dim=(2, 3))`` ran in ExecuTorch's slow portable kernel between two delegate calls
    (docs/compiler.md has the cost); guard against its return."""
    from compiler.reference import ReferenceNet

    class PlainMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(1, 8, 3), torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean(dim=(2, 3)))

    example = torch.randn(1, 1, 28, 28)
    assert _lowered_outside(PlainMean(), example) == ["aten.mean.dim"]  # the check can see it
    assert _lowered_outside(ReferenceNet(), example) == []
