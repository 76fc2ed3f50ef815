"""Batched face embedding: any ONNX model with ONNX Runtime, or dlib's ResNet.

Both embedders share one protocol (:class:`FaceEmbedder`): ``d``, ``name``,
``version``, ``embed(crops)`` returning float32 ``(F, d)`` rows of unit norm,
and ``spec``, a :class:`~fastface.faces.ModelSpec` describing the crops the
model takes (template, size, landmark convention, normalisation, colour
order) and its same-person threshold. ``align(..., for_model=embedder)`` and
the pipeline make crops from it, and ``embed`` refuses crops stamped with
another alignment. ``name`` and ``version`` identify the model that made a
vector (``version`` is a digest of the model file), to be stored with every
vector.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .align import AlignResult
from .landmarks import face_recognition_models_file
from .spec import AlignSpec, ModelSpec, template_convention

__all__ = [
    "DLIB_THRESHOLD",
    "DlibEmbedder",
    "Embedder",
    "FaceEmbedder",
    "dlib_face_model_path",
    "l2_normalize",
    "resolve_providers",
]

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@runtime_checkable
class FaceEmbedder(Protocol):
    """What :class:`FacePipeline` needs from an embedder.

    Attributes
    ----------
    d : int
        Embedding dimension.
    name, version : str
        Model id and version (a digest of the weights), stored with vectors.
    template : str
        Alignment template the model was trained with ("arcface" or "dlib").
    size : int
        Crop side in pixels.
    input : {"uint8", "float32_nchw"}
        The ``align(..., output=...)`` the model takes most cheaply.
    spec : ModelSpec
        All of the above, the landmark convention, the normalisation and
        the same-person threshold, in one description.
    """

    d: int
    name: str
    version: str
    template: str
    size: int
    input: str

    @property
    def spec(self) -> ModelSpec: ...

    def embed(self, crops: np.ndarray) -> np.ndarray: ...

    def align_options(self) -> dict[str, Any]: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place on a float32 copy; all-zero rows stay 0.

    Examples
    --------
    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    out = np.array(x, dtype=np.float32, copy=True)
    norm = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float64))
    norm[norm == 0] = 1.0
    out /= norm[:, None].astype(np.float32)
    return out


def resolve_providers(providers: str | Sequence[Any] = "auto") -> list[Any]:
    """ONNX Runtime execution providers for a ``providers`` argument.

    ``"auto"``: CUDA then CPU when onnxruntime-gpu sees a CUDA provider, else
    CPU. TensorRT is used only when asked for (``"tensorrt"``): it builds an
    engine per input shape (minutes) that should be cached, a choice for
    the caller. ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or a list of ONNX
    Runtime provider names (or ``(name, options)`` pairs) are taken as given,
    with CPU appended as the fallback.

    Examples
    --------
    >>> resolve_providers("cpu")
    ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if isinstance(providers, str):
        if providers == "auto":
            chosen: list[Any] = [p for p in ("CUDAExecutionProvider",) if p in available]
        elif providers in _PROVIDER_ALIASES:
            chosen = [_PROVIDER_ALIASES[providers]]
            if providers == "tensorrt":
                chosen.append("CUDAExecutionProvider")
        else:
            raise ValueError(
                f"providers: expected 'auto', 'cpu', 'cuda', 'tensorrt' or a list of ONNX "
                f"Runtime provider names, got {providers!r}"
            )
    else:
        chosen = list(providers)
        if not chosen:
            raise ValueError("providers: empty list; pass 'auto' or e.g. ['CPUExecutionProvider']")
    for p in chosen:
        name = p[0] if isinstance(p, tuple) else p
        if name not in available:
            raise ValueError(
                f"providers: {name} is not available in this onnxruntime build "
                f"(available: {available}); install onnxruntime-gpu for CUDA/TensorRT"
            )
    names = [p[0] if isinstance(p, tuple) else p for p in chosen]
    if "CPUExecutionProvider" not in names:
        chosen.append("CPUExecutionProvider")
    return chosen


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _check_crops(crops: Any, size: int, name: str = "crops") -> str:
    """'uint8' for (F, size, size, 3) uint8, 'float32_nchw' for (F, 3, size, size) float32."""
    if not isinstance(crops, np.ndarray):
        raise TypeError(
            f"{name}: expected a numpy array, got {type(crops).__name__}; pass the crops of "
            "fastface.faces.align"
        )
    if crops.dtype == np.uint8:
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise ValueError(
                f"{name}: expected uint8 crops of shape (F, {size}, {size}, 3), got "
                f"{tuple(crops.shape)}; align with size={size}"
            )
        return "uint8"
    if crops.dtype == np.float32:
        if crops.ndim != 4 or crops.shape[1:] != (3, size, size):
            raise ValueError(
                f"{name}: expected float32 input of shape (F, 3, {size}, {size}), got "
                f"{tuple(crops.shape)}; align with output='float32_nchw', size={size}"
            )
        if crops.size and not np.isfinite(crops).all():
            raise ValueError(f"{name}: contains NaN or inf")
        return "float32_nchw"
    raise TypeError(
        f"{name}: expected uint8 (F, {size}, {size}, 3) crops or float32 (F, 3, {size}, {size}) "
        f"model input, got {crops.dtype} {tuple(crops.shape)}"
    )


