"""Images in, face embeddings out: decode, detect, align and embed on overlapping threads.

Each stage is one thread (decoding is a small pool) joined to the next by a
bounded queue, so a batch of images is decoded while the previous one is
detected, the one before is aligned and the one before that is embedded.
The stages spend their time in code that releases the GIL (OpenCV decoding,
ONNX Runtime, the native warp), which is what lets them overlap; dlib does
not release it, hence ``DlibEmbedder(processes=n)`` and, better,
:func:`~fastface.faces.dlib_onnx_embedder` (the same model in ONNX Runtime). Batches
keep the input order; a bad image becomes an :class:`ImageError` item and
never stops the run.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .align import align, pixel_hint
from .detect import pipeline_model
from .embed import FaceEmbedder
from .landmarks import dlib_landmarks
from .spec import CONVENTIONS, Detections, Landmarks, spec_of

__all__ = ["Face", "FacePipeline", "ImageError", "IndexReport", "decode_image"]

#: MTCNN's smallest window is 12 pixels: a smaller image cannot hold a face.
MIN_IMAGE_SIDE = 12


@dataclass(frozen=True)
class Face:
    """One face found in an input image.

    Attributes
    ----------
    image : int
        Position of the image in the input.
    face : int
        Number of the face within its image (detector order, best first).
    box : (4,) float32
        ``x1, y1, x2, y2`` in image pixels.
    score : float
        Detector confidence.
    landmarks : (5, 2) float32 Landmarks
        The points the face was aligned with, in the convention of the
        embedder's template (``landmarks.convention``).
    embedding : (d,) float32
        Unit-norm embedding (the model's raw output for an embedder made
        with ``normalize=False``).
    crop : (size, size, 3) uint8, optional
        The aligned crop the embedding was computed from, when asked for
        (``FacePipeline(keep_crops=True)``, ``analyze(crops=True)``).
    """

    image: int
    face: int
    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray
    crop: np.ndarray | None = None


@dataclass(frozen=True)
class ImageError:
    """An input that gave no face, and why.

    ``kind`` is ``"decode"`` (unreadable or not an image), ``"too_small"``,
    ``"no_face"`` or ``"failed"`` (a stage raised on this image; ``reason``
    has the message).
    """

    image: int
    source: str
    kind: Literal["decode", "too_small", "no_face", "failed"]
    reason: str


@dataclass
class IndexReport:
    """What :meth:`FacePipeline.index_images` added.

    ``ids[j]`` is the vector id of the face at ``boxes[j]`` in image
    ``image[j]``; ``errors`` lists the images that added nothing;
    ``skipped`` counts the images whose id was in the index already.
    """

    ids: npt.NDArray[np.int64]
    image: npt.NDArray[np.int64]
    boxes: npt.NDArray[np.float32]
    errors: list[ImageError]
    model: str
    model_version: str
    skipped: int = 0


@dataclass
class _Batch:
    """Images travelling through the stages together."""

    index: list[int]
    source: list[str]
    images: list[np.ndarray | None]
    errors: dict[int, ImageError] = field(default_factory=dict)  # position in batch -> error
    dets: list[Detections] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)
    crops: np.ndarray | None = None
    owner: np.ndarray | None = None  # batch position of each crop
    embeddings: np.ndarray | None = None


_STOP = object()


def decode_image(item: Any) -> np.ndarray:
    """An input item as an ``(H, W, 3)`` uint8 RGB image.

    ``item`` may be a path (str or Path), encoded bytes (any format OpenCV
    reads: JPEG, PNG, WebP, ...) or a decoded array (``(H, W, 3)`` RGB or
    ``(H, W)`` gray uint8). Raises ``ValueError``/``TypeError`` for what is
    not an image, ``FileNotFoundError`` for a missing file.

    Examples
    --------
    >>> import cv2, numpy as np
    >>> ok, png = cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))
    >>> decode_image(png.tobytes()).shape
    (4, 6, 3)
    """
    import cv2

    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image, {pixel_hint(item)}")
        if item.ndim == 2:
            item = np.repeat(item[:, :, None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) image, got shape {item.shape}")
        return np.ascontiguousarray(item[:, :, :3])
    if isinstance(item, (str, os.PathLike)):
        data = Path(item).read_bytes()
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    else:
        raise TypeError(
            f"expected a path, encoded bytes or a uint8 array, got {type(item).__name__}"
        )
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except cv2.error as e:  # e.g. more pixels than OPENCV_IO_MAX_IMAGE_PIXELS allows
        raise ValueError(f"not a decodable image ({len(data)} bytes): {e}") from None
    if img is None:
        raise ValueError(f"not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {tuple(item.shape)}>"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    return f"<{type(item).__name__}>"


class FacePipeline:
    """Detect, align and embed the faces of many images, stages overlapping.

    Parameters
    ----------
    detector : MTCNN, callable or None
        Finds faces: an object with ``detect(images, min_face_size=...)`` or a
        callable ``images -> list[Detections]``; None: a shared
        :class:`~fastface.faces.MTCNN` with one ONNX Runtime thread per
        network (``detect_threads`` batches run at once instead).
    embedder : Embedder, DlibEmbedder or any FaceEmbedder
        Its ``spec`` decides the crops (``align(..., for_model=embedder)``).
        When its template takes another landmark convention than the
        detector gives (the ``"dlib"`` template and MTCNN's points), the
        landmarks are dlib's 5 points inside the detector's boxes
        (:func:`~fastface.faces.dlib_landmarks`); otherwise the detector's
        own. dlib's model is fastest as
        :func:`~fastface.faces.dlib_onnx_embedder` (same vectors); a
        ``DlibEmbedder`` holds the GIL, so give it ``processes=1`` or more.
    batch_size : int
        Images per batch through the stages: small enough that the stages
        have batches to overlap, large enough to batch the models (on a GPU,
        raise it).
    workers : int
        Decoding threads.
    detect_threads : int
        Batches detected at once (ONNX Runtime runs them concurrently while
        the detector's Python steps take turns).
    min_face_size : float
        Smallest face to look for, in pixels.
    max_faces : int, optional
        Keep at most this many faces per image (best first).
    progress : bool
        Show a tqdm progress bar over images (off by default).
    keep_crops : bool
        Return each face's aligned uint8 crop (``Face.crop``).

    Attributes
    ----------
    stats : dict
        After a run: busy seconds per stage (``decode``, ``detect``,
        ``landmarks``, ``align``, ``embed``), ``wall`` seconds, and counts of
        ``images``, ``faces`` and ``errors``.

    Examples
    --------
    >>> from skimage import data
    >>> from fastface.faces import DlibEmbedder, FacePipeline
    >>> pipe = FacePipeline(None, DlibEmbedder(), progress=False)
    >>> items = list(pipe.run([data.astronaut(), data.camera()[:8, :8]]))
    >>> [type(r).__name__ for r in items]
    ['Face', 'Face', 'ImageError']
    >>> items[0].embedding.shape, items[2].kind
    ((128,), 'too_small')
    """

    def __init__(
        self,
        detector: Any,
        embedder: FaceEmbedder,
        *,
        batch_size: int = 8,
        workers: int = 2,
        detect_threads: int = 2,
        min_face_size: float = 20,
        max_faces: int | None = None,
        progress: bool = False,
        keep_crops: bool = False,
    ) -> None:
        from .._validation import check_positive_int

        if not hasattr(embedder, "embed"):
            raise TypeError(
                f"embedder: expected an Embedder or DlibEmbedder (needs .embed), got "
                f"{type(embedder).__name__}"
            )
        self.spec = spec_of(embedder, "embedder")
        self.detector = pipeline_model() if detector is None else detector
        if not (hasattr(self.detector, "detect") or callable(self.detector)):
            raise TypeError(
                f"detector: expected an MTCNN or a callable images -> list[Detections], got "
                f"{type(detector).__name__}"
            )
        self.embedder = embedder
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.workers = check_positive_int(workers, "workers")
        self.detect_threads = check_positive_int(detect_threads, "detect_threads")
        if not (np.isfinite(min_face_size) and min_face_size >= 1):
            raise ValueError(f"min_face_size: expected a number >= 1, got {min_face_size!r}")
        self.min_face_size = float(min_face_size)
        self.max_faces = None if max_faces is None else check_positive_int(max_faces, "max_faces")
        self.progress = bool(progress)
        self.keep_crops = bool(keep_crops)
        self.stats: dict[str, float] = {}
        self._convention = self.spec.alignment.landmarks
        # uint8 crops when they are to be kept (the embedder normalises them)
        self._output: Literal["uint8"] | None = "uint8" if self.keep_crops else None

    # --- stages ------------------------------------------------------------------------------
    def _detect_images(self, images: list[np.ndarray]) -> list[Detections]:
        det: Any = self.detector
        if hasattr(det, "detect"):
            return list(det.detect(images, min_face_size=self.min_face_size))
        return list(det(images))

    def _stage_detect(self, b: _Batch) -> None:
        decoded = [(i, im) for i, im in enumerate(b.images) if im is not None]
        live = [i for i, _ in decoded if i not in b.errors]
        for i, im in decoded:
            if i in b.errors:
                continue
            if min(im.shape[:2]) < max(MIN_IMAGE_SIDE, self.min_face_size):
                b.errors[i] = ImageError(
                    b.index[i],
                    b.source[i],
                    "too_small",
                    f"image {im.shape[1]} x {im.shape[0]} is smaller than the smallest face "
                    f"({max(MIN_IMAGE_SIDE, int(self.min_face_size))} px)",
                )
                live.remove(i)
        empty = Detections.empty()
        b.dets = [empty] * len(b.images)
        if not live:
            return
        ims = [im for i, im in decoded if i in live]
        try:
            found = self._detect_images(ims)
        except Exception:
            found = []
            for i, im in zip(live, ims, strict=True):  # one bad image must not sink the batch
                try:
                    found.extend(self._detect_images([im]))
                except Exception as e:
                    b.errors[i] = ImageError(b.index[i], b.source[i], "failed", f"detect: {e}")
                    found.append(empty)
        for i, d in zip(live, found, strict=True):
            if i in b.errors:
                continue
            if not isinstance(d, Detections):
                raise TypeError(
                    f"detector: expected a list of Detections, got an item of type "
                    f"{type(d).__name__}"
                )
            if self.max_faces is not None and len(d) > self.max_faces:
                d = d.head(self.max_faces)
            if len(d) == 0:
                b.errors[i] = ImageError(b.index[i], b.source[i], "no_face", "no face found")
            b.dets[i] = d

    def _stage_landmarks(self, b: _Batch) -> None:
        live = [i for i, d in enumerate(b.dets) if len(d) and i not in b.errors]
        b.landmarks = [Landmarks(np.zeros((0, 5, 2)), self._convention)] * len(b.images)
        want = self._convention
        own = [i for i in live if want is None or b.dets[i].convention == want]
        for i in own:
            b.landmarks[i] = b.dets[i].landmarks
        other = [i for i in live if i not in own]
        if not other:
            return
        if want != "dlib5":
            have = b.dets[other[0]].convention
            raise ValueError(
                f"detector: gives {have} landmarks ({CONVENTIONS[have]}), but the embedder's "
                f"template takes {want} ({CONVENTIONS.get(str(want))}); use a detector that "
                "gives them"
            )
        ims = [b.images[i] for i in other]
        pts = dlib_landmarks(ims, [b.dets[i].boxes for i in other])  # type: ignore[arg-type]
        for i, p in zip(other, pts, strict=True):
            b.landmarks[i] = p

    def _stage_align(self, b: _Batch) -> None:
        live = [i for i, p in enumerate(b.landmarks) if len(p) and i not in b.errors]
        if not live:
            return
        try:
            lm = Landmarks(np.concatenate([b.landmarks[i] for i in live]), self._convention)
            owner = np.concatenate([np.full(len(b.landmarks[i]), i, np.int64) for i in live])
            pos = {i: j for j, i in enumerate(live)}
            ims = [b.images[i] for i in live]
            image_index = np.array([pos[int(o)] for o in owner], np.int64)
            b.crops, _ = align(
                ims,  # type: ignore[arg-type]
                lm,
                image_index=image_index,
                for_model=self.spec,
                output=self._output,
            )
            b.owner = owner
        except ValueError:
            crops, owners = [], []
            for i in live:
                try:
                    c, _ = align(
                        [b.images[i]],  # type: ignore[list-item]
                        b.landmarks[i],
                        image_index=np.zeros(len(b.landmarks[i]), np.int64),
                        for_model=self.spec,
                        output=self._output,
                    )
                except ValueError as e:
                    b.errors[i] = ImageError(b.index[i], b.source[i], "failed", f"align: {e}")
                    continue
                crops.append(c)
                owners.append(np.full(len(c), i, np.int64))
            if crops:
                b.crops = crops[0] if len(crops) == 1 else _restamp(crops)
                b.owner = np.concatenate(owners)

    def _stage_embed(self, b: _Batch) -> None:
        if b.crops is not None and len(b.crops):
            b.embeddings = self.embedder.embed(b.crops)

    # --- running -----------------------------------------------------------------------------
    def run(self, images: Iterable[Any]) -> Iterator[Face | ImageError]:
        """Faces of every image, in input order, and an error item for each bad image.

        Parameters
        ----------
        images : iterable
            Paths, encoded bytes, or decoded ``(H, W, 3)`` uint8 RGB arrays.

        Yields
        ------
        Face or ImageError
            Per image: its faces (best first), or one ``ImageError``.
        """
        from tqdm.auto import tqdm

        total = len(images) if isinstance(images, Sized) else None
        stop = threading.Event()
        busy = {"decode": 0.0, "detect": 0.0, "landmarks": 0.0, "align": 0.0, "embed": 0.0}
        counts = {"images": 0, "faces": 0, "errors": 0}
        q_dec: queue.Queue[Any] = queue.Queue(maxsize=2)
        q_det: queue.Queue[Any] = queue.Queue(maxsize=2)
        q_lm: queue.Queue[Any] = queue.Queue(maxsize=2)
        q_al: queue.Queue[Any] = queue.Queue(maxsize=2)
        q_out: queue.Queue[Any] = queue.Queue(maxsize=2)

        def put(q: queue.Queue[Any], item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def get(q: queue.Queue[Any]) -> Any:
            while not stop.is_set():
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    continue
            return _STOP

        def timed_decode(item: Any) -> tuple[np.ndarray | None, str | None, float]:
            t0 = time.perf_counter()
            try:
                return decode_image(item), None, time.perf_counter() - t0
            except (OSError, ValueError, TypeError) as e:
                return None, f"{type(e).__name__}: {e}", time.perf_counter() - t0

        def reader() -> None:
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastface-decode")
            pending: deque[tuple[int, str, Future[Any]]] = deque()
            window = self.batch_size + 2 * self.workers
            batch = _Batch([], [], [])

            def drain_one() -> bool:
                nonlocal batch
                idx, src, fut = pending.popleft()
                img, err, dt = fut.result()
                busy["decode"] += dt
                pos = len(batch.index)
                batch.index.append(idx)
                batch.source.append(src)
                batch.images.append(img)
                if err is not None:
                    batch.errors[pos] = ImageError(idx, src, "decode", err)
                if len(batch.index) == self.batch_size:
                    ok = put(q_dec, batch)
                    batch = _Batch([], [], [])
                    return ok
                return True

            try:
                for idx, item in enumerate(images):
                    if stop.is_set():
                        return
                    pending.append((idx, _describe(item), pool.submit(timed_decode, item)))
                    if len(pending) >= window and not drain_one():
                        return
                while pending:
                    if not drain_one():
                        return
                if batch.index:
                    put(q_dec, batch)
                put(q_dec, _STOP)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        lock = threading.Lock()

        def stage(
            name: str,
            fn: Callable[[_Batch], None],
            q_in: queue.Queue[Any],
            q_o: queue.Queue[Any],
            threads: int = 1,
        ) -> Callable[[], None]:
            def work(b: _Batch) -> _Batch:
                t0 = time.perf_counter()
                fn(b)
                with lock:
                    busy[name] += time.perf_counter() - t0
                return b

            def loop() -> None:
                while True:
                    b = get(q_in)
                    if b is _STOP:
                        put(q_o, _STOP)
                        return
                    if not put(q_o, work(b)):
                        return

            def loop_parallel() -> None:
                # `threads` batches in flight, handed on in input order
                pool = ThreadPoolExecutor(threads, thread_name_prefix=f"fastface-{name}")
                pending: deque[Future[_Batch]] = deque()
                try:
                    while True:
                        b = get(q_in)
                        if b is not _STOP:
                            pending.append(pool.submit(work, b))
                        while pending and (
                            b is _STOP or len(pending) >= threads or pending[0].done()
                        ):
                            if not put(q_o, pending.popleft().result()):
                                return
                        if b is _STOP:
                            put(q_o, _STOP)
                            return
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)

            return loop if threads == 1 else loop_parallel

        errors: list[BaseException] = []

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run_() -> None:
                try:
                    fn()
                except BaseException as e:  # re-raised on the caller's thread
                    errors.append(e)
                    stop.set()

            return run_

        threads = [
            threading.Thread(target=guarded(reader), name="fastface-read", daemon=True),
            threading.Thread(
                target=guarded(
                    stage("detect", self._stage_detect, q_dec, q_det, self.detect_threads)
                ),
                daemon=True,
            ),
            threading.Thread(
                target=guarded(stage("landmarks", self._stage_landmarks, q_det, q_lm)), daemon=True
            ),
            threading.Thread(
                target=guarded(stage("align", self._stage_align, q_lm, q_al)), daemon=True
            ),
            threading.Thread(
                target=guarded(stage("embed", self._stage_embed, q_al, q_out)), daemon=True
            ),
        ]
        t_start = time.perf_counter()
        bar = tqdm(total=total, unit="img", disable=not self.progress, desc="faces")
        for t in threads:
            t.start()
        try:
            while True:
                b = get(q_out)
                if b is _STOP:
                    break
                for item in self._results(b):
                    if isinstance(item, Face):
                        counts["faces"] += 1
                    else:
                        counts["errors"] += 1
                    yield item
                counts["images"] += len(b.index)
                bar.update(len(b.index))
        finally:
            stop.set()
            for t in threads:
                t.join()
            bar.close()
            self.stats = {**busy, "wall": time.perf_counter() - t_start, **counts}
        if errors:
            raise errors[0]

    def _results(self, b: _Batch) -> Iterator[Face | ImageError]:
        rows: dict[int, list[int]] = {}
        if b.owner is not None:
            for r, o in enumerate(b.owner.tolist()):
                rows.setdefault(o, []).append(r)
        for i in range(len(b.index)):
            if i in b.errors:
                yield b.errors[i]
                continue
            d, lm = b.dets[i], b.landmarks[i]
            if b.embeddings is None or not rows.get(i):
                yield ImageError(b.index[i], b.source[i], "no_face", "no face found")
                continue
            for j, r in enumerate(rows[i]):
                yield Face(
                    b.index[i],
                    j,
                    d.boxes[j],
                    float(d.scores[j]),
                    lm[j],
                    b.embeddings[r],
                    np.asarray(b.crops[r]) if self.keep_crops and b.crops is not None else None,
                )

    def index_images(
        self,
        source: Sequence[Any],
        index: Any,
        *,
        ids: npt.ArrayLike | None = None,
        faces: Literal["largest", "all"] = "largest",
        chunk: int = 1024,
    ) -> IndexReport:
        """Embed the faces of ``source`` and add them to ``index``.

        Parameters
        ----------
        source : sequence
            Paths, encoded bytes or decoded images.
        index : IVFPQIndex or ShardedIndex
            Trained, of dimension ``embedder.d``.
        ids : (N,) int, optional
            One id per image (for ``faces="largest"``); by default the index
            numbers the vectors. Images whose id the index holds already are
            skipped, so a stopped run resumes when called again (vectors go
            to the index every ``chunk`` faces).
        faces : {"largest", "all"}
            Index the largest face of each image, or every face (then
            ``ids`` must be None; the report maps ids to images).
        chunk : int
            Vectors per ``index.add`` call.

        Returns
        -------
        IndexReport
            Ids, images and boxes of the added faces, and the images that
            gave none (with the reason).
        """
        from .._validation import as_ids, check_positive_int
        from ..errors import NotTrainedError

        if faces not in ("largest", "all"):
            raise ValueError(f"faces: expected 'largest' or 'all', got {faces!r}")
        chunk = check_positive_int(chunk, "chunk")
        if not isinstance(source, Sized):
            raise TypeError("source: expected a sequence (list of paths, bytes or arrays)")
        n = len(source)
        id_arr = None
        if ids is not None:
            if faces == "all":
                raise ValueError(
                    "ids: with faces='all' an image may give several vectors; pass ids=None "
                    "and read the ids from the report"
                )
            id_arr = as_ids(ids, n)
        if getattr(index, "d", self.spec.d) != self.spec.d:
            raise ValueError(
                f"index: dimension {index.d} does not match the embedder's d={self.spec.d}"
            )
        if not getattr(index, "is_trained", True):
            raise NotTrainedError("index is not trained; train it before index_images")

        out_ids: list[np.ndarray] = []
        out_img: list[int] = []
        out_box: list[np.ndarray] = []
        errors: list[ImageError] = []
        buf_x: list[np.ndarray] = []
        buf_img: list[int] = []

        def flush() -> None:
            if not buf_x:
                return
            x = np.stack(buf_x).astype(np.float32)
            want = None if id_arr is None else id_arr[np.asarray(buf_img)]
            out_ids.append(np.asarray(index.add(x, want), np.int64))
            buf_x.clear()
            buf_img.clear()

        def take(f: Face) -> None:
            buf_x.append(f.embedding)
            buf_img.append(f.image)
            out_img.append(f.image)
            out_box.append(f.box)
            if len(buf_x) >= chunk:
                flush()

        todo = np.arange(n)
        if id_arr is not None and hasattr(index, "contains"):
            todo = np.flatnonzero(~np.asarray(index.contains(id_arr), bool))
        items = source if todo.size == n else [source[int(i)] for i in todo]

        best: Face | None = None
        for item in self.run(items):
            if todo.size != n:  # back to positions in source
                item = dataclasses.replace(item, image=int(todo[item.image]))
            if isinstance(item, ImageError):
                errors.append(item)
                continue
            if faces == "all":
                take(item)
                continue
            if best is not None and best.image != item.image:
                take(best)
                best = None
            if best is None or _area(item.box) > _area(best.box):
                best = item
        if best is not None:
            take(best)
        flush()
        return IndexReport(
            ids=np.concatenate(out_ids) if out_ids else np.zeros(0, np.int64),
            image=np.asarray(out_img, np.int64),
            boxes=np.asarray(out_box, np.float32).reshape(-1, 4),
            errors=errors,
            model=self.spec.name,
            model_version=self.spec.version,
            skipped=n - int(todo.size),
        )


def _restamp(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenated crops of one spec, stamped again (concatenation drops the stamp)."""
    from .spec import Crops

    spec = getattr(parts[0], "spec", None)
    out = np.concatenate(parts)
    return out if spec is None else Crops.stamp(out, spec)


def _area(box: np.ndarray) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))
