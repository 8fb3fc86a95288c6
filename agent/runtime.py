"""Run the variants of a verified bundle: runtime backends, input preprocessing and the model server.

* A :class:`Backend` turns one exported file into a :class:`LoadedModel` (``x -> logits``).
  :class:`OnnxBackend` runs ``.onnx`` files with onnxruntime and never imports torch;
  :class:`ExecutorchBackend` runs ``.pte`` files with the ExecuTorch Python runtime, which only accepts
  torch tensors, so it imports torch -- lazily, when it is constructed, never when this module is imported.
* :func:`preprocess` turns a raw image (``uint8``) into the normalised ``float32`` tensor the graphs expect.
* :class:`ModelServer` keeps the variants of one bundle loaded in one backend, switches the active
  variant atomically (safe from any thread while others infer) and can cap the memory the loaded files
  take, evicting the least recently used.

The bundle must have been verified by the caller (:func:`agent.bundle.open_bundle`) first: this module
loads files, it does not check their hashes or the signature.

>>> manifest = open_bundle(bundle, public_key=key)  # doctest: +SKIP
>>> server = ModelServer(bundle, manifest, make_backend("onnx"))  # doctest: +SKIP
>>> server.infer(image).variant, server.switch("static-50")  # doctest: +SKIP
('dense', None)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast, get_args, runtime_checkable

import numpy as np
import onnxruntime as ort

from agent.contract import BudgetInput, BundleManifest, Gating, InputSpec, Runtime
from agent.errors import UserError
from agent.memory import release_free_heap

__all__ = [
    "RUNTIMES",
    "Backend",
    "BackendError",
    "ExecutorchBackend",
    "GatedModel",
    "Inference",
    "LoadedModel",
    "ModelServer",
    "OnnxBackend",
    "make_backend",
    "preprocess",
]

log = logging.getLogger(__name__)

RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
"""Every runtime :func:`make_backend` knows, in the order of :data:`agent.contract.Runtime`."""

EXECUTORCH_HINT = "pip install -c constraints.txt 'edgeprune[executorch]'"
_MB = 1_000_000


class BackendError(UserError):
    """A runtime is unknown or not installed, a model file cannot be loaded or run, or an input does not
    fit the model."""


@runtime_checkable
class LoadedModel(Protocol):
    """One exported file, loaded and ready: ``run`` maps a preprocessed input to logits ``[1, classes]``.

    >>> logits = OnnxBackend().load(Path("dense.onnx")).run(x)  # doctest: +SKIP
    """

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[1, classes]`` for ``x``, a contiguous array of the bundle's input shape and dtype."""
        ...


@runtime_checkable
class GatedModel(Protocol):
    """A gated variant, loaded: ``run`` takes the budget too and also says which width each block used.

    >>> logits, widths = backend.load_gated(path, gating=g, budget=b).run(x, 0.5)  # doctest: +SKIP
    """

    def run(self, x: np.ndarray, budget: float) -> tuple[np.ndarray, tuple[int, ...]]:
        """Logits ``[1, classes]`` and the width index the gate chose for every gated block."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A runtime that loads exported files of one kind (``name``: ``onnx`` -> ``.onnx``, ...).

    >>> isinstance(OnnxBackend(), Backend)
    True
    """

    name: Runtime

    def load(self, path: Path) -> LoadedModel:
        """Load ``path``; :class:`BackendError` naming the file if it cannot be loaded."""
        ...

    def load_gated(
        self, path: Path | Mapping[str, Path], *, gating: Gating, budget: BudgetInput
    ) -> GatedModel:
        """Load a gated variant (see :class:`agent.contract.Gating` for its forms): one file, or one file
        per segment (``{"stem": path, "block0_w0": path, ...}``)."""
        ...


# --------------------------------------------------------------------------------------------- backends


_Feed = dict[str, np.ndarray]

_ONNX_PROBE_DTYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


def _fixed_float(info: Any) -> tuple[tuple[int, ...], type[np.floating[Any]]] | None:
    """Shape and numpy dtype of a graph input or output that is a float tensor of fixed shape, else
    None: what a probe run can be made of, and what an I/O binding can hold."""
    dtype = _ONNX_PROBE_DTYPES.get(info.type)
    shape = tuple(info.shape)
    if dtype is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return cast(tuple[int, ...], shape), dtype


