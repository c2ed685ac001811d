"""The DALI loaders (data.loader = dali): NVIDIA DALI does the augmentation, on the GPU (on the CPU without one).

NVIDIA DALI is imported only when a DALI loader is made (:func:`import_dali`). CIFAR arrays: DALI pads, crops,
flips and normalizes; folders: file bytes through an external source, fn.decoders.image_slice of the crop box
(device "mixed": nvJPEG on the GPU; "cpu" without one), fn.resize (linear, antialiased), fn.crop_mirror_normalize.
Order, crop offsets, boxes and flips come from fastres/data/draws.py, so the batches are the other loaders' images
up to the decoders' and resizers' rounding.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fastres.data.base import DataError, Files, Split, open_regular
from fastres.data.draws import PAD, Resolution, aug_params, epoch_indices, folder_boxes, steps_per_epoch
from fastres.data.folder import decode_rgb, grey
from fastres.errors import UserError, one_line

# ----------------------------------------------------------------------------------------------------
# The DALI loader: NVIDIA DALI does the pad-crop, flip and normalize, on the GPU (on the CPU without one).
#
# Imported only when ``data.loader = "dali"``. The pipeline (one per process, on its LOCAL_RANK device):
#
#     fn.external_source  -> uint8 HWC images, zero-padded to 40x40, in this rank's order for the epoch
#                            + per image: crop position x and y, mirror flag; + int64 labels
#     fn.crop_mirror_normalize (device="gpu")  -> 32x32 crop at the image's offset, mirrored if its flag is
#                            set, (x - 255*mean) / (255*std), NCHW (NHWC when channels_last), fp32 or fp16
#
# Order and augmentation come from the order and augmentation draws above, so batches are the gpu loader's images (up to
# float rounding in the normalize): disjoint, complete shards with the same number of full batches on every
# rank, no duplicates, whatever DALI's prefetching does. Images reach the pipeline one of two ways
# (``data.dali_source``): "host" gathers each batch from a uint8 array in host memory (DALI copies it to the
# GPU); "device" keeps the padded set on the GPU as a torch tensor, gathers there and hands the batch to
# DALI zero-copy through __cuda_array_interface__ / DLPack. ``fastres.tools.bench --what loaders`` measures both.
#
# DALI has no bfloat16: with precision.amp = "bf16" the pipeline writes fp16 and torch casts it (exact for
# the normalized range up to bf16's own rounding).

INSTALL = "pip install nvidia-dali-cuda130  (or: pip install -e '.[dali]'; the bare 'nvidia-dali' is a placeholder)"


def import_dali():
    """(dali.fn, dali.types, pipeline_def, DALIGenericIterator); UserError with the pip command if absent."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise UserError(f"data.loader = 'dali' but NVIDIA DALI does not import ({e}): {INSTALL}") from None
    return fn, types, pipeline_def, DALIGenericIterator


_FORK_HOOK: list[bool] = []
_ORPHANS: list[object] = []


def _disown_pipelines_in_child() -> None:
    """A forked child (a DataLoader worker, say) inherits DALI pipelines but not their threads: shutting
    one down there hangs or aborts the child. The child keeps the native objects referenced, never to be
    destroyed (multiprocessing children leave through os._exit), and the Python side forgets them."""
    from nvidia.dali.pipeline import Pipeline
    for ref in list(getattr(Pipeline, "_pipes", ())):
        pipe = ref()
        if pipe is not None and getattr(pipe, "_pipe", None) is not None:
            _ORPHANS.append(pipe._pipe)
            pipe._pipe = None


