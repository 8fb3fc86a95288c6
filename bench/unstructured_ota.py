"""Benchmark: unstructured sparsity shrinks the compressed download, not the latency.

Takes the dense model from a compile's checkpoint cache (or a fresh reference model), zeroes 0/50/70/90%
of its conv and linear weights by magnitude, exports each to ONNX and .pte, and reports raw bytes, zstd-19
bytes (what an OTA download of the file costs) and batch-1 latency side by side in one process.

    python bench/unstructured_ota.py [--checkpoint ~/.cache/edgeprune/dense-KEY.pt] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from compiler.export import EXPORTERS
from compiler.measure import host_description, latency_side_by_side
from compiler.prune.unstructured import compressed_size, sparsify
from compiler.reference import reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="dense state_dict from the compile cache"
    )
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", type=Path, default=Path("out/bench-unstructured.json"))
    args = parser.parse_args(argv)

    model = reference().eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    example = torch.zeros(1, 1, 28, 28)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, dict[str, Path]] = {}
        for s in args.sparsity:
            m = copy.deepcopy(model)
            achieved = sparsify(m, s)
            name = f"sparse-{round(s * 100)}"
            for rt, (suffix, export) in EXPORTERS.items():
                path = Path(tmp) / f"{name}{suffix}"
                export(m, example, path)
                files.setdefault(name, {})[rt] = path
                rows.append(
                    {
                        "variant": name,
                        "sparsity": achieved,
                        "runtime": rt,
                        "bytes": path.stat().st_size,
                        "zstd_bytes": compressed_size(path),
                    }
                )
        x = np.zeros((1, 1, 28, 28), np.float32)
        lat = latency_side_by_side(files, x, runs=args.runs)  # type: ignore[arg-type]
    base = {r["runtime"]: r["zstd_bytes"] for r in rows if r["variant"] == "sparse-0"}
    print(f"host: {host_description()}")
    columns = [
        ("variant", "<11"),
        ("runtime", "<11"),
        ("zeros", ">7"),
        ("bytes", ">11"),
        ("zstd bytes", ">12"),
        ("vs dense", ">10"),
        ("median ms", ">11"),
    ]
    print("".join(f"{name:{fmt}}" for name, fmt in columns))
    for r in rows:
        r["zstd_vs_dense"] = r["zstd_bytes"] / base[r["runtime"]]
        r["median_ms"] = lat[r["variant"]][r["runtime"]].median_ms
        print(
            f"{r['variant']:<11}{r['runtime']:<11}{r['sparsity']:>7.0%}{r['bytes']:>11}{r['zstd_bytes']:>12}"
            f"{r['zstd_vs_dense']:>10.2f}{r['median_ms']:>11.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"host": host_description(), "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