def _onnx_runner(session: Any) -> Callable[[_Feed], list[np.ndarray]]:
    """``feed -> outputs`` for ``session``, through the session's native object when that gives the same
    outputs as the public ``InferenceSession.run``.

    The public ``run`` is a Python wrapper that validates the feed's names and rebuilds the output list on
    every call: about 1.2 us, 3-4% of a 35 us inference of the smallest variant (docs/agent.md). The
    native ``run(output_names, feed, run_options)`` underneath is onnxruntime's private API, so it is used
    only after one probe run on zeros (float inputs with known shapes) matched the public call exactly;
    anything else -- another onnxruntime, other input types -- keeps the public call.
    """
    output_names = [o.name for o in session.get_outputs()]

    def public(feed: _Feed) -> list[np.ndarray]:
        return cast(list[np.ndarray], session.run(output_names, feed))

    native = getattr(getattr(session, "_sess", None), "run", None)
    if native is None:
        return public
    probe: _Feed = {}
    for i in session.get_inputs():
        fixed = _fixed_float(i)
        if fixed is None:
            return public
        probe[i.name] = np.zeros(*fixed)
    try:
        direct = native(output_names, probe, None)
        same = len(direct) == len(output_names) and all(
            np.array_equal(a, b, equal_nan=True) for a, b in zip(direct, public(probe), strict=True)
        )
    except Exception:  # a different native signature: the public call it is
        return public
    if not same:
        return public

    def native_run(feed: _Feed) -> list[np.ndarray]:
        return cast(list[np.ndarray], native(output_names, feed, None))

    return native_run


def _onnx_bound(session: Any, run: Callable[[_Feed], list[np.ndarray]]) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> first output`` for a single-input ``session``, through an I/O binding where that gives the
    same outputs as ``run``, else ``run`` itself.

    The binding holds one input and one output array for the session: a call copies ``x`` into the
    first, runs, and copies the second out, so onnxruntime builds no input value and no output array per
    run. That saves 2-4 us a call here, 5% of the smallest variant's 76 us (docs/agent.md). The arrays
    are shared, so runs take a lock. The binding is used only for one float output and a float input of
    fixed shapes, after a probe run on ones matched ``run`` exactly (a binding that never wrote its output,
    or read its input only when bound, to zeros, fails it); an input of another shape or dtype goes
    through ``run``, which rejects it with onnxruntime's own message.
    """
    (inp,), outputs = session.get_inputs(), session.get_outputs()

    def unbound(x: np.ndarray) -> np.ndarray:
        return run({inp.name: x})[0]

    run_bound = getattr(getattr(session, "_sess", None), "run_with_iobinding", None)
    fixed_in = _fixed_float(inp)
    fixed_out = _fixed_float(outputs[0]) if len(outputs) == 1 else None
    if run_bound is None or fixed_in is None or fixed_out is None:
        return unbound
    x_in, y_out = np.zeros(*fixed_in), np.zeros(*fixed_out)
    lock = threading.Lock()
    try:
        binding = session.io_binding()
        binding.bind_cpu_input(inp.name, x_in)
        binding.bind_output(outputs[0].name, "cpu", 0, y_out.dtype, list(y_out.shape), y_out.ctypes.data)
        native_binding, options = binding._iobinding, ort.RunOptions()
    except Exception:  # another onnxruntime's binding API: the unbound call it is
        return unbound

    def bound(x: np.ndarray) -> np.ndarray:
        if x.shape != x_in.shape or x.dtype != x_in.dtype:
            return unbound(x)
        with lock:
            np.copyto(x_in, x)
            run_bound(native_binding, options)
            return y_out.copy()

    probe = np.ones_like(x_in)
    try:
        same = np.array_equal(bound(probe), unbound(probe), equal_nan=True)
    except Exception:
        return unbound
    return bound if same else unbound


class _OnnxModel:
    __slots__ = ("_run", "session")

    def __init__(self, session: Any) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise BackendError(f"the graph has {len(inputs)} inputs {names}; only single-input graphs run")
        self.session = session
        self._run = _onnx_bound(session, _onnx_runner(session))

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)


_Segment = Callable[[list[Any]], Sequence[Any]]
"""One segment of a gated variant, loaded: its inputs -> its outputs, as the runtime's own values."""