class _EpochSource:
    """external_source callbacks: batch ``info.iteration`` of epoch ``base_epoch + info.epoch_idx``.

    The epoch comes from DALI's own counter, not from set_epoch, so batches DALI prefetches ahead of the
    training loop still belong to the right epoch.
    """

    def __init__(self, loader: DaliLoader, base_epoch: int, start: int = 0):
        self.loader, self.base_epoch, self.start, self.cached = loader, base_epoch, start, None

    def _epoch(self, epoch: int):
        if self.cached is None or self.cached[0] != epoch:
            ld = self.loader
            order = epoch_indices(ld.n, ld.seed, epoch, ld.rank, ld.world).numpy()
            dy, dx, flip = (t.numpy() for t in aug_params(ld.n, ld.seed, epoch, ld.flip))
            # crop_mirror_normalize puts the window at pos * (side + 8 - side): pos = offset / 8 is exact in fp32
            pos_x = (dx / (2 * PAD)).astype(np.float32)
            pos_y = (dy / (2 * PAD)).astype(np.float32)
            order_dev = torch.from_numpy(order).to(ld.device) if ld.images_dev is not None else None
            self.cached = (epoch, order, order_dev, pos_x, pos_y, flip.astype(np.int32))
        return self.cached

    def _slice(self, info):
        k = info.iteration + (self.start if info.epoch_idx == 0 else 0)  # the first epoch may resume at `start`
        if k >= len(self.loader):
            raise StopIteration
        b = self.loader.b
        return self._epoch(self.base_epoch + info.epoch_idx), slice(k * b, (k + 1) * b)

    def images(self, info):
        (_, order, order_dev, *_), sl = self._slice(info)
        if self.loader.images_dev is not None:
            batch = self.loader.images_dev.index_select(0, order_dev[sl])  # gathered on the device
            return batch if self.loader.gpu else batch.numpy()  # (DALI takes CPU data as numpy)
        return np.take(self.loader.images_host, order[sl], axis=0)

    def params(self, info):
        (_, order, _, pos_x, pos_y, mirror), sl = self._slice(info)
        idx = order[sl]
        return pos_x[idx], pos_y[idx], mirror[idx], self.loader.labels[idx]


class DaliLoader:
    def __init__(self, split: Split, *, batch_per_rank: int, seed: int, rank: int, world: int,
                 device: torch.device, channels_last: bool, dtype: torch.dtype, num_threads: int = 4,
                 source: str = "host", flip: str = "random", norm: tuple):
        self._setup_dali()
        self.n, self.b, self.seed, self.rank, self.world = len(split), batch_per_rank, seed, rank, world
        self.device, self.channels_last, self.dtype, self.flip = device, channels_last, dtype, flip
        self.num_threads, self.norm, self.image_shapes = max(1, num_threads), norm, [tuple(split.x.shape[1:])]
        self.gpu = device.type == "cuda"
        padded = np.pad(split.x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD))).transpose(0, 2, 3, 1)  # N,40,40,3
        padded = np.ascontiguousarray(padded)
        self.labels = split.y.astype(np.int64)
        self.images_dev = torch.from_numpy(padded).to(device) if source == "device" else None
        self.images_host = padded if source == "host" else None
        self.epoch, self.start = 0, 0
        self._build(0)

    def __len__(self) -> int:
        return steps_per_epoch(self.n, self.b, self.world)

    def _build(self, base_epoch: int, start: int = 0) -> None:
        fn, gpu = self.fn, self.gpu
        src = _EpochSource(self, base_epoch, start)

        on_device = gpu and self.images_dev is not None
        # the batch is gathered on torch's current stream: DALI copies it on that stream too, in order, instead of
        # blocking the host until the gather is done (external_source's cuda_stream)
        stream = {"cuda_stream": torch.cuda.current_stream(self.device)} if on_device else {}

        @self._pipeline_def()
        def pipeline():
            images = fn.external_source(source=src.images, batch=True, batch_info=True, layout="HWC",
                                        device="gpu" if on_device else "cpu", **stream)
            pos_x, pos_y, mirror, labels = fn.external_source(source=src.params, num_outputs=4, batch=True,
                                                              batch_info=True)
            if gpu and not on_device:
                images = images.gpu()
            out = self._normalized(images, mirror, crop=self.image_shapes[0][1:], crop_pos_x=pos_x, crop_pos_y=pos_y)
            return out, labels.gpu() if gpu else labels

        self._start(pipeline(), base_epoch)

    def _setup_dali(self) -> None:
        """DALI's modules; once a process, the fork hook that keeps a forked child off the parent's pipelines."""
        self.fn, self.types, self.pipeline_def, self.Iterator = import_dali()
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_disown_pipelines_in_child)
            _FORK_HOOK.append(True)

    def _pipeline_def(self):
        """The decorator of this loader's pipelines: its batch, threads and device, two batches prefetched."""
        return self.pipeline_def(batch_size=self.b, num_threads=self.num_threads,
                                 device_id=self.device.index if self.gpu else None, prefetch_queue_depth=2)

    def _normalized(self, images, mirror, **crop):
        """The pipeline's last op, both loaders': mirror, (crop,) normalize by data's mean and std, in the
        loader's dtype and layout, on the device."""
        types, fp16 = self.types, self.dtype in (torch.float16, torch.bfloat16)
        return self.fn.crop_mirror_normalize(
            images, device="gpu" if self.gpu else "cpu", mirror=mirror, mean=[255 * m for m in self.norm[0]],
            std=[255 * s for s in self.norm[1]], dtype=types.FLOAT16 if fp16 else types.FLOAT,
            output_layout="HWC" if self.channels_last else "CHW", **crop)

    def _start(self, pipe, base_epoch: int) -> None:
        """Build the pipeline (outputs: images, labels) and iterate it; it starts at epoch ``base_epoch``."""
        pipe.build()
        self.iterator = self.Iterator(pipe, ["images", "labels"], auto_reset=False, prepare_first_batch=False)
        self.pipe_epoch, self.needs_reset = base_epoch, False

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.pipe_epoch != self.epoch or self.start:  # first use after a jump (resume) or a partly read epoch
            self._build(self.epoch, self.start)
        elif self.needs_reset:  # here, not at the end of the last epoch: its prefetch is then training time
            self.iterator.reset()
        self.pipe_epoch, self.needs_reset = None, True
        for batch in self.iterator:
            x, y = batch[0]["images"], batch[0]["labels"]
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: the channels_last layout
            yield (x if x.dtype == self.dtype else x.to(self.dtype)), y
        self.pipe_epoch = self.epoch + 1  # where DALI's own epoch counter now stands


