"""Delta-aware fine-tuning helpers: make an update cheap to ship before it is shipped.

A fine-tune changes every weight a little, so an update of a fine-tuned bundle is, byte for byte, almost a
new file. :func:`snap_to_grid` moves each new weight tensor onto ``old + k * scale`` with a small integer
``k`` (``bits`` bits, signed) and a power-of-two ``scale`` per tensor, so the device-side ``grid`` codec
(:mod:`agent.delta`) reproduces it exactly from about ``bits`` bits per weight before zstd. The cost is a
rounding of the fine-tune's deltas: measure accuracy after snapping (the benchmark does). The default,
6 bits, cost 0.4 points on the reference architecture where 4 bits cost 15 (docs/ota.md).

:func:`snap_onnx` applies it to every float32 initializer of an exported ONNX file against the old file;
:func:`resign_bundle` re-hashes a bundle's files and signs it as a new version.

>>> new = snap_to_grid(old_weights, tuned_weights, bits=4)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import file_sha256
from agent.contract import MANIFEST_FILENAME, BundleManifest
from agent.signing import load_private_key, sign_manifest

__all__ = ["SnapStats", "finetune_onnx", "perturb_onnx", "resign_bundle", "snap_onnx", "snap_to_grid"]


@dataclass(frozen=True)
class SnapStats:
    """What snapping touched: tensors, weights, and sum |error| / sum |delta| of the fine-tune."""

    tensors: int
    weights: int
    relative_error: float


def snap_to_grid(old: np.ndarray, new: np.ndarray, *, bits: int = 6) -> np.ndarray:
    """``new`` moved to ``old + k * 2**e`` (float32 arithmetic, the device's), ``|k| < 2**(bits-1)``.

    >>> snap_to_grid(np.zeros(3, np.float32), np.array([0.1, -0.05, 0.0], np.float32), bits=4).tolist()
    [0.09375, -0.046875, 0.0]
    """
    old32 = np.asarray(old, np.float32)
    delta = np.asarray(new, np.float64) - old32
    levels = 2 ** (bits - 1) - 1
    top = float(np.abs(delta).max(initial=0.0))
    if top == 0.0 or not np.isfinite(top):
        return np.asarray(new, np.float32).copy()
    scale = np.float32(2.0 ** np.ceil(np.log2(top / levels)))
    k = np.clip(np.rint(delta / scale), -levels, levels).astype(np.float32)
    return (old32 + k * scale).astype(np.float32)


def snap_onnx(old: Path, new: Path, out: Path, *, bits: int = 6) -> SnapStats:
    """Write ``new`` with each float32 initializer snapped against the same-named one of ``old``."""
    import onnx
    from onnx import numpy_helper

    old_model = onnx.load(str(old))
    new_model = onnx.load(str(new))
    before = {i.name: numpy_helper.to_array(i) for i in old_model.graph.initializer}
    tensors = weights = 0
    err = mag = 0.0
    for init in new_model.graph.initializer:
        ref = before.get(init.name)
        arr = numpy_helper.to_array(init)
        if ref is None or ref.shape != arr.shape or arr.dtype != np.float32 or arr.size < 2:
            continue
        snapped = snap_to_grid(ref, arr, bits=bits)
        err += float(np.abs(snapped - arr).sum())
        mag += float(np.abs(arr - ref).sum())
        tensors += 1
        weights += arr.size
        init.CopyFrom(numpy_helper.from_array(snapped, init.name))
    onnx.save(new_model, str(out))
    return SnapStats(tensors=tensors, weights=weights, relative_error=err / mag if mag else 0.0)


def perturb_onnx(path: Path, out: Path, *, seed: int, relative: float = 0.01, bits: int | None = 4) -> int:
    """A synthetic fine-tune for tests: every float32 initializer moves by N(0, relative * its std),
    snapped to the grid when ``bits`` is set. Returns the number of weights changed."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    model = onnx.load(str(path))
    changed = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size < 2:
            continue
        tuned = (arr + rng.normal(0, relative * (float(arr.std()) or 1e-3), arr.shape)).astype(np.float32)
        if bits is not None:
            tuned = snap_to_grid(arr, tuned, bits=bits)
        init.CopyFrom(numpy_helper.from_array(tuned, init.name))
        changed += arr.size
    onnx.save(model, str(out))
    return changed


def resign_bundle(directory: Path, key: Path, *, bundle_version: str | None = None) -> BundleManifest:
    """Re-hash every listed file of ``directory`` (after files were replaced), set ``bundle_version``,
    sign with ``key`` and rewrite ``manifest.json``."""
    manifest = BundleManifest.from_json((directory / MANIFEST_FILENAME).read_bytes())
    variants = []
    for v in manifest.variants:
        files = tuple(
            f.model_copy(
                update={
                    "sha256": file_sha256(directory / f.path),
                    "size_bytes": (directory / f.path).stat().st_size,
                }
            )
            for f in v.files
        )
        variants.append(v.model_copy(update={"files": files}))
    update: dict[str, object] = {"variants": tuple(variants), "signature": None}
    if bundle_version is not None:
        update["bundle_version"] = bundle_version
    signed = sign_manifest(manifest.model_copy(update=update), load_private_key(key))
    (directory / MANIFEST_FILENAME).write_text(signed.model_dump_json(indent=1))
    return signed


# ---- fine-tuning an exported ONNX graph directly -------------------------------------------------


def _onnx_module(model: Any) -> Any:
    """A torch module that runs ``model`` (an onnx ModelProto) with its float initializers as parameters.

    Covers the operators the edgeprune exporters emit for conv nets (Conv, Gemm, MatMul, Relu, Add, Mul,
    Sub, Div, ReduceMean, GlobalAveragePool, AveragePool, MaxPool, Flatten, Reshape, Identity, Clip,
    Sigmoid, Concat, BatchNormalization); anything else raises ``NotImplementedError`` naming it.
    """
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper
    from torch import nn

    class OnnxModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.params = nn.ParameterDict()
            self.names: dict[str, str] = {}
            self.consts: dict[str, torch.Tensor] = {}
            for i, init in enumerate(model.graph.initializer):
                arr = numpy_helper.to_array(init).copy()
                t = torch.from_numpy(arr)
                if arr.dtype == np.float32 and arr.size >= 2:
                    key = f"p{i}"
                    self.params[key] = nn.Parameter(t)
                    self.names[init.name] = key
                else:
                    self.consts[init.name] = t
            self.nodes = list(model.graph.node)
            self.input_name = model.graph.input[0].name
            self.output_name = model.graph.output[0].name

        def value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
            if name in env:
                return env[name]
            if name in self.names:
                return self.params[self.names[name]]
            return self.consts[name]

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: PLR0912 - one branch per operator
            env = {self.input_name: x}
            for node in self.nodes:
                a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
                ins = [self.value(env, n) if n else None for n in node.input]
                op = node.op_type
                if op == "Conv":
                    pads = a.get("pads", [0, 0, 0, 0])
                    y = F.conv2d(
                        ins[0],
                        ins[1],
                        ins[2] if len(ins) > 2 else None,
                        stride=a.get("strides", 1),
                        padding=(pads[0], pads[1]),
                        dilation=a.get("dilations", 1),
                        groups=a.get("group", 1),
                    )
                elif op == "Gemm":
                    w = ins[1].t() if a.get("transB", 0) else ins[1]
                    xa = ins[0].t() if a.get("transA", 0) else ins[0]
                    y = a.get("alpha", 1.0) * xa @ w
                    if len(ins) > 2 and ins[2] is not None:
                        y = y + a.get("beta", 1.0) * ins[2]
                elif op == "MatMul":
                    y = ins[0] @ ins[1]
                elif op == "Relu":
                    y = F.relu(ins[0])
                elif op == "Sigmoid":
                    y = torch.sigmoid(ins[0])
                elif op == "Clip":
                    lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
                    hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
                    y = torch.clamp(ins[0], lo, hi)
                elif op in ("Add", "Mul", "Sub", "Div"):
                    y = {"Add": torch.add, "Mul": torch.mul, "Sub": torch.sub, "Div": torch.div}[op](
                        ins[0], ins[1]
                    )
                elif op == "ReduceMean":
                    axes = a.get("axes") or (ins[1].tolist() if len(ins) > 1 else None)
                    y = ins[0].mean(dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))
                elif op == "GlobalAveragePool":
                    y = ins[0].mean(dim=(2, 3), keepdim=True)
                elif op in ("MaxPool", "AveragePool"):
                    pads = a.get("pads", [0, 0, 0, 0])
                    fn = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
                    y = fn(ins[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), (pads[0], pads[1]))
                elif op == "Flatten":
                    y = torch.flatten(ins[0], a.get("axis", 1))
                elif op == "Reshape":
                    y = ins[0].reshape(
                        [ins[0].shape[i] if s == 0 else s for i, s in enumerate(ins[1].tolist())]
                    )
                elif op == "Identity":
                    y = ins[0]
                elif op == "Concat":
                    y = torch.cat(ins, dim=a["axis"])
                elif op == "BatchNormalization":
                    y = F.batch_norm(
                        ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, a.get("epsilon", 1e-5)
                    )
                else:
                    raise NotImplementedError(f"ONNX operator {op} is not supported by the fine-tune helper")
                env[node.output[0]] = y
            return env[self.output_name]

        def arrays(self) -> dict[str, np.ndarray]:
            return {name: self.params[key].detach().numpy().copy() for name, key in self.names.items()}

    return OnnxModule()


def finetune_onnx(
    path: Path,
    out: Path,
    train: tuple[Any, Any],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    bits: int | None = 6,
    seed: int = 0,
) -> SnapStats:
    """Fine-tune the float initializers of the ONNX graph at ``path`` on ``train`` (x, y tensors) with Adam,
    snap the result to the ``bits`` grid against the original (unless ``None``), write ``out``.

    The graph's structure is untouched, so ``out`` has the same layout: the update is a pure weight delta.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    module = _onnx_module(model)
    before = module.arrays()
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(module(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.arrays()
    tensors = weights = 0
    err = mag = 0.0
    for init in model.graph.initializer:
        if init.name not in after:
            continue
        new = after[init.name]
        if bits is not None:
            snapped = snap_to_grid(before[init.name], new, bits=bits)
            err += float(np.abs(snapped - new).sum())
            mag += float(np.abs(new - before[init.name]).sum())
            new = snapped
        tensors += 1
        weights += new.size
        init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    onnx.save(model, str(out))
    return SnapStats(tensors=tensors, weights=weights, relative_error=err / mag if mag else 0.0)