def _unwrap(crops: Any) -> Any:
    """The crops array of an AlignResult, or ``crops`` itself."""
    return crops.crops if isinstance(crops, AlignResult) else crops


def check_crops_spec(crops: Any, model: ModelSpec) -> None:
    """Raise ``ValueError`` when ``crops`` are stamped with another alignment than ``model``'s.

    Crops made by :func:`~fastface.faces.align` record how they were made
    (``crops.spec``); plain arrays carry no record and pass.
    """
    made = getattr(crops, "spec", None)
    if not isinstance(made, AlignSpec):
        return
    why = model.alignment.mismatch(made)
    if why is not None:
        raise ValueError(
            f"crops: made for {made.describe()}, but {model.name} takes "
            f"{model.alignment.describe()} ({why}); its vectors would look plausible and be "
            "wrong. Align with align(images, landmarks, for_model=embedder); pass "
            "np.asarray(crops) only if you know better"
        )


def _model_bytes(model: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        if not data:
            raise ValueError("model: empty bytes; pass an ONNX file's contents or its path")
        return data, "onnx"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a path or ONNX bytes, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file: {path}")
    return path.read_bytes(), path.stem


class Embedder:
    """Batched embedding with an ONNX face model (ArcFace-family and alike).

    Parameters
    ----------
    model : path or bytes
        The ONNX model: one image input, NCHW ``(N, 3, H, W)`` or NHWC
        ``(N, H, W, 3)``, float32 or float16, batch axis dynamic or fixed; the
        first output is the embedding ``(N, d)`` (``(N, d, 1, 1)`` is
        flattened).
    providers : "auto", "cpu", "cuda", "tensorrt" or list
        See :func:`resolve_providers`. On CUDA/TensorRT the inputs and outputs
        are bound on the device (I/O binding): a batch crosses to the GPU once
        and only the ``(F, d)`` embeddings come back.
    batch_size : int
        Faces per model run for a dynamic-batch model (a fixed-batch model
        runs its own batch size; the last batch is padded).
    size : int, optional
        Crop side for a model whose spatial axes are dynamic (default 112);
        a model with fixed axes sets it (a different ``size`` is an error).
    mean, std : float or 3 floats
        The model's normalisation, ``(pixel - mean) / std``, applied to uint8
        crops (and to be applied by ``align(..., output="float32_nchw")``;
        :meth:`align_options` gives the arguments).
    rgb : bool
        Channel order the model expects (False: BGR).
    fp16 : bool
        Run in half precision on a GPU provider (the weights are converted
        once, inputs and outputs stay float32). Not supported on CPU.
    threads : int, optional
        ONNX Runtime intra-op threads on CPU (default: the cores this process
        may use).
    template : {"arcface", "dlib"}
        The alignment the model was trained with (for :attr:`spec`,
        :meth:`align_options` and :class:`FacePipeline`).
    normalize : bool
        Scale rows to unit norm (default); False returns the model's raw output.
    threshold : float, optional
        The model's same-person threshold, a cosine similarity, if you have
        calibrated it (stored in :attr:`spec`, used by
        :func:`~fastface.faces.verify`).
    threshold_source : str
        How ``threshold`` was obtained.

    Examples
    --------
    >>> import numpy as np, onnx
    >>> from onnx import helper, TensorProto, numpy_helper
    >>> w = numpy_helper.from_array(np.ones((8, 3 * 16 * 16), np.float32), "w")
    >>> g = helper.make_graph(
    ...     [helper.make_node("Flatten", ["x"], ["f"]),
    ...      helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
    ...     "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    >>> emb = Embedder(m.SerializeToString(), providers="cpu")
    >>> emb.d, emb.size, emb.layout
    (8, 16, 'NCHW')
    >>> x = emb.embed(np.full((5, 16, 16, 3), 200, np.uint8))
    >>> x.shape, bool(np.allclose(np.linalg.norm(x, axis=1), 1))
    ((5, 8), True)
    """

    input = "float32_nchw"

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        *,
        providers: str | Sequence[Any] = "auto",
        batch_size: int = 64,
        size: int | None = None,
        mean: float | Sequence[float] = 127.5,
        std: float | Sequence[float] = 127.5,
        rgb: bool = True,
        fp16: bool = False,
        threads: int | None = None,
        template: str = "arcface",
        normalize: bool = True,
        threshold: float | None = None,
        threshold_source: str = "",
    ) -> None:
        import onnxruntime as ort

        from .._validation import check_positive_int

        data, stem = _model_bytes(model)
        if template not in ("arcface", "dlib"):
            raise ValueError(f"template: expected 'arcface' or 'dlib', got {template!r}")
        self.template = template
        self.normalize = bool(normalize)
        self.threshold = None if threshold is None else float(threshold)
        self.threshold_source = str(threshold_source)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.mean = _three(mean, "mean")
        self.std = _three(std, "std")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std: must be non-zero, got {std!r}")
        self.rgb = bool(rgb)
        self.providers = resolve_providers(providers)
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        self.on_gpu = names[0] in _GPU_PROVIDERS
        # Where inputs and outputs are bound (I/O binding): the GPU when the
        # session runs there; None (plain run) on CPU.
        self._bind_device: str | None = "cuda" if self.on_gpu else None
        self.fp16 = bool(fp16)
        if self.fp16 and not self.on_gpu:
            raise ValueError(
                "fp16=True needs the CUDA or TensorRT provider (ONNX Runtime's CPU provider "
                "has no half-precision convolutions); pass fp16=False on CPU"
            )
        self.version = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
        if self.fp16:
            data = _to_fp16(data)

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.on_gpu:
            n = _default_threads() if threads is None else check_positive_int(threads, "threads")
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = 1
            # Spinning workers would take the cores from the pipeline's other stages.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(data, opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"model: ONNX Runtime cannot load it: {e}") from e
        self._read_signature(size)
        self.name = _model_name(self._session, stem)
        self.d = self._probe_dim()
        _ = self.spec  # validates the threshold

    @property
    def spec(self) -> ModelSpec:
        """What this model is and the crops it takes (see :class:`~fastface.faces.ModelSpec`)."""
        return ModelSpec(
            self.name,
            self.version,
            self.d,
            AlignSpec(
                self.template,
                self.size,
                template_convention(self.template),
                "float32_nchw",
                self.mean,
                self.std,
                self.rgb,
            ),
            self.threshold,
            self.threshold_source,
            self.normalize,
        )

    # --- model signature ---------------------------------------------------------------------
    def _read_signature(self, size: int | None) -> None:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(
                f"model: expected one image input, got {len(inputs)}: "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        inp = inputs[0]
        shape = list(inp.shape)
        if inp.type not in ("tensor(float)", "tensor(float16)") or len(shape) != 4:
            raise ValueError(
                f"model: input {inp.name!r} is {inp.type} {shape}, not an image tensor; "
                "expected float (N, 3, H, W) or (N, H, W, 3)"
            )
        if shape[1] == 3:
            self.layout = "NCHW"
            hw = shape[2:4]
        elif shape[3] == 3:
            self.layout = "NHWC"
            hw = shape[1:3]
        else:
            raise ValueError(
                f"model: input {inp.name!r} has shape {shape}: no axis of 3 channels at 1 "
                "(NCHW) or 3 (NHWC); not an RGB image model"
            )
        fixed = [v for v in hw if isinstance(v, int) and v > 0]
        if fixed and (len(fixed) != 2 or fixed[0] != fixed[1]):
            raise ValueError(f"model: input {inp.name!r} is not square ({shape}); expected H == W")
        if fixed:
            if size is not None and size != fixed[0]:
                raise ValueError(
                    f"size: the model takes {fixed[0]} x {fixed[0]} crops, got size={size}; "
                    f"pass size={fixed[0]} or leave it out"
                )
            self.size = int(fixed[0])
        else:
            from .._validation import check_positive_int

            self.size = 112 if size is None else check_positive_int(size, "size")
        b = shape[0]
        self.fixed_batch: int | None = int(b) if isinstance(b, int) and b > 0 else None
        self._in_name = inp.name
        self._in_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._out_name = self._session.get_outputs()[0].name

    def _probe_dim(self) -> int:
        n = self.fixed_batch or 1
        y = self._run(np.zeros((n, 3, self.size, self.size), np.float32))
        return int(y.shape[1])

    def align_options(self) -> dict[str, Any]:
        """Keyword arguments for ``align`` that make this model's input
        (``align(..., for_model=self)`` does the same)."""
        return self.spec.alignment.align_options()

    # --- running -----------------------------------------------------------------------------
    def _prepare(self, crops: np.ndarray, kind: str) -> np.ndarray:
        """One batch as the model's float32 NCHW input."""
        if kind == "float32_nchw":
            return np.ascontiguousarray(crops)
        x = crops if self.rgb else crops[..., ::-1]
        out = np.empty((crops.shape[0], 3, self.size, self.size), np.float32)
        for c in range(3):
            # (x - mean) / std written as one multiply-add per channel
            np.multiply(x[..., c], np.float32(1.0 / self.std[c]), out=out[:, c])
            out[:, c] -= np.float32(self.mean[c] / self.std[c])
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for a float32 NCHW batch of the model's batch size."""
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if self._in_dtype != np.float32:
            x = x.astype(self._in_dtype)
        if self._bind_device is not None:
            import onnxruntime as ort

            dev = self._bind_device
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(self._in_name, ort.OrtValue.ortvalue_from_numpy(x, dev))
            binding.bind_output(self._out_name, dev)
            self._session.run_with_iobinding(binding)
            y = binding.copy_outputs_to_cpu()[0]
        else:
            y = self._session.run([self._out_name], {self._in_name: x})[0]
        y = np.asarray(y)
        if y.ndim == 4 and y.shape[2:] == (1, 1):
            y = y.reshape(y.shape[0], -1)
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"model: first output {self._out_name!r} has shape {y.shape}; expected "
                f"(batch, d) = ({x.shape[0]}, d)"
            )
        return y.astype(np.float32, copy=False)

    def _run_device(self, x: Any, n: int) -> np.ndarray:
        """Run a float32 NCHW batch that already lives on the GPU (``__cuda_array_interface__``)."""
        iface = x.__cuda_array_interface__
        binding = self._session.io_binding()
        binding.bind_input(
            self._in_name, self._bind_device, 0, np.float32, list(iface["shape"]), iface["data"][0]
        )
        binding.bind_output(self._out_name, self._bind_device)
        self._session.run_with_iobinding(binding)
        y = np.asarray(binding.copy_outputs_to_cpu()[0])
        return y.reshape(n, -1).astype(np.float32, copy=False)

    def embed(self, crops: np.ndarray | Any) -> np.ndarray:
        """L2-normalised embeddings of aligned faces.

        Parameters
        ----------
        crops : (F, size, size, 3) uint8 or (F, 3, size, size) float32, or AlignResult
            ``align(..., for_model=self)`` crops, or its fused model input
            (``output="float32_nchw"``), taken as is. On a GPU provider a
            float32 NCHW CUDA array (CuPy, PyTorch) is read in place.

        Returns
        -------
        (F, d) float32
            Rows of unit norm (raw model output with ``normalize=False``).

        Raises
        ------
        ValueError
            Crops of another size, or stamped with another template or
            normalisation (``crops.spec``) than this model's.
        """
        crops = _unwrap(crops)
        if self._bind_device is not None and hasattr(crops, "__cuda_array_interface__"):
            return self._embed_device(crops)
        check_crops_spec(crops, self.spec)
        kind = _check_crops(crops, self.size)
        crops = np.asarray(crops)
        F = crops.shape[0]
        out = np.empty((F, self.d), np.float32)
        step = self.fixed_batch or self.batch_size
        for s in range(0, F, step):
            x = self._prepare(crops[s : s + step], kind)
            m = x.shape[0]
            if self.fixed_batch and m < self.fixed_batch:
                pad = np.zeros((self.fixed_batch, *x.shape[1:]), np.float32)
                pad[:m] = x
                x = pad
            out[s : s + m] = self._run(x)[:m]
        return l2_normalize(out) if self.normalize else out

    def _embed_device(self, crops: Any) -> np.ndarray:
        iface = crops.__cuda_array_interface__
        shape = tuple(iface["shape"])
        if np.dtype(iface["typestr"]) != np.float32 or shape[1:] != (3, self.size, self.size):
            raise ValueError(
                f"crops: a device array must be float32 (F, 3, {self.size}, {self.size}), got "
                f"{iface['typestr']} {shape}"
            )
        if self.layout != "NCHW" or self.fixed_batch or self._in_dtype != np.float32:
            raise ValueError(
                "crops: device arrays are read in place only by dynamic-batch float32 NCHW "
                "models; pass a numpy array"
            )
        if iface.get("strides") is not None:  # None means C-contiguous
            raise ValueError("crops: a device array must be C-contiguous; make a contiguous copy")
        F = shape[0]
        out = np.empty((F, self.d), np.float32)
        for s in range(0, F, self.batch_size):
            part = crops[s : s + self.batch_size]
            out[s : s + part.shape[0]] = self._run_device(part, part.shape[0])
        return l2_normalize(out) if self.normalize else out

    __call__ = embed

    def __repr__(self) -> str:
        return (
            f"Embedder(name={self.name!r}, d={self.d}, size={self.size}, layout={self.layout}, "
            f"fixed_batch={self.fixed_batch}, providers={self.providers})"
        )