class _GatedSegments:
    """The dispatcher of a gated variant shipped as segments, in either runtime (see
    :class:`agent.contract.Gating`): ``stem``, then per block the segment ``block{i}_w{j}`` the previous
    segment's gate named. Each takes (features, budget) and returns (features, index), the last block's
    (logits,).

    A backend supplies ``segments`` (name -> :data:`_Segment`), ``inputs`` turning the image and the budget
    into its runtime's values, ``logits`` turning the result back into an array, and a ``lock`` where
    runs must not overlap.
    """

    __slots__ = ("_blocks", "_full", "_full_from", "_full_picks", "_inputs", "_lock", "_logits", "_stem")

    def __init__(
        self,
        segments: Mapping[str, _Segment],
        gating: Gating,
        *,
        where: str,
        inputs: Callable[[np.ndarray, float], tuple[Any, Any]],
        logits: Callable[[Any], np.ndarray],
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        wanted = ["stem"] + [
            f"block{i}_w{j}" for i, b in enumerate(gating.blocks) for j in range(len(b.widths))
        ]
        if gating.full_from is not None:
            wanted.append("full")
        missing = [w for w in wanted if w not in segments]
        if missing:
            raise BackendError(f"the gated segments {missing[:4]} are missing from {where}")
        self._stem = segments["stem"]
        self._blocks = [
            [segments[f"block{i}_w{j}"] for j in range(len(b.widths))] for i, b in enumerate(gating.blocks)
        ]
        self._inputs = inputs
        self._logits = logits
        self._lock = nullcontext() if lock is None else lock
        # from full_from up: the `full` segment alone, every block at its largest width
        self._full_from = math.inf if gating.full_from is None else gating.full_from
        self._full = segments.get("full")
        self._full_picks = tuple(len(b.widths) - 1 for b in gating.blocks)

    def run(self, x: np.ndarray, budget: float) -> tuple[np.ndarray, tuple[int, ...]]:
        h, b = self._inputs(x, budget)
        if budget >= self._full_from:
            with self._lock:
                logits = self._logits(cast(_Segment, self._full)([h])[0])
            return logits, self._full_picks
        picks = []
        with self._lock:
            out = self._stem([h, b])
            for widths in self._blocks:
                j = int(out[1].item())  # a 1-element array or tensor; .item() is ~10x cheaper than [0]
                picks.append(j)
                out = widths[j]([out[0], b])
            logits = self._logits(out[0])
        return logits, tuple(picks)


def _onnx_segment(session: Any) -> _Segment:
    """An ONNX graph of two inputs (features, budget) or one (the ``full`` segment's image) as a
    :data:`_Segment` of numpy arrays."""
    names = [i.name for i in session.get_inputs()]
    run = _onnx_runner(session)
    if len(names) == 1:
        only = names[0]
        return lambda values: run({only: values[0]})
    first, second = names
    return lambda values: run({first: values[0], second: values[1]})


def _onnx_inputs(x: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    return x, np.array(budget, dtype=np.float32)


class OnnxBackend:
    """onnxruntime on the CPU: ``intra_op_num_threads=threads``, one inter-op thread, all graph
    optimisations, no CPU memory arena (see :meth:`session_options`). Never imports torch.

    >>> model = OnnxBackend(threads=2).load(Path("bundle/dense.onnx"))  # doctest: +SKIP
    >>> model.run(np.zeros((1, 1, 28, 28), np.float32)).shape  # doctest: +SKIP
    (1, 10)
    """

    name: Runtime = "onnx"

    def __init__(self, *, threads: int = 1) -> None:
        if threads < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        self.threads = threads

    def load(self, path: Path) -> LoadedModel:
        return _OnnxModel(self._session(path))

    def load_gated(
        self, path: Path | Mapping[str, Path], *, gating: Gating, budget: BudgetInput
    ) -> GatedModel:
        if not isinstance(path, Mapping):
            raise BackendError(f"a gated ONNX variant ships one graph per segment, not one file ({path})")
        segments = {name: _onnx_segment(self._session(p)) for name, p in path.items()}
        return _GatedSegments(
            segments, gating, where="the gated ONNX files", inputs=_onnx_inputs, logits=lambda v: v
        )

    def session_options(self) -> Any:
        """The ``onnxruntime.SessionOptions`` every session of this backend is created with.

        No CPU memory arena: with the arena, each session keeps its own pool of chunks for its activations,
        1.5-1.7 MB resident for the reference bundle's four variants; without it the
        few small activation buffers of a batch-1 run come from malloc, and batch-1 latency is the same
        within noise (docs/agent.md, "Numbers"). Memory patterns and weight prepacking stay on: turning
        them off saved nothing measurable here and memory patterns off was up to 4% slower on the
        smallest variant.
        """
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_cpu_mem_arena = False
        return opts

    def _session(self, path: Path) -> Any:
        opts = self.session_options()
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind classes (InvalidProtobuf, NoSuchFile...)
            raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc
        return session

    def __repr__(self) -> str:
        return f"OnnxBackend(threads={self.threads})"


class _ExecutorchModel:
    __slots__ = ("_from_numpy", "_lock", "_method")

    def __init__(self, method: Any, from_numpy: Callable[[np.ndarray], Any]) -> None:
        self._method = method
        self._from_numpy = from_numpy
        # An ExecuTorch Method owns its planned memory: executions of one method must not overlap.
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            out: np.ndarray = self._method.execute([self._from_numpy(x)])[0].numpy()
        return out


_ET_POOL_LOCK = threading.Lock()


class ExecutorchBackend:
    """The ExecuTorch Python runtime (``executorch.runtime``) running ``.pte`` files.

    **Imports torch.** ``executorch.runtime`` accepts and returns only torch tensors, so the constructor
    imports ``torch`` and ``executorch.runtime``, lazily: importing this module or using
    :class:`OnnxBackend` never loads torch. This is the one sanctioned exception to "the agent never
    imports torch" (``docs/architecture.md``; ``tests/test_architecture.py`` allows exactly it).
    Install with ``pip install -c constraints.txt 'edgeprune[executorch]'``; without it the constructor
    raises :class:`BackendError` with that hint.

    ``threads`` sizes ExecuTorch's thread pool, which XNNPACK runs its operators on. The pool is one per
    process and starts with one thread per core; constructing a backend resizes it when its size differs
    (ExecuTorch allows that only while nothing executes, so make backends before serving). The reference
    model's batch-1 operators are too small to gain from a second thread on a 2-core CPU: it only adds
    a synchronisation per operator (docs/compiler.md).

    >>> model = ExecutorchBackend(threads=1).load(Path("bundle/dense.pte"))  # doctest: +SKIP
    >>> model.run(np.zeros((1, 1, 28, 28), np.float32)).shape  # doctest: +SKIP
    (1, 10)
    """

    name: Runtime = "executorch"

    def __init__(self, *, threads: int = 1) -> None:
        if threads < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        try:
            import executorch.runtime as et_runtime
            import torch  # noqa: TID251 -- the opt-in ExecuTorch backend, see the class docstring
            from executorch.extension.pybindings import _portable_lib
        except ImportError as exc:
            raise BackendError(
                f"the ExecuTorch runtime is not installed ({exc})", hint=EXECUTORCH_HINT
            ) from exc
        self.threads = threads
        self._from_numpy: Callable[[np.ndarray], Any] = torch.from_numpy
        self._torch: Any = torch
        self._runtime: Any = et_runtime.Runtime.get()
        with _ET_POOL_LOCK:
            if _portable_lib._threadpool_get_thread_count() != threads:
                _portable_lib._unsafe_reset_threadpool(threads)

    def load(self, path: Path) -> LoadedModel:
        try:
            method = self._runtime.load_program(path).load_method("forward")
        except Exception as exc:  # the pybindings raise a bare RuntimeError with an error code
            raise BackendError(f"ExecuTorch cannot load {path}: {exc}") from exc
        return _ExecutorchModel(method, self._from_numpy)

    def load_gated(
        self, path: Path | Mapping[str, Path], *, gating: Gating, budget: BudgetInput
    ) -> GatedModel:
        if isinstance(path, Mapping):
            raise BackendError("a gated .pte holds every segment as a method of one file, not one file each")
        torch_mod, from_numpy = self._torch, self._from_numpy
        last: list[tuple[float, Any]] = []  # the budget rarely changes: reuse its tensor (a few us a call)

        def inputs(x: np.ndarray, b: float) -> tuple[Any, Any]:
            cached = last[-1] if last else None  # one tuple, replaced whole: safe across threads
            if cached is None or cached[0] != b:
                cached = (b, torch_mod.tensor(b, dtype=torch_mod.float32))
                last[:] = [cached]
            return from_numpy(x), cached[1]

        try:
            program = self._runtime.load_program(path)
            # every method of a gated .pte is a segment: ``stem`` and ``block{i}_w{j}``
            segments = {name: program.load_method(name).execute for name in program.method_names}
            return _GatedSegments(
                segments,
                gating,
                where=str(path),
                inputs=inputs,
                logits=lambda t: t.numpy(),
                lock=threading.Lock(),  # an ExecuTorch Method owns its planned memory: runs must not overlap
            )
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"ExecuTorch cannot load {path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"ExecutorchBackend(threads={self.threads})"


def make_backend(name: str, *, threads: int = 1) -> Backend:
    """The backend for runtime ``name`` (``onnx`` or ``executorch``).

    ``threads`` is onnxruntime's intra-op thread count, or the size of ExecuTorch's thread pool.

    >>> make_backend("onnx", threads=2)
    OnnxBackend(threads=2)
    """
    if name == "onnx":
        return OnnxBackend(threads=threads)
    if name == "executorch":
        return ExecutorchBackend(threads=threads)
    raise BackendError(f"unknown runtime {name!r}; valid runtimes: {', '.join(RUNTIMES)}")


# ---------------------------------------------------------------------------------------- preprocessing


class _Preprocessor:
    """:func:`preprocess` for one :class:`InputSpec`, with the shapes and constants worked out once."""

    def __init__(self, spec: InputSpec) -> None:
        if spec.dtype not in ("float32", "float16"):
            raise BackendError(
                f"inputs of dtype {spec.dtype} are not supported yet; only float32 and float16 graphs run"
            )
        self.shape = spec.shape
        self.dtype = np.dtype(spec.dtype)
        norm = spec.normalization
        # Each accepted uint8 shape and how to view it as spec.shape; the first match wins, so the
        # spec's own layout is preferred when two readings of a shape are possible (e.g. 3x3x3).
        self.accepted: list[tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray]]] = [
            (spec.shape, lambda a: a)
        ]
        if spec.layout == "NC":
            features = spec.shape[1]
            self.accepted.append(((features,), lambda a: a.reshape(spec.shape)))
            if len(norm.mean) not in (1, features):
                raise BackendError(
                    f"normalization has {len(norm.mean)} values for {features} input features; need 1 or "
                    f"{features}"
                )
            channel_shape: tuple[int, ...] = (1, len(norm.mean))
        else:
            if spec.layout == "NCHW":
                _, c, h, w = spec.shape
                chw = (c, h, w), lambda a: a.reshape(spec.shape)
                hwc = (h, w, c), lambda a: a.transpose(2, 0, 1)[None]
                self.accepted += [chw, hwc]
                channel_shape = (1, c, 1, 1)
            else:
                _, h, w, c = spec.shape
                hwc = (h, w, c), lambda a: a.reshape(spec.shape)
                chw = (c, h, w), lambda a: a.transpose(1, 2, 0)[None]
                self.accepted += [hwc, chw]
                channel_shape = (1, 1, 1, c)
            if c == 1:
                self.accepted.append(((h, w), lambda a: a.reshape(spec.shape)))
        self.scale = np.float32(norm.scale)
        self.mean = np.asarray(norm.mean, np.float32).reshape(channel_shape)
        self.std = np.asarray(norm.std, np.float32).reshape(channel_shape)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype == self.dtype and image.shape == self.shape:
            return np.ascontiguousarray(image)
        if image.dtype == np.uint8:
            for shape, arrange in self.accepted:
                if image.shape == shape:
                    x = arrange(image).astype(np.float32, order="C")
                    x /= self.scale
                    x -= self.mean
                    x /= self.std
                    return x if self.dtype == np.float32 else x.astype(self.dtype)
        accepted = " or ".join(str(s) for s, _ in self.accepted)
        raise BackendError(
            f"input has shape {image.shape} and dtype {image.dtype}; expected uint8 of shape {accepted}, "
            f"or already-normalised {self.dtype} of shape {self.shape}"
        )