def _file_bytes(path: Path, mode: str, grey_size: tuple[int, int] | None) -> np.ndarray:
    """What the DALI decoder reads for one file: its bytes; re-encoded losslessly by Pillow when its mode is not
    RGB or L (CMYK, palette, alpha: Pillow's conversion, as the workers loader); for a known bad file a grey PNG
    of its size ``grey_size`` (so its crop box fits)."""
    try:
        if grey_size is None and mode in ("RGB", "L"):
            with open_regular(path) as f:
                data = np.fromfile(f, dtype=np.uint8)
            if _whole(data):
                return data
        # a cut-off file goes to Pillow, which names it: DALI's decoder would print its own [ERROR] line first
        img = decode_rgb(path, skip_bad=True) if grey_size is None else grey(grey_size)
    except OSError:
        img = None
    if img is None:  # gone, replaced or bad since indexing: no bytes, DALI fails the batch and Pillow names the file
        return np.zeros(0, np.uint8)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _whole(data: np.ndarray) -> bool:
    """Whether a JPEG or PNG file's bytes run to their format's end marker (EOI; IEND), trailing zeros aside."""
    tail = bytes(np.trim_zeros(data[-4096:], "b")[-8:])
    if bytes(data[:2]) == b"\xff\xd8":
        return tail.endswith(b"\xff\xd9")
    if bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        return tail.endswith(b"IEND\xaeB`\x82")
    return True  # another format: DALI's decoder decides


class _FolderEpochSource(_EpochSource):
    """external_source callbacks of the folder DALI loader: file bytes, then boxes (pixels), mirror, labels and the
    epoch's training side (progressive resizing: DALI's epoch counter picks it, prefetched batches included)."""

    def _epoch(self, epoch: int):
        if self.cached is None or self.cached[0] != epoch:
            ld = self.loader
            order = epoch_indices(ld.n, ld.seed, epoch, ld.rank, ld.world).numpy()
            boxes = folder_boxes(ld.files.sizes, ld.seed, epoch, ld.flip, ld.augment)
            top, left, h, w, flip = (t.numpy() for t in boxes)
            anchor = np.stack([top, left], 1).astype(np.float32)  # pixels, (y, x): axis_names = "HW"
            shape = np.stack([h, w], 1).astype(np.float32)
            side = np.full(2, ld.resolution.at(epoch), np.float32)
            self.cached = (epoch, order, anchor, shape, flip.astype(np.int32), side)
        return self.cached

    def images(self, info):
        (_, order, *_), sl = self._slice(info)
        ld = self.loader
        args = [(ld.files.root / ld.files.paths[i], ld.files.modes[i],
                 tuple(ld.files.sizes[i]) if ld.files.paths[i] in ld.skipped else None) for i in order[sl]]
        return list(ld.pool.map(lambda a: _file_bytes(*a), args))

    def params(self, info):
        (_, order, anchor, shape, mirror, side), sl = self._slice(info)
        idx = order[sl]
        return anchor[idx], shape[idx], mirror[idx], self.loader.files.y[idx], np.tile(side, (len(idx), 1))


