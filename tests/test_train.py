"""Distillation from a table of teacher outputs: the same training as running the teacher in every step."""

from __future__ import annotations

import copy

import pytest
import torch

import compiler.train as train_module
from compiler.data import TensorData
from compiler.train import TrainConfig, teacher_logits, train
from tests.tiny_models import Residual


def _data(n: int = 384) -> TensorData:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 1, 12, 12, generator=gen) * 0.5
    x[:, :, ::2] += y.view(-1, 1, 1, 1) * 0.5
    return TensorData(x, y)


def _trained(teacher: torch.nn.Module | torch.Tensor | None, data: TensorData) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    student = Residual(classes=4)
    # batches of 64 over 384 samples in 1.5 epochs: the second epoch reshuffles, so a table read in
    # the wrong order would give other targets
    config = TrainConfig(epochs=1.5, batch_size=64, lr=0.05, precision="fp32")
    train(student, data, config, teacher=teacher)
    return student.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_table_of_teacher_outputs_trains_the_student_as_the_teacher_itself_does() -> None:
    data = _data()
    torch.manual_seed(2)
    teacher = Residual(classes=4)
    train(teacher, data, TrainConfig(epochs=4, batch_size=64, lr=0.05, precision="fp32"))
    teacher.train()
    table = teacher_logits(teacher, data, batch_size=100)
    assert table is not None and table.shape == (len(data), 4) and table.dtype == torch.float32
    # computed on a copy: the teacher keeps its mode and layout (the exporters want the default one)
    assert teacher.training and teacher.stem.weight.is_contiguous()
    teacher.eval()

    live = _trained(teacher, data)
    assert _max_diff(live, _trained(table, data)) < 1e-5
    # the comparison can tell: without distillation, or with the rows of another sample, it differs
    assert _max_diff(live, _trained(None, data)) > 1e-2
    assert _max_diff(live, _trained(table.roll(1, dims=0), data)) > 1e-2


def test_a_table_is_refused_for_augmented_training_and_for_other_data() -> None:
    data = _data()
    table = teacher_logits(Residual(classes=4), data)
    assert table is not None
    student = Residual(classes=4)
    with pytest.raises(ValueError, match="augmented"):
        train(student, data, TrainConfig(epochs=0.1, augment=True), teacher=table)
    with pytest.raises(ValueError, match=r"one row per sample \(384, classes\)"):
        train(student, data, TrainConfig(epochs=0.1), teacher=table[:100])
    with pytest.raises(ValueError, match="no training data"):
        teacher_logits(Residual(classes=4), TensorData(data.x[:0], data.y[:0]))


def test_no_table_past_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of N x classes floats beyond the limit is not built (None: run the teacher instead)."""
    data = _data()
    model = Residual(classes=4)
    monkeypatch.setattr(train_module, "TEACHER_TABLE_LIMIT", len(data) * 4 * 4 - 1)
    assert teacher_logits(model, data) is None
    monkeypatch.setattr(train_module, "TEACHER_TABLE_LIMIT", len(data) * 4 * 4)
    assert teacher_logits(copy.deepcopy(model), data) is not None