def preprocess(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The model input for ``image``: a contiguous array of ``spec.shape`` and ``spec.dtype``.

    ``image`` is either raw ``uint8`` -- ``[H, W]`` (one channel), ``[H, W, C]``, ``[C, H, W]`` or exactly
    ``spec.shape`` -- normalised per channel as ``(pixel / scale - mean) / std``, or an already-normalised
    float array of exactly ``spec.shape`` and ``spec.dtype``, returned as is (made contiguous if needed).
    Anything else raises :class:`BackendError` with the expected and the actual shape.

    >>> spec = InputSpec(shape=(1, 1, 2, 2), normalization={"mean": [0.5], "std": [0.5], "scale": 255},
    ...                  class_names=["a", "b"])
    >>> preprocess(np.array([[0, 255], [255, 0]], np.uint8), spec).tolist()
    [[[[-1.0, 1.0], [1.0, -1.0]]]]
    """
    return _Preprocessor(spec)(image)


# ------------------------------------------------------------------------------------------ the server


@dataclass(slots=True)
class Inference:
    """The result of :meth:`ModelServer.infer`. (Not frozen: a frozen dataclass spends about 0.7 us per
    inference in its ``__init__``, 2% of a static-75 inference; nothing keeps or shares these.)

    ``latency_ms`` is the model's execution alone (preprocessing excluded), comparable to the latency the
    manifest records; ``macs`` is what this inference computed: the variant's MACs, or for a gated variant
    what the widths its gates chose cost; ``density`` the share of the gated channels computed (1.0 for a
    variant without gates); ``budget`` the budget a gated variant ran at.
    """

    logits: np.ndarray
    variant: str
    latency_ms: float
    macs: int
    density: float = 1.0
    budget: float | None = None
    widths: tuple[int, ...] | None = None

    @property
    def label(self) -> int:
        """The index of the largest logit (computed when asked: most inferences are never asked)."""
        return int(self.logits.argmax())


@dataclass(frozen=True, slots=True)
class _Slot:
    name: str
    model: LoadedModel | GatedModel
    macs: int
    size_bytes: int
    gating: Gating | None = None
    default_budget: float | None = None
    budget_range: tuple[float, float] | None = None


class ModelServer:
    """The variants of one verified bundle, loaded in one backend, one of them active.

    ``manifest`` must come from :func:`agent.bundle.open_bundle` on ``bundle``: files are loaded
    without further checks. A variant is *available* when it ships a file for ``backend.name``.

    The active variant (initially the first available one, ``dense`` by convention) is loaded at once;
    ``preload`` names the other variants to load up front (``None``: all available ones; names without a
    file for this runtime are skipped with a warning, unknown names raise). With ``memory_cap_mb``, at
    most that many megabytes (10**6 bytes) of model files (estimated by their size) stay loaded: variants
    load when needed and the least recently used ones are evicted, never the active one, which is always
    loaded (so while switching, the old and the new active both are).

    Thread-safe: :meth:`switch` may run in any thread while others call :meth:`infer`. An inference
    runs entirely on the variant that was active when it started; a variant evicted meanwhile is freed
    when its last inference ends.

    >>> server = ModelServer(bundle, open_bundle(bundle, public_key=key), OnnxBackend())  # doctest: +SKIP
    >>> server.available, server.active  # doctest: +SKIP
    (('dense', 'static-50'), 'dense')
    >>> server.switch("static-50"); server.infer(image).variant  # doctest: +SKIP
    'static-50'
    """

    def __init__(
        self,
        bundle: Path,
        manifest: BundleManifest,
        backend: Backend,
        *,
        preload: Sequence[str] | None = None,
        memory_cap_mb: float | None = None,
    ) -> None:
        if memory_cap_mb is not None and not memory_cap_mb > 0:
            raise BackendError(f"memory_cap_mb must be > 0, got {memory_cap_mb}")
        self._bundle = bundle
        self._manifest = manifest
        self._backend = backend
        self._cap_bytes = None if memory_cap_mb is None else memory_cap_mb * _MB
        self._prep = _Preprocessor(manifest.input)
        self._out_shape = (1, len(manifest.input.class_names))
        self._files: dict[str, tuple[Path, int]] = {}
        # a gated variant shipped as one graph per segment loads from all of them
        self._segments: dict[str, dict[str, Path]] = {}
        for variant in manifest.variants:
            files = variant.files_for(backend.name)
            if files:
                self._files[variant.name] = (bundle / files[0].path, sum(f.size_bytes for f in files))
                if files[0].segment is not None:
                    self._segments[variant.name] = {str(f.segment): bundle / f.path for f in files}
        if not self._files:
            raise BackendError(
                f"bundle {manifest.model_id} {manifest.bundle_version} has no variant for runtime "
                f"{backend.name}",
                hint=f"runtimes it ships: {sorted({f.runtime for v in manifest.variants for f in v.files})}",
            )
        # Guards _slots and _current; held only for bookkeeping, never while a model loads or runs.
        self._lock = threading.Lock()
        # Serialises loads and switches, so two switches never load the same file twice.
        self._switch_lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        wanted = list(self._files) if preload is None else list(preload)
        for name in wanted:
            if name not in self._files:
                if name not in {v.name for v in manifest.variants}:
                    self._check_available(name)  # raises, naming the variants that exist
                log.warning("not preloading %s: it has no %s file", name, backend.name)
        first = next(iter(self._files))
        self._current = self._load(first)
        self._slots[first] = self._current
        for name in wanted:
            if name == first or name not in self._files or name in self._slots:
                continue
            size = self._files[name][1]
            if self._cap_bytes is not None and self._loaded_bytes() + size > self._cap_bytes:
                log.info("not preloading %s: it would exceed the %.3f MB memory cap", name, memory_cap_mb)
                continue
            slot = self._load(name)
            with self._lock:
                self._slots[name] = slot
                self._slots.move_to_end(first)  # the active stays the most recently used
        log.info("serving %s with %s; loaded %s", self.available, backend.name, self.loaded)

    @property
    def available(self) -> tuple[str, ...]:
        """Variants that ship a file for this backend's runtime, in manifest order."""
        return tuple(self._files)

    @property
    def loaded(self) -> tuple[str, ...]:
        """Variants loaded now, in manifest order."""
        with self._lock:
            return tuple(name for name in self._files if name in self._slots)

    @property
    def active(self) -> str:
        """The variant new inferences run on."""
        return self._current.name

    def switch(self, name: str) -> None:
        """Make ``name`` the active variant, loading it first if needed.

        Raises :class:`BackendError` for an unknown variant, one without a file for this runtime, or a
        file that fails to load; the previous variant then stays active. Inferences already running
        finish on the variant they started on.
        """
        self._check_available(name)
        with self._switch_lock:
            slot = self._acquire(name)
            with self._lock:
                previous = self._current.name
                self._current = slot
                self._slots[name] = slot
                self._slots.move_to_end(name)
                self._evict()
        if previous != name:
            log.info("switched from %s to %s", previous, name)

    def infer(self, x: np.ndarray, *, variant: str | None = None, budget: float | None = None) -> Inference:
        """Preprocess ``x`` (see :func:`preprocess`) and run it on the active variant.

        ``variant`` runs it on that variant instead, without switching (a shadow run to compare
        variants); it is loaded if needed and, under a memory cap, may be evicted again right after.
        ``budget`` is the gating budget for a gated variant (default: the manifest's default; clamped to
        its range); variants without gates ignore it.

        >>> server.infer(np.zeros((28, 28), np.uint8)).label  # doctest: +SKIP
        3
        """
        # the active slot is one reference read (atomic; a switch replaces it whole), no lock needed
        slot = self._current if variant is None else self._slot_for(variant)
        data = self._prep(x)
        if slot.gating is None:
            start = time.perf_counter()
            logits = cast(LoadedModel, slot.model).run(data)
            latency_ms = _ms_since(start)
            return Inference(
                logits=logits,
                variant=slot.name,
                latency_ms=latency_ms,
                macs=slot.macs,
            )
        assert slot.budget_range is not None and slot.default_budget is not None
        lo, hi = slot.budget_range
        b = min(max(slot.default_budget if budget is None else float(budget), lo), hi)
        start = time.perf_counter()
        logits, widths = cast(GatedModel, slot.model).run(data, b)
        latency_ms = _ms_since(start)
        macs, density = slot.gating.realised(widths)
        return Inference(
            logits=logits,
            variant=slot.name,
            latency_ms=latency_ms,
            macs=macs,
            density=density,
            budget=b,
            widths=widths,
        )

    def _slot_for(self, name: str) -> _Slot:
        """``name``'s slot, loaded if needed, without making it active."""
        self._check_available(name)
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                self._slots.move_to_end(name)
                return slot
        with self._switch_lock:
            slot = self._acquire(name)
            with self._lock:
                self._slots[name] = slot
                self._slots.move_to_end(name)
                self._evict()
        return slot

    def _acquire(self, name: str) -> _Slot:
        """``name``'s slot, loading it (outside ``_lock``: inferences go on meanwhile) if not loaded.

        Call with ``_switch_lock`` held. Makes room under the cap first, so at most the active and the
        new variant are over it."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                return slot
            self._evict(reserve=self._files[name][1])
        return self._load(name)

    def _check_available(self, name: str) -> None:
        if name in self._files:
            return
        names = [v.name for v in self._manifest.variants]
        if name not in names:
            raise BackendError(f"no variant {name!r}; the bundle has {names}")
        raise BackendError(
            f"variant {name!r} has no {self._backend.name} file; available: {list(self._files)}",
            hint="use a backend for a runtime the variant ships",
        )

    def _loaded_bytes(self) -> int:
        return sum(slot.size_bytes for slot in self._slots.values())

    def _evict(self, *, reserve: int = 0) -> None:
        """Drop least recently used variants (never the active) until the loaded files plus ``reserve``
        bytes fit the memory cap. Call with ``_lock`` held."""
        if self._cap_bytes is None:
            return
        for name in list(self._slots):
            if self._loaded_bytes() + reserve <= self._cap_bytes:
                return
            if name != self._current.name:
                del self._slots[name]
                log.info("evicted %s to stay under the memory cap", name)

    def _load(self, name: str) -> _Slot:
        """Load ``name`` and check it once on zeros: runs, and gives logits of the right shape."""
        path, size = self._files[name]
        variant = self._manifest.variant(name)
        started = time.perf_counter()
        zeros = np.zeros(self._manifest.input.shape, self._prep.dtype)
        model: LoadedModel | GatedModel
        try:
            if variant.gating is not None and variant.budget is not None:
                model = self._backend.load_gated(
                    self._segments.get(name, path), gating=variant.gating, budget=variant.budget
                )
                out, _ = model.run(zeros, variant.budget.default)
            else:
                model = self._backend.load(path)
                out = model.run(zeros)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"{path} loaded but fails to run in {self._backend.name}: {exc}") from exc
        if out.shape != self._out_shape:
            raise BackendError(
                f"{path} returns shape {out.shape}; the manifest's {self._out_shape[1]} classes need "
                f"{self._out_shape}"
            )
        release_free_heap()
        log.info("loaded %s (%s, %.1f kB) in %.0f ms", name, path.name, size / 1e3, _ms_since(started))
        budget = variant.budget
        return _Slot(
            name=name,
            model=model,
            macs=variant.macs,
            size_bytes=size,
            gating=variant.gating,
            default_budget=None if budget is None else budget.default,
            budget_range=None if budget is None else (budget.minimum, budget.maximum),
        )

    def __repr__(self) -> str:
        return f"ModelServer({self._bundle}, backend={self._backend!r}, active={self.active!r})"


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
