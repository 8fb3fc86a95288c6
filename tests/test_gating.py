"""Input-dependent channel gating: surgery, training, both deployment forms, the agent running them."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from agent.bundle import open_bundle
from agent.contract import BudgetInput, BundleManifest, Readings
from agent.policy import Policy, PolicyConfig
from agent.runtime import ModelServer, make_backend
from agent.signing import KeyPair, load_public_key
from bench._gated_if import export_gated_if, load_gated_if, sink_initializers
from compiler.data import TensorData
from compiler.gating.build import calibrate_budget
from compiler.gating.deploy import GatedDeploy
from compiler.gating.slim import (
    GatingError,
    SlimNet,
    budget_shift,
    gating_parts,
    map_tensors,
    order_channels,
    width_choices,
)
from compiler.gating.train import GateTrainConfig, evaluate_gated, train_slim
from compiler.pipeline import CompileResult
from compiler.reference import BasicBlock
from compiler.train import teacher_logits
from tests.conftest import options
from tests.tiny_models import Residual, small_reference


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = small_reference()
    # non-trivial batch-norm statistics, so folding and channel order matter
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 28, 28))
    return net.eval()


def test_width_choices_are_aligned_and_end_at_full() -> None:
    assert width_choices(128, (0.25, 0.5, 0.75, 1.0)) == (32, 64, 96, 128)
    assert width_choices(64, (0.25, 0.5, 0.75, 1.0)) == (16, 32, 48, 64)
    assert width_choices(12, (0.25, 0.5, 1.0)) == (3, 6, 12)


def test_ordering_channels_keeps_the_function() -> None:
    torch.manual_seed(0)
    block = BasicBlock(8, 16, stride=2).train()
    block(torch.randn(8, 8, 12, 12))
    block.eval()
    x = torch.randn(2, 8, 12, 12)
    before = block(x)
    order_channels(block)
    score = block.bn1.weight.abs() * block.conv2.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(score[:-1] >= score[1:]), "not sorted by importance"
    assert torch.allclose(block(x), before, atol=1e-5)


def _slim_trained(teacher: nn.Module | torch.Tensor, data: TensorData) -> dict[str, torch.Tensor]:
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28))
    # 1.5 epochs of 64 over 192 images: the second epoch reshuffles, so rows read out of order show
    config = GateTrainConfig(slim_epochs=1.5, batch_size=64, lr=0.2, precision="fp32")
    return train_slim(slim, data, config, teacher=teacher).state_dict()


def test_shared_widths_distil_from_a_table_as_from_the_dense_model_itself() -> None:
    """The compile computes the dense outputs once for the ladder and the gated variant both."""
    gen = torch.Generator().manual_seed(3)
    data = TensorData(torch.randn(192, 1, 28, 28, generator=gen), torch.randint(0, 10, (192,), generator=gen))
    teacher = _net()
    with torch.no_grad():  # a teacher with outputs far from the student's own, so the term matters
        teacher.head.weight.mul_(5)
    table = teacher_logits(teacher, data)
    assert table is not None
    live = _slim_trained(teacher, data)

    def max_diff(other: dict[str, torch.Tensor]) -> float:
        return max(float((live[k].float() - v.float()).abs().max()) for k, v in other.items())

    assert max_diff(_slim_trained(table, data)) < 1e-5
    # the comparison can tell: the rows of other samples give other weights (1e-3 apart here)
    assert max_diff(_slim_trained(table.roll(1, dims=0), data)) > 1e-4
    with pytest.raises(ValueError, match="augmented"):
        slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28))
        train_slim(slim, data, GateTrainConfig(slim_epochs=0.1, augment=True), teacher=table)


def test_full_width_equals_the_dense_model() -> None:
    net = _net()
    x = torch.randn(4, 1, 28, 28)
    slim = SlimNet(net, x[:1]).eval()
    assert torch.allclose(slim(x), net(x), atol=1e-5)
    _, share, picks = slim.gated(x, 1.0)
    assert share.shape == (4,) and picks.shape == (4, 3)


def test_narrower_widths_cost_fewer_macs() -> None:
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28))
    for macs in slim.block_macs:
        assert macs == sorted(macs) and macs[0] < macs[-1]


def test_a_larger_budget_never_picks_narrower_widths() -> None:
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28)).eval()
    torch.manual_seed(1)
    for gate in slim.gates:
        nn.init.normal_(gate.weight, std=2.0)
        nn.init.normal_(gate.bias, std=2.0)
    x = torch.randn(16, 1, 28, 28)
    previous = None
    for budget in np.linspace(0.0, 1.0, 11):
        _, share, _ = slim.gated(x, float(budget))
        if previous is not None:
            assert torch.all(share >= previous - 1e-6)
        previous = share


def test_budget_shift_is_the_piecewise_linear_map_flat_outside() -> None:
    rng = np.random.default_rng(0)
    xs = np.sort(rng.uniform(0.2, 1.0, 6))
    ys = np.maximum.accumulate(rng.uniform(0.0, 2.0, 6))
    b = rng.uniform(0.0, 1.2, (50, 1)).astype(np.float32)  # per-sample budgets, as in training
    got = budget_shift(torch.from_numpy(b), *map_tensors((tuple(xs), tuple(ys))))
    assert got.shape == (50, 1)
    assert np.allclose(got.numpy(), np.interp(b, xs, ys), atol=1e-5)
    with pytest.raises(ValueError, match="strictly increasing"):
        map_tensors(((0.5, 0.5), (0.0, 1.0)))


def _random_gates(seed: int) -> SlimNet:
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28)).eval()
    torch.manual_seed(seed)
    for gate in slim.gates:
        nn.init.normal_(gate.weight, std=2.0)
        nn.init.normal_(gate.bias, std=1.0)
    return slim


@torch.no_grad()
def test_calibrated_budget_reads_as_the_share_of_gated_compute() -> None:
    """After calibration the realised density at a budget is about the budget (where the gates can reach
    it: these random gates compute 36% at the least), in the deployed form too; without it the raw budget
    is off by far more (the test can fail)."""
    slim = _random_gates(3)
    torch.manual_seed(4)
    data = TensorData(torch.randn(300, 1, 28, 28), torch.zeros(300, dtype=torch.int64))
    budgets = [0.25, 0.4, 0.55, 0.7, 0.85, 1.0]
    raw_error = max(abs(r.density - r.budget) for r in evaluate_gated(slim, data, budgets))
    slim.budget_map = calibrate_budget(slim, data, budgets)
    curve = evaluate_gated(slim, data, budgets)
    floor, reach = curve[0].density, curve[-1].density  # what these gates can do at all
    inside = [r for r in curve if floor <= r.budget <= reach]
    assert len(inside) >= 3
    assert max(abs(r.density - r.budget) for r in inside) <= 0.06 < raw_error
    assert all(a.density <= b.density + 1e-9 for a, b in itertools.pairwise(curve))
    deploy = GatedDeploy(slim).eval()
    for budget in (0.3, 0.5, 0.8):
        for i in range(4):
            logits, _, picks = slim.gated(data.x[i : i + 1], budget)
            got, got_picks = deploy(data.x[i : i + 1], torch.tensor([budget]))
            assert got_picks.tolist() == picks[0].tolist()
            assert torch.allclose(got, logits, atol=1e-4)


def test_model_without_blocks_is_refused_with_a_hint() -> None:
    with pytest.raises(GatingError, match="does not say where its residual blocks are") as info:
        gating_parts(Residual())
    assert "gating_parts" in (info.value.hint or "")


def test_eager_deployment_form_matches_the_gated_net() -> None:
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28)).eval()
    torch.manual_seed(2)
    for gate in slim.gates:
        nn.init.normal_(gate.weight, std=1.0)
    deploy = GatedDeploy(slim).eval()
    x = torch.randn(8, 1, 28, 28)
    for budget in (0.0, 0.3, 0.6, 1.0):
        for i in range(8):
            logits, _, picks = slim.gated(x[i : i + 1], budget)
            got, got_picks = deploy(x[i : i + 1], torch.tensor(budget))
            assert got_picks.tolist() == picks[0].tolist()
            assert torch.allclose(got, logits, atol=1e-4)


def test_sinking_moves_branch_weights_into_their_branch() -> None:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    shared = helper.make_tensor("s", TensorProto.FLOAT, [1], [3.0])
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, [1])]
    )
    other = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, [1])]
    )
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "s"], ["y0"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", 1, [1]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", 1, [1])],
        initializer=[w, shared],
    )
    model = helper.make_model(graph)
    assert sink_initializers(model) == 1
    assert [i.name for i in model.graph.initializer] == ["s"]  # also used outside: stays
    branches = {a.name: a.g for a in model.graph.node[1].attribute}
    assert [i.name for i in branches["then_branch"].initializer] == ["w"]
    assert not branches["else_branch"].initializer
    onnx.checker.check_model(model)


@pytest.mark.export
def test_single_graph_if_form_matches_the_eager_form(tmp_path: Path) -> None:
    # the benchmark's comparison form (bench/_gated_if.py): one graph, each block a tree of If nodes
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28)).eval()
    torch.manual_seed(3)
    for gate in slim.gates:
        nn.init.normal_(gate.weight, std=1.0)
    deploy = GatedDeploy(slim).eval()
    budget = BudgetInput(minimum=0.0, maximum=1.0, default=0.5)
    path = tmp_path / "gated-if.onnx"
    assert export_gated_if(slim, torch.zeros(1, 1, 28, 28), path, budget=budget, widths_output="widths") > 0
    run = load_gated_if(path, budget=budget)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for b in (0.0, 0.5, 1.0):
            for i in range(4):
                expected, picks = deploy(x[i : i + 1], torch.tensor(b))
                got, got_picks = run(x[i : i + 1].numpy(), b)
                assert got_picks == tuple(picks.tolist())
                assert np.abs(got - expected.numpy()).max() < 1e-4


# ------------------------------------------------------------------ the whole compile with --gated


@pytest.fixture(scope="module")
def gated_bundle(
    tmp_path_factory: pytest.TempPathFactory, npz_data: Path, signing_keys: KeyPair
) -> CompileResult:
    from compiler.pipeline import compile_bundle

    old = os.environ.get("EDGEPRUNE_CACHE")
    os.environ["EDGEPRUNE_CACHE"] = str(tmp_path_factory.mktemp("gated-cache"))
    try:
        opts = options(
            tmp_path_factory.mktemp("gated") / "b",
            signing_keys,
            npz_data,
            model="tests.tiny_models:small_reference",
            gated=True,
            gate=GateTrainConfig(slim_epochs=1, gate_epochs=1, batch_size=64),
        )
        return compile_bundle(opts)
    finally:
        if old is None:
            os.environ.pop("EDGEPRUNE_CACHE", None)
        else:
            os.environ["EDGEPRUNE_CACHE"] = old


@pytest.mark.export
@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture compiles a bundle with a gated variant (~2 min on 2 cores)
def test_gated_variant_is_in_the_bundle_with_its_curve(
    gated_bundle: CompileResult, signing_keys: KeyPair
) -> None:
    manifest = open_bundle(gated_bundle.out, public_key=load_public_key(signing_keys.public))
    assert [v.name for v in manifest.variants][:2] == ["dense", "gated"]
    gated = manifest.variant("gated")
    assert gated.kind == "gated" and gated.budget is not None and gated.gating is not None
    assert {f.runtime for f in gated.files} == {"onnx", "executorch"}
    budgets = [p.budget for p in gated.budget_curve]
    assert (
        budgets == sorted(budgets)
        and gated.budget.minimum == budgets[0]
        and gated.budget.maximum == budgets[-1]
    )
    assert gated.budget.default in budgets
    for point in gated.budget_curve:
        assert set(point.latency) == {"onnx", "executorch"}
        assert 0.0 < point.density <= 1.0
    macs = [p.macs for p in gated.budget_curve]
    assert macs == sorted(macs), "more budget must never mean less compute"
    report = (gated_bundle.out / "report" / "report.md").read_text()
    assert "gated: accuracy, compute and latency by budget" in report


@pytest.mark.export
@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "executorch"])
def test_agent_serves_the_gated_variant_at_any_budget(
    gated_bundle: CompileResult, signing_keys: KeyPair, runtime: str
) -> None:
    manifest = open_bundle(gated_bundle.out, public_key=load_public_key(signing_keys.public))
    server = ModelServer(gated_bundle.out, manifest, make_backend(runtime), preload=["gated"])
    server.switch("gated")
    gating = manifest.variant("gated").gating
    assert gating is not None
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
    for image in images:
        low = server.infer(image, budget=0.25)
        high = server.infer(image, budget=1.0)
        assert low.widths is not None and high.widths is not None
        assert all(a <= b for a, b in zip(low.widths, high.widths, strict=True))
        assert low.macs <= high.macs and low.macs == gating.realised(low.widths)[0]
        clamped = server.infer(image, budget=99.0)
        assert clamped.budget == manifest.variant("gated").budget.maximum  # type: ignore[union-attr]
        default = server.infer(image)
        assert default.budget == manifest.variant("gated").budget.default  # type: ignore[union-attr]
        # the top of the range is the `full` segment: every block at its largest width, one call
        assert gating.full_from is not None
        assert gating.full_from <= manifest.variant("gated").budget.maximum  # type: ignore[union-attr]
        at = server.infer(image, budget=gating.full_from)
        for r in (high, at):
            assert r.widths == tuple(len(b.widths) - 1 for b in gating.blocks)
            assert r.macs == gating.realised(r.widths)[0] and r.density == 1.0


@pytest.mark.export
@pytest.mark.slow
def test_gated_executorch_matches_onnx_and_keeps_earlier_results(
    gated_bundle: CompileResult, signing_keys: KeyPair
) -> None:
    # the two runtimes run the same segments: the same widths and logits; and an ExecuTorch output lives
    # in its method's planned memory until copied, so an earlier result must survive later inferences
    manifest = open_bundle(gated_bundle.out, public_key=load_public_key(signing_keys.public))
    servers = {
        rt: ModelServer(gated_bundle.out, manifest, make_backend(rt), preload=["gated"])
        for rt in ("onnx", "executorch")
    }
    for server in servers.values():
        server.switch("gated")
    images = np.random.default_rng(1).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    kept = []
    for image, budget in zip(images, (0.25, 0.5, 0.75, 1.0, 0.25), strict=True):
        et, ort_ = (servers[rt].infer(image, budget=budget) for rt in ("executorch", "onnx"))
        assert et.widths == ort_.widths
        assert np.abs(et.logits - ort_.logits).max() < 1e-4
        kept.append((et.logits, et.logits.copy()))
    for returned, copy in kept:
        np.testing.assert_array_equal(returned, copy)


def test_full_segment_is_the_full_width_net_and_takes_over_at_full_from() -> None:
    """Below ``full_from`` the gates pick; from it up the ``full`` path runs every block at full width,
    and it computes what the gated path computes when every gate picks full width."""
    slim = SlimNet(_net(), torch.zeros(1, 1, 28, 28)).eval()
    torch.manual_seed(2)
    for gate in slim.gates:
        nn.init.normal_(gate.weight, std=1.0)
    deploy = GatedDeploy(slim, full_from=0.9).eval()
    top = [len(b.widths) - 1 for b in slim.blocks]
    below = []
    for x in torch.randn(8, 1, 28, 28).split(1):
        full, picks = deploy(x, torch.tensor(0.95))
        assert picks.tolist() == top
        assert torch.allclose(full, slim(x), atol=1e-4)  # SlimNet's plain forward: every block at full width
        logits, _, gate_picks = slim.gated(x, -1.0)  # a low budget pulls every gate to narrow widths
        got, low = deploy(x, torch.tensor(-1.0))
        assert low.tolist() == gate_picks[0].tolist() and torch.allclose(got, logits, atol=1e-4)
        below.append(low.tolist())
    assert any(b != top for b in below)  # below the threshold the gates still choose


@pytest.mark.export
@pytest.mark.slow
def test_policy_turns_the_budget_down_under_pressure(gated_bundle: CompileResult) -> None:
    # On fixture data every budget scores alike, so the compiler rightly picks the smallest as default;
    # a real bundle's default sits higher. Start from the top to see the policy turn it down.
    manifest: BundleManifest = gated_bundle.manifest
    gated = manifest.variant("gated")
    assert gated.budget is not None
    top = gated.model_copy(
        update={"budget": gated.budget.model_copy(update={"default": gated.budget.maximum})}
    )
    manifest = manifest.model_copy(
        update={"variants": tuple(top if v.name == "gated" else v for v in manifest.variants)}
    )
    policy = Policy(manifest, PolicyConfig(min_dwell_s=0.0, pinned_variant="gated"))
    calm = policy.decide(Readings(battery_pct=90.0, charging=False), now=0.0)
    low = policy.decide(Readings(battery_pct=15.0, charging=False), now=1.0)
    assert calm.variant == low.variant == "gated"
    assert calm.budget is not None and low.budget is not None and low.budget < calm.budget


@pytest.mark.export
@pytest.mark.slow
def test_gate_decisions_depend_on_the_input(gated_bundle: CompileResult, signing_keys: KeyPair) -> None:
    manifest = open_bundle(gated_bundle.out, public_key=load_public_key(signing_keys.public))
    server = ModelServer(gated_bundle.out, manifest, make_backend("onnx"), preload=["gated"])
    images = np.random.default_rng(1).integers(0, 255, (12, 28, 28), dtype=np.uint8)
    differing = []
    for budget in np.linspace(0.25, 1.0, 31):
        widths = {server.infer(image, variant="gated", budget=float(budget)).widths for image in images}
        if len(widths) > 1:
            differing.append(float(budget))
    # at some budgets, different inputs get different widths: the gates read the input, not only the budget
    assert differing, "every input got the same widths at every budget"


@pytest.mark.export
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gated_bundle_bench_times_every_budget_through_the_agent(
    gated_bundle: CompileResult, tmp_path: Path
) -> None:
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gated_bundle as bench  # bench/ is not a package

    out = tmp_path / "bench.json"
    assert (
        bench.main(["--bundle", str(gated_bundle.out), "--runs", "20", "--images", "4", "--json", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    manifest = gated_bundle.manifest
    gated = next(v for v in manifest.variants if v.kind == "gated")
    assert [r["budget"] for r in rows if r["variant"] == "gated"] == [p.budget for p in gated.budget_curve]
    dense = next(r for r in rows if r["variant"] == "dense")
    assert dense["onnx_speedup"] == dense["executorch_speedup"] == 1.0
    assert all(r["onnx_ms"] > 0 and r["executorch_ms"] > 0 for r in rows)


@pytest.mark.broker
@pytest.mark.export
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_its_fleet_and_rollout_on_a_gated_bundle(
    gated_bundle: CompileResult, signing_keys: KeyPair, fixture_data_dir: Path, tmp_path: Path
) -> None:
    """`edgeprune demo --gated` end to end on a bundle with the gated variant (the module's compile,
    handed to the demo as its bundle and key): every agent loads the gated segments, the fleet runs,
    and the new version, gated segments included, rolls out as a delta to every device."""
    import re
    import shutil
    import subprocess

    out = tmp_path / "demo"
    shutil.copytree(gated_bundle.out, out / "bundle")
    (out / "keys").mkdir(parents=True)
    shutil.copy(signing_keys.private, out / "keys" / "edgeprune.key")
    shutil.copy(signing_keys.public, out / "keys" / "edgeprune.pub")
    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).parent / "edgeprune"
    args = [str(exe), "demo", "--gated", "--data", str(fixture_data_dir), "--devices", "3"]
    args += ["--out", str(out), "--min-run", "5"]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reusing" in proc.stdout
    bundle_line = next(line for line in proc.stdout.splitlines() if "signature verified" in line)
    assert "gated (" in bundle_line, bundle_line
    version = proc.stdout.split("==> making ")[1].split(":")[0]
    assert "fleet manager: 3/3 devices registered" in proc.stdout
    assert f"rollout completed: every device committed {version}" in proc.stdout
    summary = proc.stdout.split("==> summary")[1]
    rows = [line.split() for line in summary.splitlines() if line.startswith("    ") and "-000" in line]
    assert len(rows) == 3 and all(row[5] == version for row in rows), summary
    shipped = re.search(r"update shipped: ([\d,]+) bytes per device \(delta\) vs ([\d,]+) bytes", summary)
    assert shipped, summary
    delta_bytes, full_bytes = (int(g.replace(",", "")) for g in shipped.groups())
    assert 0 < delta_bytes < full_bytes
