"""agent.runtime: both backends on the session's compiled bundle, preprocessing, and the model server
(default variant, switching, thread safety, memory cap, corrupt files)."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import onnxruntime as ort
import pytest

from agent.contract import InputSpec
from agent.errors import UserError
from agent.runtime import (
    Backend,
    BackendError,
    ExecutorchBackend,
    LoadedModel,
    ModelServer,
    OnnxBackend,
    _OnnxModel,
    make_backend,
    preprocess,
)
from tests.samples import sample_manifest

if TYPE_CHECKING:
    from compiler.pipeline import CompileResult

VARIANTS: tuple[str, ...] = ("dense", "static-50")


@pytest.fixture(scope="module")
def images(npz_data: Path) -> np.ndarray:
    """Raw uint8 [N, 28, 28] test images of the fixture data set."""
    with np.load(npz_data) as npz:
        return np.asarray(npz["x_test"][:8])


def spec(shape: tuple[int, ...] = (1, 1, 28, 28), layout: str = "NCHW", channels: int = 1) -> InputSpec:
    return InputSpec.model_validate(
        {
            "shape": shape,
            "layout": layout,
            "normalization": {"mean": [0.5] * channels, "std": [0.25] * channels, "scale": 255.0},
            "class_names": ["a", "b"],
        }
    )


def model_path(compiled: CompileResult, variant: str, runtime: str) -> Path:
    f = compiled.manifest.variant(variant).file_for(runtime)  # type: ignore[arg-type]
    assert f is not None
    return compiled.out / f.path


# ------------------------------------------------------------------------------------------- backends


def test_onnx_backend_loads_every_variant(compiled: CompileResult, images: np.ndarray) -> None:
    backend = make_backend("onnx")
    assert isinstance(backend, Backend) and backend.name == "onnx"
    x = preprocess(images[0], compiled.manifest.input)
    for variant in VARIANTS:
        model = backend.load(model_path(compiled, variant, "onnx"))
        assert isinstance(model, LoadedModel)
        logits = model.run(x)
        assert logits.shape == (1, 10) and logits.dtype == np.float32


def test_onnx_sessions_run_with_the_backends_options(compiled: CompileResult) -> None:
    # read back from the session onnxruntime created, not from the options object the backend built
    model = OnnxBackend(threads=2).load(model_path(compiled, "dense", "onnx"))
    session = model.session  # type: ignore[attr-defined]
    opts = session.get_session_options()
    assert opts.enable_cpu_mem_arena is False  # no per-session arena: less resident memory per variant
    assert opts.enable_mem_pattern is True
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(RuntimeError, match="disable_prepacking"):  # never set: weight prepacking stays on
        opts.get_session_config_entry("session.disable_prepacking")


@pytest.mark.export
def test_executorch_backend_matches_onnx_on_every_variant(
    compiled: CompileResult, images: np.ndarray
) -> None:
    onnx, et = make_backend("onnx"), make_backend("executorch")
    assert isinstance(et, ExecutorchBackend) and et.name == "executorch"
    for variant in VARIANTS:
        a = onnx.load(model_path(compiled, variant, "onnx"))
        b = et.load(model_path(compiled, variant, "executorch"))
        for image in images:
            x = preprocess(image, compiled.manifest.input)
            got, expected = b.run(x), a.run(x)
            assert got.shape == expected.shape == (1, 10)
            assert np.abs(got - expected).max() < 1e-4, variant


@pytest.mark.export
def test_executorch_results_are_not_overwritten_by_the_next_run(
    compiled: CompileResult, images: np.ndarray
) -> None:
    model = ExecutorchBackend().load(model_path(compiled, "dense", "executorch"))
    first = model.run(preprocess(images[0], compiled.manifest.input))
    kept = first.copy()
    model.run(preprocess(images[1], compiled.manifest.input))
    np.testing.assert_array_equal(first, kept)


@pytest.mark.export
def test_executorch_threads_size_its_pool_and_leave_results_alone(
    compiled: CompileResult, images: np.ndarray
) -> None:
    from executorch.extension.pybindings import _portable_lib

    x = preprocess(images[0], compiled.manifest.input)
    results = {}
    for threads in (2, 1):
        backend = make_backend("executorch", threads=threads)
        assert _portable_lib._threadpool_get_thread_count() == threads
        results[threads] = backend.load(model_path(compiled, "dense", "executorch")).run(x)
    assert np.abs(results[1] - results[2]).max() < 1e-5
    with pytest.raises(BackendError, match="threads"):
        ExecutorchBackend(threads=0)


@pytest.mark.export
def test_executorch_server_serves_both_variants(compiled: CompileResult, images: np.ndarray) -> None:
    server = ModelServer(compiled.out, compiled.manifest, ExecutorchBackend())
    assert server.available == VARIANTS and server.infer(images[0]).variant == "dense"
    server.switch("static-50")
    assert server.infer(images[0]).variant == "static-50"


@pytest.mark.export
def test_executorch_corrupt_file_is_a_backend_error(compiled: CompileResult, tmp_path: Path) -> None:
    bad = tmp_path / "dense.pte"
    bad.write_bytes(model_path(compiled, "dense", "executorch").read_bytes()[:100])
    with pytest.raises(BackendError, match=r"dense\.pte"):
        ExecutorchBackend().load(bad)


def test_onnx_corrupt_file_is_a_backend_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(BackendError, match=r"broken\.onnx"):
        OnnxBackend().load(bad)


def test_gated_onnx_loads_from_every_segment_only() -> None:
    gated = sample_manifest().variant("gated")
    assert gated.gating is not None and gated.budget is not None
    with pytest.raises(BackendError, match=r"segments \['stem', 'block0_w0'.* missing from the gated ONNX"):
        OnnxBackend().load_gated({}, gating=gated.gating, budget=gated.budget)
    with pytest.raises(BackendError, match="one graph per segment"):
        OnnxBackend().load_gated(Path("gated.onnx"), gating=gated.gating, budget=gated.budget)


def test_make_backend_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(BackendError, match=r"'tflite'.*onnx, executorch") as info:
        make_backend("tflite")
    assert isinstance(info.value, UserError)


def test_make_backend_without_executorch_hints_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # what `import` sees when it is absent
    with pytest.raises(BackendError, match="not installed") as info:
        make_backend("executorch")
    assert info.value.hint == "pip install -c constraints.txt 'edgeprune[executorch]'"


def test_onnx_backend_rejects_zero_threads() -> None:
    with pytest.raises(BackendError, match="threads"):
        OnnxBackend(threads=0)


# -------------------------------------------------------------------------------------- preprocessing


def test_preprocess_uint8_2d_normalises_per_formula() -> None:
    image = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    x = preprocess(image, spec())
    assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[0, 0], (image / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_preprocess_float32_exact_shape_is_passed_through() -> None:
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    out = preprocess(x, spec())
    assert out is x  # already contiguous: no copy, no normalisation


def test_preprocess_float32_non_contiguous_is_made_contiguous() -> None:
    x = np.zeros((1, 1, 28, 56), np.float32)[..., ::2]
    out = preprocess(x, spec())
    assert out.flags.c_contiguous and out.shape == (1, 1, 28, 28)


def test_preprocess_hwc_image_goes_to_nchw_per_channel() -> None:
    image = np.zeros((4, 5, 3), np.uint8)
    image[..., 1] = 255
    s = InputSpec.model_validate(
        {
            "shape": (1, 3, 4, 5),
            "normalization": {"mean": [0.0, 0.5, 1.0], "std": [1.0, 0.5, 0.25], "scale": 255.0},
            "class_names": ["a", "b"],
        }
    )
    x = preprocess(image, s)
    assert x.shape == (1, 3, 4, 5)
    assert x[0, :, 0, 0].tolist() == [0.0, 1.0, -4.0]


def test_preprocess_chw_image_goes_to_nhwc() -> None:
    image = np.stack([np.full((4, 5), v, np.uint8) for v in (0, 255)])
    x = preprocess(image, spec((1, 4, 5, 2), "NHWC", channels=2))
    assert x.shape == (1, 4, 5, 2) and x[0, 0, 0].tolist() == [-2.0, 2.0]


def test_preprocess_rejects_wrong_shape_saying_expected_and_got() -> None:
    with pytest.raises(BackendError, match=r"\(32, 32\).*\(28, 28\)") as info:
        preprocess(np.zeros((32, 32), np.uint8), spec())
    assert isinstance(info.value, UserError)


def test_preprocess_rejects_float64() -> None:
    with pytest.raises(BackendError, match="float64"):
        preprocess(np.zeros((1, 1, 28, 28)), spec())


# ----------------------------------------------------------------------------------------- the server


def onnx_server(compiled: CompileResult, **kw: object) -> ModelServer:
    return ModelServer(compiled.out, compiled.manifest, OnnxBackend(), **kw)  # type: ignore[arg-type]


def test_server_starts_on_dense_with_everything_loaded(compiled: CompileResult, images: np.ndarray) -> None:
    server = onnx_server(compiled)
    assert server.available == VARIANTS and server.loaded == VARIANTS and server.active == "dense"
    result = server.infer(images[0])
    assert result.variant == "dense" and result.macs == compiled.manifest.variant("dense").macs
    assert result.logits.shape == (1, 10) and result.label == int(result.logits.argmax())
    assert result.latency_ms > 0


def test_server_result_matches_the_bare_session(compiled: CompileResult, images: np.ndarray) -> None:
    server = onnx_server(compiled)
    bare = OnnxBackend().load(model_path(compiled, "dense", "onnx"))
    x = preprocess(images[3], compiled.manifest.input)
    np.testing.assert_array_equal(server.infer(images[3]).logits, bare.run(x))
    np.testing.assert_array_equal(server.infer(x).logits, bare.run(x))


def test_switch_changes_variant_and_macs(compiled: CompileResult, images: np.ndarray) -> None:
    server = onnx_server(compiled)
    dense = server.infer(images[0])
    server.switch("static-50")
    small = server.infer(images[0])
    assert server.active == "static-50" and small.variant == "static-50"
    assert small.macs == compiled.manifest.variant("static-50").macs < dense.macs


def test_infer_on_a_named_variant_leaves_the_active_alone(
    compiled: CompileResult, images: np.ndarray
) -> None:
    server = onnx_server(compiled)
    assert server.infer(images[0], variant="static-50").variant == "static-50"
    assert server.active == "dense" and server.infer(images[0]).variant == "dense"


def test_infer_on_a_named_variant_under_a_tiny_cap_loads_and_evicts_it(
    compiled: CompileResult, images: np.ndarray
) -> None:
    server = onnx_server(compiled, memory_cap_mb=1e-6)
    assert server.infer(images[0], variant="static-50").variant == "static-50"
    assert server.loaded == ("dense",) and server.active == "dense"


def test_switch_to_unknown_variant_is_a_backend_error(compiled: CompileResult) -> None:
    server = onnx_server(compiled)
    with pytest.raises(BackendError, match=r"'gated'.*dense"):
        server.switch("gated")
    assert server.active == "dense"


def test_unknown_preload_name_is_a_backend_error(compiled: CompileResult) -> None:
    with pytest.raises(BackendError, match="nope"):
        onnx_server(compiled, preload=["nope"])


def test_preload_empty_loads_only_the_active(compiled: CompileResult) -> None:
    server = onnx_server(compiled, preload=())
    assert server.loaded == ("dense",)
    server.switch("static-50")
    assert server.loaded == VARIANTS


def test_variant_without_a_file_for_the_runtime_is_unavailable(
    compiled: CompileResult, images: np.ndarray
) -> None:
    manifest = compiled.manifest
    dense, small = manifest.variants
    only_pte = small.model_copy(update={"files": tuple(f for f in small.files if f.runtime == "executorch")})
    server = ModelServer(
        compiled.out, manifest.model_copy(update={"variants": (dense, only_pte)}), OnnxBackend()
    )
    assert server.available == ("dense",)
    with pytest.raises(BackendError, match="no onnx file"):
        server.switch("static-50")
    assert server.infer(images[0]).variant == "dense"


def test_preloading_a_variant_without_a_file_skips_it(compiled: CompileResult) -> None:
    manifest = compiled.manifest
    dense, small = manifest.variants
    only_pte = small.model_copy(update={"files": tuple(f for f in small.files if f.runtime == "executorch")})
    server = ModelServer(
        compiled.out,
        manifest.model_copy(update={"variants": (dense, only_pte)}),
        OnnxBackend(),
        preload=VARIANTS,
    )
    assert server.loaded == ("dense",)


def test_switching_during_inferences_drops_and_mixes_nothing(
    compiled: CompileResult, images: np.ndarray
) -> None:
    server = onnx_server(compiled)
    x = images[0]
    expected = {}
    for name in VARIANTS:
        server.switch(name)
        expected[name] = server.infer(x).logits
    server.switch("dense")
    results = []
    errors: list[BaseException] = []
    done = threading.Event()

    switches = [0]

    def infer() -> None:
        # at least 500 inferences and until 20 switches happened among them and both variants served
        # (an inference is a few microseconds: 500 of them can finish inside one GIL time slice of the
        # other thread, which may end on the same variant slice after slice)
        served: set[str] = set()
        try:
            while len(results) < 500 or (
                (switches[0] < 20 or len(served) < len(VARIANTS)) and len(results) < 200_000
            ):
                result = server.infer(x)
                served.add(result.variant)
                results.append(result)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def switch() -> None:
        try:
            while not done.is_set():
                server.switch(VARIANTS[switches[0] % 2])
                switches[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=infer), threading.Thread(target=switch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) >= 500 and switches[0] >= 20
    seen = set()
    for r in results:
        assert r.variant in VARIANTS
        assert r.macs == compiled.manifest.variant(r.variant).macs
        np.testing.assert_allclose(r.logits, expected[r.variant], rtol=1e-5, atol=1e-6)
        seen.add(r.variant)
    assert seen == set(VARIANTS)  # the switches really interleaved with the inferences


def test_memory_cap_below_both_files_keeps_only_the_active(
    compiled: CompileResult, images: np.ndarray
) -> None:
    smallest = min(f.size_bytes for v in compiled.manifest.variants for f in v.files if f.runtime == "onnx")
    server = onnx_server(compiled, memory_cap_mb=smallest / 2 / 1e6)
    assert server.loaded == ("dense",)
    server.switch("static-50")
    assert server.loaded == ("static-50",) and server.infer(images[0]).variant == "static-50"
    server.switch("dense")
    assert server.loaded == ("dense",) and server.infer(images[0]).variant == "dense"


def test_memory_cap_evicts_least_recently_used(compiled: CompileResult) -> None:
    sizes = sum(f.size_bytes for v in compiled.manifest.variants for f in v.files if f.runtime == "onnx")
    server = onnx_server(compiled, memory_cap_mb=sizes / 1e6)
    assert server.loaded == VARIANTS  # both fit
    server.switch("static-50")
    server.switch("dense")
    assert server.loaded == VARIANTS


def test_memory_cap_must_be_positive(compiled: CompileResult) -> None:
    with pytest.raises(BackendError, match="memory_cap_mb"):
        onnx_server(compiled, memory_cap_mb=0)


def test_corrupt_file_fails_the_switch_and_the_previous_variant_keeps_serving(
    compiled: CompileResult, tmp_path: Path, images: np.ndarray
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(compiled.out, copy)
    target = copy / compiled.manifest.variant("static-50").file_for("onnx").path  # type: ignore[union-attr]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    server = ModelServer(copy, compiled.manifest, OnnxBackend(), preload=())
    with pytest.raises(BackendError, match=r"static-50\.onnx"):
        server.switch("static-50")
    assert server.active == "dense" and server.loaded == ("dense",)
    assert server.infer(images[0]).variant == "dense"


def test_corrupt_active_file_fails_the_constructor(compiled: CompileResult, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(compiled.out, copy)
    (copy / "dense.onnx").write_bytes(b"\0" * 64)
    with pytest.raises(BackendError, match=r"dense\.onnx"):
        ModelServer(copy, compiled.manifest, OnnxBackend())


def test_model_with_wrong_output_shape_is_refused(compiled: CompileResult) -> None:
    spec = compiled.manifest.input
    fewer = compiled.manifest.model_copy(
        update={"input": spec.model_copy(update={"class_names": spec.class_names[:5]})}
    )
    with pytest.raises(BackendError, match=r"\(1, 10\).*\(1, 5\)"):
        ModelServer(compiled.out, fewer, OnnxBackend())


def test_onnx_runs_through_the_native_session_only_where_it_matches_the_public_run(tmp_path: Path) -> None:
    from agent.runtime import _onnx_runner
    from tests.test_memory import _conv_model

    session = OnnxBackend(threads=1)._session(_conv_model(tmp_path / "tiny.onnx"))
    x = np.random.default_rng(2).random((1, 1, 28, 28), dtype=np.float32)
    runner = _onnx_runner(session)
    assert runner.__name__ == "native_run"
    np.testing.assert_array_equal(runner({"x": x})[0], session.run(None, {"x": x})[0])

    class Wrong:  # a native object that answers differently (another onnxruntime's signature, say)
        def run(self, names: list[str], feed: dict[str, np.ndarray], options: object) -> list[np.ndarray]:
            return [np.ones((1, 10), np.float32)]

    class Proxy:
        def __init__(self, native: object) -> None:
            self._sess = native

        def __getattr__(self, name: str) -> object:
            return getattr(session, name)

    for native in (Wrong(), None):
        fallback = _onnx_runner(Proxy(native))
        assert fallback.__name__ == "public"
        np.testing.assert_array_equal(fallback({"x": x})[0], session.run(None, {"x": x})[0])


def test_onnx_runs_single_input_graphs_through_an_io_binding_that_keeps_every_result(tmp_path: Path) -> None:
    from tests.test_memory import _conv_model

    model = OnnxBackend(threads=1).load(_conv_model(tmp_path / "tiny.onnx"))
    assert isinstance(model, _OnnxModel) and model._run.__name__ == "bound"
    xs = np.random.default_rng(3).random((4, 1, 1, 28, 28), dtype=np.float32)
    results = [model.run(x) for x in xs]
    for x, got in zip(xs, results, strict=True):  # each result is its own array, not the binding's buffer
        np.testing.assert_array_equal(got, model.session.run(None, {"x": x})[0])
    assert len({r.tobytes() for r in results}) == len(xs)
    # another shape or dtype leaves the binding alone and gets onnxruntime's own complaint
    with pytest.raises(Exception, match=r"(?i)invalid dimensions|shape"):
        model.run(np.zeros((1, 1, 27, 27), np.float32))
    with pytest.raises(Exception, match=r"(?i)type"):
        model.run(np.zeros((1, 1, 28, 28), np.float64))
    np.testing.assert_array_equal(model.run(xs[0]), results[0])


def test_onnx_io_binding_is_used_only_where_its_probe_matches_the_plain_run(tmp_path: Path) -> None:
    from agent.runtime import _onnx_bound, _onnx_runner
    from tests.test_memory import _conv_model

    session = OnnxBackend(threads=1)._session(_conv_model(tmp_path / "tiny.onnx"))

    class Stale:  # a native object whose bound run never writes the output (another onnxruntime, say)
        def run(self, names: list[str], feed: dict[str, np.ndarray], options: object) -> list[np.ndarray]:
            return cast(list[np.ndarray], session._sess.run(names, feed, options))

        def run_with_iobinding(self, binding: object, options: object) -> None:
            return None

    class Proxy:
        def __init__(self, native: object) -> None:
            self._sess = native

        def __getattr__(self, name: str) -> object:
            return getattr(session, name)

    x = np.random.default_rng(4).random((1, 1, 28, 28), dtype=np.float32)
    for proxy in (Proxy(Stale()), Proxy(None)):
        run = _onnx_bound(proxy, _onnx_runner(proxy))
        assert run.__name__ == "unbound"
        np.testing.assert_array_equal(run(x), session.run(None, {"x": x})[0])
