"""The batching inference engine: one worker thread owns the model on its device.

Callers on any thread call :meth:`Engine.encode` / :meth:`Engine.decode`; each call
resizes its images on the calling thread, puts one request on a queue and waits on a
future. The worker takes a request, takes every request already queued and gathers more
for up to ``max_wait_ms`` until it holds ``max_batch`` images, and runs them as torch
batches under ``torch.inference_mode()``. So concurrent C-STOREs share GPU batches, and an
error in a batch reaches every caller of that batch instead of hanging them.

Encoding is float inference (``torch.autocast`` with float16 on CUDA): a latent is
computed once and archived. On the CPU a batch's images run one at a time through the
network (a batch gains little there and would hold every image's activations at once;
the memory a node needs then does not grow with ``max_batch``). Decoding is integer-valued (:mod:`latentpacs.codec.integer`,
built once per model and process): a latent decodes to the same 16-bit image whatever the
batch, thread count, process, machine or device, so a derived SOP Instance UID always
carries the same pixels.

Images are canonical float32 in [0, 1] (rows x cols); the model sees them resized
bilinearly with antialiasing to its square input. Reconstructions are resized back in
integer arithmetic (:func:`~latentpacs.codec.integer.resize_uint16`) and given to callers
as ``v / 65535``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
import torch
import torch.nn.functional as F

from latentpacs import metrics
from latentpacs.codec.integer import (
    IntegerDecoder,
    IntegerPlan,
    build_integer_decoder,
    resize_uint16,
    to_canonical,
)
from latentpacs.codec.latent import LatentFormat
from latentpacs.codec.modelfile import LoadedModel
from latentpacs.errors import LatentFormatError, ModelError, PixelDataError, UnsupportedImageError

logger = logging.getLogger(__name__)

_ENCODE, _DECODE = "encode", "decode"

_plans: dict[str, IntegerPlan] = {}
_plans_lock = threading.Lock()


def integer_plan(loaded: LoadedModel) -> IntegerPlan:
    """The integer decoder of a verified model, built once per weights SHA-256 and process.

    Raises
    ------
    ModelError
        When the model's decoder cannot be computed exactly in integers.
    """
    with _plans_lock:
        plan = _plans.get(loaded.card.sha256)
        if plan is None:
            plan = build_integer_decoder(loaded.model.eval(), loaded.latent_format)
            _plans[loaded.card.sha256] = plan
            release_free_memory()  # the calibration's temporaries
        return plan


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim``).

    glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the
    heap, so after the calibration pass a process would go on holding some 100 MiB it
    no longer uses, on top of whatever it allocates later. A no-op where the C library
    has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return function


def resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float image to ``shape`` (rows, cols): bilinear, antialiased, float32.

    The one resize of latentpacs (torch ``interpolate``, ``align_corners=False``), used
    before encoding, after decoding, in training and in evaluation alike. Antialiasing
    only changes a shrink; an enlargement (a decode back to the detector matrix) takes
    the plain bilinear kernel, the same weights at half the cost (within 3e-5).
    """
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"cannot resize to {shape}")
    if tuple(source.shape) == (rows, cols):
        return source.numpy().copy()
    shrinks = rows < source.shape[0] or cols < source.shape[1]
    out = F.interpolate(
        source[None, None], size=(rows, cols), mode="bilinear", align_corners=False,
        antialias=shrinks,
    )
    return out[0, 0].numpy()


@dataclass
class _Request:
    kind: str
    batch: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)
    #: When the request was made (``time.monotonic``): its queue wait ends when its batch starts.
    made: float = field(default_factory=time.monotonic)


