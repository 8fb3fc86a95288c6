"""Delta-aware fine-tuning in torch: a variant rebuilt from its files, fine-tuned, snapped per runtime,
re-exported to .onnx and .pte with the compiler's exporters, shipped as ``grid`` deltas."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.bundle import open_bundle
from agent.contract import MANIFEST_FILENAME
from agent.delta import apply_update, encode, make_update
from agent.signing import KeyPair, load_public_key
from compiler.export import export_onnx, export_pte
from compiler.finetune import (
    export_deployed,
    finetune_deployed,
    rebuild_variant,
    resign_bundle,
    snap_weights,
)
from tests.samples import sample_manifest
from tests.tiny_models import Residual

FILES = {"onnx": "dense.onnx", "executorch": "dense.pte"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory: pytest.TempPathFactory, signing_keys: KeyPair) -> Path:
    """A one-variant bundle of the tiny residual model (BatchNorms with non-trivial statistics, so both
    exporters really fold), exported with the compiler's exporters and signed."""
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("ft") / "v1"
    out.mkdir()
    example = torch.zeros(1, 1, 28, 28)
    export_onnx(model, example, out / FILES["onnx"])
    export_pte(model, example, out / FILES["executorch"])
    sample = sample_manifest()
    dense = next(v for v in sample.variants if v.name == "dense")
    manifest = sample.model_copy(
        update={
            "variants": (dense,),
            "created": sample.created.model_copy(update={"source_model": "tests.tiny_models:residual"}),
        }
    )
    (out / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=1))
    resign_bundle(out, signing_keys.private, bundle_version="1.0.0")
    return out


@pytest.mark.export
def test_snapped_torch_finetune_ships_as_grid_deltas_for_onnx_and_pte(
    old_bundle: Path, signing_keys: KeyPair, tmp_path: Path
) -> None:
    checks = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    # rebuilt from the files alone; it raises unless both re-export byte-identical to the old files
    rebuilt = rebuild_variant(old_bundle, "dense", checks=checks, scratch=tmp_path / "scratch")
    # the two exporters fold BatchNorm with different float32 arithmetic: per-runtime old weights
    assert set(rebuilt.weights) == {"onnx", "executorch"}
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.arange(64) % 10
    tuned = finetune_deployed(rebuilt, (x, y), steps=3, lr=1e-2, batch_size=16, seed=0)
    assert all(not np.array_equal(tuned[k], rebuilt.weights["onnx"][k]) for k in tuned)

    new = tmp_path / "v2"
    shutil.copytree(old_bundle, new)
    raw = tmp_path / "raw.pte"
    export_deployed(rebuilt, tuned, "executorch", raw, checks)
    for runtime, rel in FILES.items():
        snapped, stats = snap_weights(rebuilt.weights[runtime], tuned, bits=4)
        assert stats.weights == sum(v.size for v in tuned.values())
        export_deployed(rebuilt, snapped, runtime, new / rel, checks)
        assert (new / rel).stat().st_size == (old_bundle / rel).stat().st_size  # same layout
    resign_bundle(new, signing_keys.private, bundle_version="2.0.0")

    update = make_update(old_bundle, new, tmp_path / "upd")
    by_path = {f.path: f for f in update.files}
    for rel in FILES.values():
        size = (new / rel).stat().st_size
        assert by_path[rel].method == "grid", by_path[rel]
        assert by_path[rel].artifact_size < 0.2 * size, (rel, by_path[rel].artifact_size, size)
    # the same fine-tune, not snapped: the grid codec has little to hold on to
    old_pte = (old_bundle / FILES["executorch"]).read_bytes()
    raw_grid = encode("grid", raw.read_bytes(), old_pte)
    assert raw_grid is not None and len(raw_grid) > 2 * by_path[FILES["executorch"]].artifact_size
    # snapped against the .onnx file's weights instead of the .pte's own: the folds' last-bit differences
    # fall off the grid, so each runtime's file is snapped against that runtime's old weights
    naive, _ = snap_weights(rebuilt.weights["onnx"], tuned, bits=4)
    export_deployed(rebuilt, naive, "executorch", tmp_path / "naive.pte", checks)
    naive_grid = encode("grid", (tmp_path / "naive.pte").read_bytes(), old_pte)
    assert naive_grid is not None and len(naive_grid) > 2 * by_path[FILES["executorch"]].artifact_size

    target = open_bundle(new, public_key=load_public_key(signing_keys.public))
    written = apply_update(tmp_path / "upd", old_bundle, tmp_path / "rebuilt", target=target)
    want = {f.path: f.sha256 for v in target.variants for f in v.files}
    assert {p.name: _sha(p) for p in written} == want


@pytest.mark.export
def test_bundle_finetune_command_writes_a_signed_version_that_ships_small(
    old_bundle: Path, signing_keys: KeyPair, npz_data: Path, tmp_path: Path
) -> None:
    """`edgeprune bundle finetune`: a new signed version whose update is grid deltas; bad input leaves
    nothing behind."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "edgeprune"
    new = tmp_path / "out" / "v2"
    args = [str(exe), "bundle", "finetune", str(old_bundle), "--data", str(npz_data), "--out", str(new)]
    args += ["--bundle-version", "1.1.0", "--steps", "5", "--bits", "4", "--key", str(signing_keys.private)]
    # the bundle's source model is tests.tiny_models:residual: importable from the repository root
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert "dense: test accuracy" in done.stdout and "bundle diff" in done.stdout
    target = open_bundle(new, public_key=load_public_key(signing_keys.public))
    assert target.bundle_version == "1.1.0"
    update = make_update(old_bundle, new, tmp_path / "upd")
    for f in update.files:
        size = (new / f.path).stat().st_size
        assert f.method == "grid" and f.artifact_size < 0.25 * size, f
    written = apply_update(tmp_path / "upd", old_bundle, tmp_path / "rebuilt", target=target)
    assert {p.name: _sha(p) for p in written} == {f.path: f.sha256 for v in target.variants for f in v.files}
    # an existing --out and a data set of another shape are refused before anything is written
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert sorted(p.name for p in new.parent.iterdir()) == ["v2"]
