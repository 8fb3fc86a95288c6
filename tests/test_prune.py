"""Structured pruning on tiny models: consistent surgery, real shrinkage, replayable JSON plans."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler.errors import PruneError
from compiler.measure import count_macs_params
from compiler.prune.importance import CRITERIA
from compiler.prune.plan import PruningPlan
from compiler.prune.static import prunable_groups, prune, replay
from compiler.prune.unstructured import sparsify
from tests.tiny_models import TINY_MODELS, Unprunable

X = torch.zeros(1, 1, 28, 28)


def calibration(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY_MODELS[name]().eval()


# BN-scale scoring needs a BatchNorm in every group: of the tiny models only the residual one has that.
CASES = [(n, c) for n in sorted(TINY_MODELS) for c in sorted(CRITERIA) if c != "bn" or n == "residual"]


@pytest.mark.parametrize(("name", "criterion"), CASES)
def test_prune_half_shrinks_and_runs(name: str, criterion: str) -> None:
    model = make(name)
    macs0, params0 = count_macs_params(model, X)
    groups = prunable_groups(model, X)
    plan = prune(
        model,
        X,
        ratios={g.root: 0.5 for g in groups},
        criterion=criterion,
        calibration=calibration(),
        source_model=name,
    )
    macs1, params1 = count_macs_params(model, X)
    assert macs1 < 0.6 * macs0 and params1 < 0.75 * params0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # shapes still agree everywhere
    assert plan.steps and plan.criterion == criterion


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_plan_json_replays_to_the_same_network(name: str) -> None:
    dense = make(name)
    pruned = copy.deepcopy(dense)
    groups = prunable_groups(dense, X)
    plan = prune(
        pruned, X, ratios={groups[0].root: 0.5}, criterion="l2", calibration=calibration(), source_model=name
    )
    text = plan.model_dump_json()
    rebuilt = replay(copy.deepcopy(dense), PruningPlan.model_validate_json(text))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))
    assert count_macs_params(rebuilt, X) == count_macs_params(pruned, X)


def test_different_criteria_choose_different_channels() -> None:
    chosen = {}
    for crit in ("l1", "activation"):
        model = make("residual")
        plan = prune(
            model, X, ratios={"conv1": 0.5}, criterion=crit, calibration=calibration(), source_model="r"
        )
        chosen[crit] = plan.steps[0].indices
    assert chosen["l1"] != chosen["activation"]


def test_bn_criterion_without_batchnorm_is_a_clear_error() -> None:
    model = make("concat")
    with pytest.raises(PruneError, match="could not score the channels of"):
        prune(
            model,
            X,
            ratios={g.root: 0.5 for g in prunable_groups(model, X)},
            criterion="bn",
            calibration=calibration(),
            source_model="c",
        )


def test_head_keeps_its_classes() -> None:
    model = make("residual")
    prune(
        model,
        X,
        ratios={g.root: 0.75 for g in prunable_groups(model, X)},
        criterion="l1",
        calibration=calibration(),
        source_model="r",
    )
    assert model.head.out_features == 10


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 2.0])
def test_ratio_out_of_range(ratio: float) -> None:
    with pytest.raises(PruneError, match="out of range"):
        prune(
            make("residual"),
            X,
            ratios={"conv1": ratio},
            criterion="l1",
            calibration=calibration(),
            source_model="r",
        )


def test_unknown_layer_is_named() -> None:
    with pytest.raises(PruneError, match="no layer named 'conv9'"):
        prune(
            make("residual"),
            X,
            ratios={"conv9": 0.5},
            criterion="l1",
            calibration=calibration(),
            source_model="r",
        )


def test_unhandled_layer_is_named() -> None:
    with pytest.raises(PruneError, match="layer 'scale' \\(ChannelScale\\)"):
        prunable_groups(Unprunable().eval(), X)


def test_plan_for_another_model_is_refused() -> None:
    plan = prune(
        make("concat"), X, ratios={"a": 0.5}, criterion="l1", calibration=calibration(), source_model="c"
    )
    with pytest.raises(PruneError, match="does not fit"):
        replay(make("residual"), plan)


def test_unstructured_sparsity_zeroes_weights_but_keeps_shapes() -> None:
    model = make("residual")
    shapes = [p.shape for p in model.parameters()]
    achieved = sparsify(model, 0.6)
    assert 0.55 < achieved < 0.65
    assert [p.shape for p in model.parameters()] == shapes