class Engine:
    """Encode and decode batches of images with one loaded model on one device.

    Parameters
    ----------
    loaded:
        A verified model from :func:`~latentpacs.codec.modelfile.load_model`; the engine
        moves its module to ``device`` and keeps it in ``eval()`` mode.
    device:
        ``"cuda"``, ``"cuda:N"`` or ``"cpu"``; ``None`` picks CUDA when available.
    max_batch:
        Most images run in one torch batch.
    max_wait_ms:
        How long the worker waits for more requests before running a partial batch
        (requests already queued always join the batch, up to ``max_batch`` images).

    Raises
    ------
    ModelError
        When the device is unknown, CUDA is requested but not available,
        ``max_batch`` < 1, or the model's decoder cannot be made integer.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | None = None,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
    ) -> None:
        if max_batch < 1:
            raise ModelError(f"max_batch must be at least 1, got {max_batch}")
        name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.device = torch.device(name)
        except RuntimeError as exc:
            raise ModelError(f"unknown inference device {name!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {name!r} requested but CUDA is not available")
        self.loaded = loaded
        self.integer_decoder = IntegerDecoder(integer_plan(loaded), self.device)
        self.model = loaded.model.to(self.device).eval()
        self.latent_format: LatentFormat = loaded.latent_format
        self.image_size = loaded.model.image_size
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._gate = threading.Event()
        self._gate.set()
        self._pending = 0
        self._batches_run = 0
        self._images_run = 0
        self._worker = threading.Thread(target=self._serve, name="latentpacs-engine", daemon=True)
        self._worker.start()
        logger.info(
            "engine for %s on %s (max_batch %d)", loaded.card.name, self.device, max_batch
        )

    @property
    def batches_run(self) -> int:
        """Number of torch batches the worker has run."""
        return self._batches_run

    @property
    def images_run(self) -> int:
        """Number of images (or latents) the worker has run."""
        return self._images_run

    @property
    def pending(self) -> int:
        """Number of submitted requests not answered yet."""
        with self._lock:
            return self._pending

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the worker from starting a batch until the block ends.

        Requests submitted meanwhile queue up (see :attr:`pending`); on release the worker
        batches every queued request, up to ``max_batch`` images a batch. Batching is
        then a function of what was queued, not of timing.
        """
        self._gate.clear()
        try:
            yield
        finally:
            self._gate.set()

    def encode(self, images: Sequence[np.ndarray]) -> list[bytes]:
        """Encode canonical images of any size to latent bytes, one per image.

        Raises
        ------
        UnsupportedImageError
            When an image is not 2-D.
        PixelDataError
            When an image holds a non-finite value.
        """
        if not images:
            return []
        size = self.image_size
        batch = np.empty((len(images), size, size), np.float32)
        for i, image in enumerate(images):  # each resized straight into the batch
            batch[i] = self._prepare(image)
        latents = self._submit(_ENCODE, batch)
        return [self.latent_format.to_bytes(z) for z in latents]

    def decode(
        self, latents: Sequence[bytes], shapes: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Decode latent bytes to float32 images of the given (rows, cols), in [0, 1].

        Each image is :meth:`decode_uint16`'s divided by 65535 (float32, correctly
        rounded), so it is the same on every machine.

        Raises
        ------
        LatentFormatError
            When a latent has the wrong length, or the counts differ.
        """
        small = self._decode_model_size(latents, shapes)
        return [to_canonical(resize_uint16(image, shape)) for image, shape in zip(small, shapes)]

    def decode_uint16(
        self, latents: Sequence[bytes], shapes: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Decode latent bytes to 16-bit images (uint16, 0 to 65535) of the given shapes.

        Integer-valued throughout (:mod:`latentpacs.codec.integer`): the result depends
        on the latent, the model and the shape only.

        Raises
        ------
        LatentFormatError
            When a latent has the wrong length, or the counts differ.
        """
        small = self._decode_model_size(latents, shapes)
        return [resize_uint16(image, shape) for image, shape in zip(small, shapes)]

    def _decode_model_size(
        self, latents: Sequence[bytes], shapes: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        """The 16-bit images (B, S, S) at the model's size; each caller resizes one at a time,
        so a batch holds one full-size temporary, not one per image."""
        if len(latents) != len(shapes):
            raise LatentFormatError(f"{len(latents)} latents but {len(shapes)} shapes")
        if not latents:
            return np.zeros((0, self.image_size, self.image_size), np.uint16)
        codes = np.stack([self.latent_format.indices_from_bytes(bytes(data)) for data in latents])
        return self._submit(_DECODE, codes)

    def encode_resized(self, batch: np.ndarray) -> np.ndarray:
        """Float latents (B, D) of images already at the model's size, shape (B, S, S)."""
        size = self.image_size
        values = np.asarray(batch, dtype=np.float32)
        if values.ndim != 3 or values.shape[1:] != (size, size):
            raise UnsupportedImageError(f"expected a batch (B, {size}, {size}), got {values.shape}")
        if values.shape[0] == 0:
            return np.zeros((0, self.latent_format.latent_dim), np.float32)
        return self._submit(_ENCODE, np.ascontiguousarray(values))

    def close(self) -> None:
        """Stop the worker after the requests already queued; later calls raise ModelError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._gate.set()
        self._worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        values = np.asarray(image, dtype=np.float32)
        if values.ndim != 2:
            raise UnsupportedImageError(f"expected a 2-D canonical image, got shape {values.shape}")
        size = (self.image_size, self.image_size)
        if values.size:
            # the usual case, an image already in [0, 1], needs no clipped copy: the
            # minimum and maximum are NaN or infinite when any value is, and clipping an
            # in-range image changes no bit
            low, high = float(values.min()), float(values.max())
            if 0.0 <= low and high <= 1.0:
                return resize_bilinear(values, size)
        if not np.all(np.isfinite(values)):
            raise PixelDataError("canonical image holds a non-finite value")
        return resize_bilinear(np.clip(values, 0.0, 1.0), size)

    def _submit(self, kind: str, batch: np.ndarray) -> np.ndarray:
        request = _Request(kind, batch)
        with self._lock:
            if self._closed:
                raise ModelError("the inference engine is closed")
            self._pending += 1
            self._queue.put(request)
        try:
            return request.future.result()
        finally:
            with self._lock:
                self._pending -= 1

    def _serve(self) -> None:
        """Worker loop: gather requests into batches until the closing sentinel."""
        running = True
        while running:
            first = self._queue.get()
            self._gate.wait()
            if first is None:
                break
            requests = [first]
            count = len(first.batch)
            deadline = time.monotonic() + self.max_wait_s
            while count < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    running = False
                    break
                requests.append(nxt)
                count += len(nxt.batch)
            for kind in (_ENCODE, _DECODE):
                group = [r for r in requests if r.kind == kind]
                if group:
                    self._run_group(kind, group)

    def _run_group(self, kind: str, group: list[_Request]) -> None:
        started = time.monotonic()
        metrics.engine_waits(kind, (started - request.made for request in group))
        try:
            inputs = np.concatenate([r.batch for r in group])
            outputs = [
                self._run_batch(kind, inputs[start : start + self.max_batch])
                for start in range(0, len(inputs), self.max_batch)
            ]
            result = np.concatenate(outputs)
        except BaseException as exc:  # delivered to every caller; the worker lives on
            logger.exception("engine %s batch of %d request(s) failed", kind, len(group))
            for request in group:
                request.future.set_exception(exc)
            return
        start = 0
        for request in group:
            request.future.set_result(result[start : start + len(request.batch)])
            start += len(request.batch)

    def _run_batch(self, kind: str, inputs: np.ndarray) -> np.ndarray:
        metrics.engine_batch(kind, len(inputs))
        if kind == _DECODE:
            images = self.integer_decoder.decode_indices(inputs)
            self._batches_run += 1
            self._images_run += len(inputs)
            return images
        cuda = self.device.type == "cuda"
        # On the CPU one image at a time: a batch gains little there, its activations
        # would be held for every image at once, and a latent then does not depend on
        # which requests shared its batch. On CUDA the batch runs whole.
        step = len(inputs) if cuda else 1
        latents = np.empty((len(inputs), self.latent_format.latent_dim), np.float32)
        for start in range(0, len(inputs), step):
            tensor = torch.from_numpy(inputs[start : start + step]).to(self.device)
            precision = torch.autocast("cuda", torch.float16) if cuda else nullcontext()
            with torch.inference_mode(), precision:
                output = self.model.encode(tensor[:, None])
            latents[start : start + step] = output.float().cpu().numpy()
        self._batches_run += 1
        self._images_run += len(inputs)
        return latents