def _model_name(session: Any, stem: str) -> str:
    meta = session.get_modelmeta()
    graph = getattr(meta, "graph_name", "") or ""
    return stem if stem != "onnx" or not graph else graph


def _to_fp16(data: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load_from_string(data)
    half = convert_float_to_float16(model, keep_io_types=True)
    return bytes(half.SerializeToString())


def _three(v: float | Sequence[float], name: str) -> tuple[float, float, float]:
    arr = np.asarray(v, dtype=np.float64)
    if arr.shape not in ((), (3,)) or not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected a finite number or 3 numbers, got {v!r}")
    a = np.broadcast_to(arr, (3,))
    return (float(a[0]), float(a[1]), float(a[2]))


# --- dlib ------------------------------------------------------------------------------------


def dlib_face_model_path() -> Path:
    """Path of dlib's ResNet face model in ``face_recognition_models`` (found, not imported).

    Raises
    ------
    FileNotFoundError
        When the package or the file is missing.
    """
    return face_recognition_models_file(
        "dlib_face_recognition_resnet_model_v1.dat", "dlib's face model"
    )


class DlibEmbedder:
    """dlib's ResNet face model (128-d), fed with fastface-aligned 150 x 150 chips.

    Align with ``align(images, detections, for_model=embedder)`` (dlib's
    5-point landmarks inside the detected boxes, the ``"dlib"`` template).
    dlib's own descriptors are not of unit norm (1.23-1.53, median 1.38 on
    LFW faces) and face_recognition's same-person rule is a Euclidean
    distance below 0.6 between them; this class returns unit rows, for which
    the equivalent rule is a cosine similarity of at least
    :data:`DLIB_THRESHOLD` (``spec.threshold``; :func:`~fastface.faces.verify`
    applies it). ``normalize=False`` returns dlib's raw descriptors, for code
    that keeps the 0.6 rule.

    dlib runs its network on one core and holds the GIL throughout, so
    threads cannot overlap it with anything; ``processes=n`` runs it in
    ``n`` worker processes instead (each loads the model once), which frees
    the calling process for detection and alignment meanwhile.

    Parameters
    ----------
    model : path, optional
        ``dlib_face_recognition_resnet_model_v1.dat``; by default the file of
        the installed ``face_recognition_models`` package.
    batch_size : int
        Chips per call into dlib.
    normalize : bool
        Scale rows to unit norm (the library's convention; default).
    processes : int
        0 (default): run in this process. ``n >= 1``: run in ``n`` worker
        processes (spawned on first use; :meth:`close` ends them).

    Examples
    --------
    >>> emb = DlibEmbedder()
    >>> emb.d, emb.size, emb.template
    (128, 150, 'dlib')
    """

    template = "dlib"
    size = 150
    input = "uint8"
    d = 128

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 32,
        normalize: bool = True,
        processes: int = 0,
    ) -> None:
        from .._validation import check_positive_int

        path = dlib_face_model_path() if model is None else Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model: no such file: {path}")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
            raise ValueError(f"processes: expected an int >= 0, got {processes!r}")
        self.processes = processes
        self.normalize = bool(normalize)
        self.path = path
        self.name = "dlib_face_recognition_resnet_model_v1"
        self.version = "sha256:" + _file_sha256(path)[:16]
        self._model = _load_dlib_model(str(path))
        self._pool: Any = None

    @property
    def spec(self) -> ModelSpec:
        """What this model is and the chips it takes (see :class:`~fastface.faces.ModelSpec`)."""
        return dlib_model_spec(self.version, normalized=self.normalize)

    def align_options(self) -> dict[str, Any]:
        """Keyword arguments for ``align`` that make this model's chips
        (``align(..., for_model=self)`` does the same)."""
        return self.spec.alignment.align_options()

    def embed(self, crops: npt.NDArray[np.uint8] | AlignResult) -> np.ndarray:
        """128-d descriptors of ``(F, 150, 150, 3)`` uint8 RGB chips.

        Returns
        -------
        (F, 128) float32
            Unit rows (or dlib's raw descriptors with ``normalize=False``).

        Raises
        ------
        ValueError
            Chips of another size, or stamped with another alignment
            (``crops.spec``) than dlib's.
        """
        crops = _unwrap(crops)
        check_crops_spec(crops, self.spec)
        kind = _check_crops(crops, self.size)
        crops = np.asarray(crops)
        if kind != "uint8":
            raise TypeError(
                "crops: dlib's model takes uint8 (F, 150, 150, 3) chips; align with "
                "output='uint8' (DlibEmbedder.align_options())"
            )
        F = crops.shape[0]
        out = np.empty((F, self.d), np.float32)
        if self.processes and F:
            pool = self._worker_pool()
            step = min(self.batch_size, -(-F // self.processes))
            starts = range(0, F, step)
            parts = pool.map(_dlib_worker_embed, [crops[s : s + step] for s in starts])
            for s, part in zip(starts, parts, strict=True):
                out[s : s + len(part)] = part
        else:
            for s in range(0, F, self.batch_size):
                out[s : s + self.batch_size] = _dlib_descriptors(
                    self._model, crops[s : s + self.batch_size]
                )
        return l2_normalize(out) if self.normalize else out

    __call__ = embed

    def _worker_pool(self) -> Any:
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=mp.get_context("spawn"),  # no fork of a threaded process
                initializer=_dlib_worker_init,
                initargs=(str(self.path),),
            )
        return self._pool

    def close(self) -> None:
        """End the worker processes (if any); the in-process model stays usable."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> DlibEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"DlibEmbedder(d=128, version={self.version!r}, processes={self.processes})"


#: Cosine similarity of unit dlib descriptors at or above which two faces are
#: the same person: face_recognition's tolerance (Euclidean distance < 0.6
#: between raw descriptors) carried over to unit vectors. Measured by
#: ``python bench/pipeline.py`` (``calibration`` in bench/results/pipeline.json):
#: the 100 faces of scikit-image's ``lfw_subset`` and 4 altered copies of each
#: (mirrored, rotated by +-8 degrees, scaled by 0.8), detected, dlib-aligned
#: and embedded (493 found); among the 121,278 pairs, cosine >= 0.906 agrees
#: with the raw rule on 97.5% (the best agreement any threshold reaches: the
#: raw norms vary, 1.23-1.53). The closed form for the median norm 1.378,
#: 1 - (0.6 / 1.378)**2 / 2 = 0.905, agrees.
DLIB_THRESHOLD = 0.906

DLIB_THRESHOLD_SOURCE = (
    "face_recognition's tolerance 0.6 on raw dlib descriptors, carried to unit vectors: the "
    "cosine threshold agreeing most often with it on pairs of scikit-image lfw_subset faces "
    "(bench/pipeline.py, bench/results/pipeline.json 'calibration')"
)


def dlib_model_spec(version: str, *, normalized: bool = True) -> ModelSpec:
    """The :class:`~fastface.faces.ModelSpec` of dlib's face ResNet (either runtime)."""
    return ModelSpec(
        "dlib_face_recognition_resnet_model_v1",
        version,
        128,
        AlignSpec("dlib", 150, "dlib5", "uint8", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), True),
        DLIB_THRESHOLD,
        DLIB_THRESHOLD_SOURCE,
        normalized,
    )


def _load_dlib_model(path: str) -> Any:
    import dlib

    try:
        return dlib.face_recognition_model_v1(path)
    except RuntimeError as e:
        raise ValueError(f"model: dlib cannot read {path}: {e}") from e


def _dlib_descriptors(model: Any, chips: np.ndarray) -> np.ndarray:
    vecs = model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
    return np.asarray([np.asarray(v) for v in vecs], np.float32).reshape(len(chips), 128)


_WORKER_MODEL: Any = None


def _dlib_worker_init(path: str) -> None:
    global _WORKER_MODEL
    _WORKER_MODEL = _load_dlib_model(path)


def _dlib_worker_embed(chips: np.ndarray) -> np.ndarray:
    return _dlib_descriptors(_WORKER_MODEL, chips)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
