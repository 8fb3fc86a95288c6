"""The compile report flags the static variants whose speed-up falls short of their MACs reduction."""

from __future__ import annotations

from agent.contract import BundleManifest, Latency
from compiler.report import EFFICIENCY_GOAL, markdown_report
from tests.samples import sample_manifest


def _with_static_latency(ms: dict[str, float]) -> BundleManifest:
    """The sample manifest with every other variant at 1.5 ms and the static one at ``ms`` per runtime."""
    manifest = sample_manifest()

    def latency(per_runtime: dict[str, float]) -> dict[str, Latency]:
        return {rt: Latency(median_ms=t, p90_ms=t, threads=1, runs=100) for rt, t in per_runtime.items()}

    variants = tuple(
        v.model_copy(update={"latency": latency(ms if v.kind == "static" else dict.fromkeys(ms, 1.5))})
        for v in manifest.variants
    )
    return manifest.model_copy(update={"variants": variants})


def test_report_names_a_static_variant_slower_than_its_macs_in_either_runtime() -> None:
    # dense 40M MACs at 1.5 ms, static-50 11M (3.64x fewer): 0.45 ms is 3.33x faster, 0.92 of its MACs;
    # 0.6 ms is 2.5x, 0.69 of them
    report = markdown_report(_with_static_latency({"onnx": 0.45, "executorch": 0.6}), breakdown={}, notes=[])
    assert f"Below {EFFICIENCY_GOAL} of their MACs reduction" in report
    assert "- static-50: speed-up / MACs reduction (3.64x) = onnxruntime 0.92, ExecuTorch 0.69" in report


def test_report_says_nothing_when_every_static_variant_keeps_pace_with_its_macs() -> None:
    report = markdown_report(_with_static_latency({"onnx": 0.45, "executorch": 0.4}), breakdown={}, notes=[])
    assert "of their MACs reduction" not in report
    assert "| static-50 | static |" in report
