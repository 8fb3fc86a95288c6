"""`edgeprune compile` end to end on a tiny model and the fixture data set, and its failure modes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from agent.bundle import BundleError, open_bundle
from agent.contract import BundleManifest
from agent.signing import KeyPair, SignatureError, generate_keys, load_public_key
from compiler.errors import CompileError, ExportError
from compiler.export import load_runner
from compiler.measure import count_macs_params
from compiler.pipeline import CompileResult, compile_bundle
from compiler.prune.plan import PruningPlan
from compiler.prune.static import replay
from compiler.train import TrainConfig
from tests.conftest import options
from tests.tiny_models import Residual

pytestmark = [pytest.mark.export, pytest.mark.slow]


def test_bundle_is_complete_and_signed(compiled: CompileResult, signing_keys: KeyPair) -> None:
    manifest = open_bundle(compiled.out, public_key=load_public_key(signing_keys.public))
    assert [v.name for v in manifest.variants] == ["dense", "static-50"]
    assert [v.kind for v in manifest.variants] == ["dense", "static"]
    for v in manifest.variants:
        assert {f.runtime for f in v.files} == {"onnx", "executorch"}
        assert set(v.latency) == {"onnx", "executorch"}
        assert v.accuracy is not None and 0 <= v.accuracy <= 1
    dense, small = manifest.variants
    assert small.macs < 0.6 * dense.macs and small.params < dense.params
    assert manifest.input.shape == (1, 1, 28, 28) and len(manifest.input.class_names) == 10
    assert (compiled.out / "report" / "pareto.png").stat().st_size > 1000
    assert "static-50" in (compiled.out / "report" / "report.md").read_text()


def test_every_file_runs_and_runtimes_agree(compiled: CompileResult, npz_data: Path) -> None:
    manifest = compiled.manifest
    x = np.load(npz_data)["x_test"][:5].astype(np.float32) / 255.0
    x = ((x - manifest.input.normalization.mean[0]) / manifest.input.normalization.std[0])[:, None]
    for v in manifest.variants:
        onnx = load_runner(compiled.out / v.file_for("onnx").path, "onnx")  # type: ignore[union-attr]
        pte = load_runner(compiled.out / v.file_for("executorch").path, "executorch")  # type: ignore[union-attr]
        for i in range(len(x)):
            sample = x[i : i + 1].copy()
            a, b = onnx(sample), pte(sample)
            assert a.shape == (1, 10)
            assert np.abs(a - b).max() < 1e-4


def test_onnx_input_name_is_the_manifest_input(compiled: CompileResult) -> None:
    session = ort.InferenceSession(str(compiled.out / "dense.onnx"))
    assert session.get_inputs()[0].name == compiled.manifest.input.name


def test_plan_rebuilds_the_variant_architecture(compiled: CompileResult) -> None:
    variant = compiled.manifest.variant("static-50")
    plan = PruningPlan.model_validate_json((compiled.out / variant.plan).read_text())  # type: ignore[operator]
    rebuilt = replay(Residual().eval(), plan)
    assert count_macs_params(rebuilt, torch.zeros(1, 1, 28, 28)) == (variant.macs, variant.params)


def test_no_pickles_in_the_bundle(compiled: CompileResult) -> None:
    for path in compiled.out.rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
            assert path.suffix in {".json", ".onnx", ".pte", ".png", ".md"}


def test_tampered_file_is_refused(compiled: CompileResult, tmp_path: Path, signing_keys: KeyPair) -> None:
    copy = tmp_path / "b"
    shutil.copytree(compiled.out, copy)
    data = bytearray((copy / "static-50.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "static-50.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(copy, public_key=load_public_key(signing_keys.public))


def test_manifest_edit_breaks_the_signature(
    compiled: CompileResult, tmp_path: Path, signing_keys: KeyPair
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(compiled.out, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["variants"][1]["accuracy"] = 0.99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SignatureError):
        open_bundle(copy, public_key=load_public_key(signing_keys.public))


def test_other_key_is_refused(compiled: CompileResult, tmp_path: Path) -> None:
    stranger = generate_keys(tmp_path)
    with pytest.raises(SignatureError, match="signed by key"):
        open_bundle(compiled.out, public_key=load_public_key(stranger.public))


def test_manifest_validates(compiled: CompileResult) -> None:
    assert BundleManifest.from_json((compiled.out / "manifest.json").read_bytes()) == compiled.manifest


def test_existing_output_is_not_overwritten(
    compiled: CompileResult, signing_keys: KeyPair, npz_data: Path
) -> None:
    with pytest.raises(CompileError, match="already exists"):
        compile_bundle(options(compiled.out, signing_keys, npz_data))


def test_export_failure_leaves_nothing_behind(tmp_path: Path, signing_keys: KeyPair, npz_data: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ExportError):
        compile_bundle(
            options(
                out,
                signing_keys,
                npz_data,
                model="tests.tiny_models:data_dependent",
                train=TrainConfig(epochs=0.1, batch_size=64),
                finetune_epochs=0,
                auto=False,
            )
        )
    assert list(tmp_path.iterdir()) == [], "no bundle and no temporary directory may remain"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "edgeprune"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratios", "0.5,1.5"], "CompileError: --ratios value 1.5 is out of range"),
        (["--criterion", "vibes"], "CompileError: unknown --criterion 'vibes'"),
        (
            ["--data", "/nonexistent/data"],
            "CompileError: --data '/nonexistent/data': no such file or directory",
        ),
        (["--model", "nowhere.module:fn"], "CompileError: --model 'nowhere.module:fn': cannot import"),
        (["--key", "/nonexistent/key"], "SignatureError: cannot load private key"),
        (
            ["--out", "/etc/hostname/b"],
            "CompileError: --out /etc/hostname/b lies under /etc/hostname, which is a file",
        ),
    ],
    ids=["ratio", "criterion", "data", "model", "key", "out-under-a-file"],
)
def test_bad_input_is_a_clear_error_before_any_work(
    tmp_path: Path, signing_keys: KeyPair, args: list[str], message: str
) -> None:
    base = {"--out": str(tmp_path / "b"), "--key": str(signing_keys.private), "--data": "fashion-mnist"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    out = run_cli("compile", *[x for kv in base.items() for x in kv])
    assert out.returncode == 1, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "b").exists()


def test_pruned_channel_counts_stay_aligned(compiled: CompileResult) -> None:
    # onnxruntime's fast blocked convolutions need channel counts that are multiples of 8
    import onnx

    model = onnx.load(str(compiled.out / "static-50.onnx"))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    channels = [weights[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"]
    assert channels and all(c % 8 == 0 for c in channels), channels


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_learns_in_both_precisions_and_keeps_float32_weights(precision: str) -> None:
    """bf16 autocast is the default where the CPU has it natively (1.7x faster on the reference model);
    the model it trains is float32 all the same (what export and the runtimes get) and it learns."""
    from compiler.data import TensorData
    from compiler.train import evaluate, train

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (512,), generator=gen)
    x = torch.randn(512, 1, 12, 12, generator=gen) * 0.5
    x[:, :, ::2] += y.view(-1, 1, 1, 1) * 0.5  # each class has its own stripe contrast
    data = TensorData(x, y)
    model = Residual(classes=4)
    before = evaluate(model, data)
    train(model, data, TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=False, precision=precision))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert evaluate(model, data) > max(before, 0.9)


def test_precision_is_checked_and_is_part_of_the_cache_key() -> None:
    from compiler import cache

    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    keys = {cache.cache_key(train=TrainConfig(precision=p)) for p in ("fp32", "bf16")}
    assert len(keys) == 2