def _dali_reason(e: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    after = [b for a, b in zip(lines, lines[1:]) if a == "encountered:"]
    return one_line(after[0] if after else lines[-1] if lines else e, 200)


class FolderDaliLoader(DaliLoader):
    """The DALI loader over files (see the section's comment); set_epoch / __iter__ / resume as DaliLoader's."""

    def __init__(self, files: Files, *, batch_per_rank: int, seed: int, rank: int, world: int, device: torch.device,
                 channels_last: bool, dtype: torch.dtype, num_threads: int, flip: str, norm: tuple,
                 resolution: Resolution, skip_bad: bool, augment: str = "rrc"):
        self._setup_dali()
        self.files, self.n, self.b, self.seed = files, len(files), batch_per_rank, seed
        self.rank, self.world = rank, world
        self.device, self.channels_last, self.dtype, self.flip, self.norm = device, channels_last, dtype, flip, norm
        self.num_threads, self.resolution, self.augment = max(1, num_threads), resolution, augment
        self.skip_bad, self.skipped = skip_bad, set()
        self.image_shapes = [(3, side, side) for side in resolution.sides()]
        self.gpu = device.type == "cuda"
        self.pool = ThreadPoolExecutor(self.num_threads)  # file reads: I/O, outside DALI's own threads
        self.epoch, self.start = 0, 0
        self._build(0)

    def _build(self, base_epoch: int, start: int = 0) -> None:
        fn, types, gpu = self.fn, self.types, self.gpu
        src = _FolderEpochSource(self, base_epoch, start)
        self.first_batch = start

        @self._pipeline_def()
        def pipeline():
            data = fn.external_source(source=src.images, batch=True, batch_info=True, dtype=types.UINT8)
            anchor, shape, mirror, labels, side = fn.external_source(source=src.params, num_outputs=5, batch=True,
                                                                     batch_info=True)
            # decode the box alone (nvJPEG's ROI decode on a GPU), then resize all of it: a resize of a region of
            # the whole image would read pixels outside the box at its edges, where Pillow's crop-then-resize does not;
            # EXIF orientation ignored, as Pillow's open and torchvision's ImageFolder do (the boxes are the header's)
            if self.augment == "pad-crop":  # a window over the edge: the whole image, then a slice padded with zeros
                images = fn.slice(fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                                    adjust_orientation=False),
                                  anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                  out_of_bounds_policy="pad", fill_values=0)
            else:
                images = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", normalized_anchor=False,
                                                 normalized_shape=False, device="mixed" if gpu else "cpu",
                                                 output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, size=side, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)
            return self._normalized(images, mirror), labels.gpu() if gpu else labels

        self._start(pipeline(), base_epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = self.start
        while True:
            try:
                for x, y in super().__iter__():
                    k += 1
                    yield x, y
                return
            except RuntimeError as e:  # DALI stops the whole batch at a file it cannot decode: find it with Pillow
                bad = self._undecodable(k, e)
                self.skipped.update(bad)
                self.set_epoch(self.epoch, k)  # and rebuild from the batch it stopped at
                self.pipe_epoch = None

    def _undecodable(self, k: int, e: Exception) -> list[str]:
        """The files of batches k to k + 2 (DALI's prefetch) that Pillow cannot decode; the one-line error for the
        first unless data.skip_bad; a DataError with DALI's own message if Pillow decodes them all."""
        order = epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world)[k * self.b:(k + 3) * self.b]
        bad = [self.files.paths[i] for i in order.tolist() if self.files.paths[i] not in self.skipped
               and decode_rgb(self.files.root / self.files.paths[i], skip_bad=True) is None]
        if not bad:
            raise DataError(f"DALI failed in batch {k} of epoch {self.epoch + 1} ({_dali_reason(e)}) on files that "
                            "Pillow decodes: try data.loader = workers, and report the file") from None
        if not self.skip_bad:
            decode_rgb(self.files.root / bad[0])  # raises its one line
        return bad
