"""Image streams for every task: any source -> preprocessed [-1, 1] tensors, with a bad-file policy.

Public API::

    ds = open_image_source(source, image_size=256)           # IterableDataset of samples
    loader = make_loader(source, image_size=256, batch_size=32, num_workers=4)
    for batch in loader: batch["image"]  # FloatTensor [B, 3, S, S] in [-1, 1]
    loader.bad_files                      # {name: reason} of every input skipped so far

Samples are dicts ``{"image": FloatTensor [3, S, S] in [-1, 1], "label": int (-1 unknown),
"key": str, "path": str, "bad": list[(name, reason)]}``.

Images are read as displayed by :func:`xqtool.data.reading.decode_image` (EXIF orientation, exact
16-bit scaling; ``read_options``). Bad inputs (corrupt / truncated / zero-byte files, non-images in a
folder, unreadable folders, decompression bombs over PIL's ``Image.MAX_IMAGE_PIXELS``, images over the
aspect-ratio limit, 32-bit ``I``/``F`` images, bad shard members, unreadable shards) follow ``bad_files``:

* ``"skip"`` (default): the input is skipped, logged, and reported. Each sample's ``"bad"`` lists the
  inputs skipped (by the same reader) since the previous sample, so reports survive DataLoader worker
  processes; inputs skipped after the last sample of a reader travel in a *marker* sample (``"image"``
  is None) that only appears when ``ds.emit_markers`` is True (``make_loader`` sets it and its collate
  drops markers). In the current process ``ds.bad_files`` also collects ``{name: reason}``.
  ``make_loader``'s batches carry ``"bad"`` (list of (name, reason)) and the loader accumulates them
  in ``loader.bad_files``.
* ``"fail"``: stop with :class:`~xqtool.errors.DataError` naming the input.

Streams are split by node (``torch.distributed`` rank, or ``RANK``/``WORLD_SIZE``) and by DataLoader
worker. Evaluation streams (``train=False``) keep the source order within each reader and apply the
ADM center crop; training streams reshuffle every epoch (``loader`` epochs, or ``ds.set_epoch``),
apply the ADM random-resize-crop and flip, and with ``resample=True`` never end.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from xqtool.data.reading import BadInput, ReadOptions, decode_image
from xqtool.data.shards import iter_shard_records, shard_url_stream, warn_if_few_shards
from xqtool.data.sources import RawRecord, SourceLike, SourceSpec, file_records, resolve_source
from xqtool.data.transforms import eval_transform, train_transform
from xqtool.errors import DataError

log = logging.getLogger(__name__)

BAD_FILE_POLICIES = ("skip", "fail")
_MAX_BAD_WARNINGS = 20

BadList = List[Tuple[str, str]]


def check_policy(bad_files: str) -> str:
    """Validate a bad-file policy name."""
    if bad_files not in BAD_FILE_POLICIES:
        raise DataError(f"bad_files must be 'skip' or 'fail', not {bad_files!r}")
    return bad_files


def process_records(
    records: Iterable[RawRecord],
    views: Callable[[Image.Image], Any],
    *,
    bad_files: str,
    on_bad: Callable[[str, str], None],
    options: Optional[ReadOptions] = None,
) -> Iterator[Tuple[RawRecord, Any]]:
    """Decode (:func:`~xqtool.data.reading.decode_image` with `options`, default from the environment)
    and transform each record -> (record, views(image)); bad inputs go to the policy.

    Under ``"skip"`` each bad input calls ``on_bad(name, reason)``; under ``"fail"`` a DataError
    naming it is raised.
    """
    opts = options if options is not None else ReadOptions.from_env()
    for rec in records:
        try:
            if rec.error is not None:
                raise BadInput(rec.error)
            out = views(decode_image(rec.data, opts))
        except BadInput as exc:
            reason = str(exc)
            if bad_files == "fail":
                raise DataError(f"bad input {rec.name}: {reason} (remove it, or skip bad files: --bad-files skip, or data.bad_files: skip in a config)") from None
            on_bad(rec.name, reason)
            continue
        yield rec, out


class _BadLog:
    """Logs skipped inputs (the first few loudly) and keeps them for the caller."""

    def __init__(self) -> None:
        self.pending: BadList = []
        self.all: Dict[str, str] = {}

    def __call__(self, name: str, reason: str) -> None:
        if len(self.all) < _MAX_BAD_WARNINGS:
            log.warning("skipping bad input %s: %s", name, reason)
        elif len(self.all) == _MAX_BAD_WARNINGS:
            log.warning("more bad inputs are being skipped; see the run summary")
        self.pending.append((name, reason))
        self.all[name] = reason

    def take(self) -> BadList:
        out, self.pending = self.pending, []
        return out


class ImageStream(IterableDataset):
    """IterableDataset over a resolved source; see the module docstring for samples and policies."""

    def __init__(
        self,
        spec: SourceSpec,
        *,
        image_size: int,
        train: bool = False,
        bad_files: str = "skip",
        seed: int = 0,
        resample: bool = False,
        shuffle_buffer: int = 1000,
        read_options: Optional[ReadOptions] = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.image_size = int(image_size)
        self.train = bool(train)
        self.train_tf: Optional[Callable[[Image.Image, random.Random], torch.Tensor]] = None  # None: ADM crop + flip
        self.bad_files_policy = check_policy(bad_files)
        self.seed = int(seed)
        self.resample = bool(resample)
        self.shuffle_buffer = int(shuffle_buffer)
        self.read_options = read_options if read_options is not None else ReadOptions.from_env()
        self.epoch = 0
        self.emit_markers = False
        self._log = _BadLog()

    # -- public helpers ---------------------------------------------------------------------------
    @property
    def classes(self) -> Optional[List[str]]:
        """Class names of a class-tree source (label i = classes[i]), else None."""
        return self.spec.classes

    @property
    def num_items(self) -> Optional[int]:
        """Number of listed files (folders / lists), None for shards (unknown until read)."""
        return len(self.spec.items) if self.spec.kind == "files" else None

    @property
    def bad_files(self) -> Dict[str, str]:
        """{name: reason} of inputs skipped while iterating in THIS process (num_workers=0)."""
        return self._log.all

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of the next iteration (training streams)."""
        self.epoch = int(epoch)

    # -- iteration --------------------------------------------------------------------------------
    def _file_records(self, epoch: int, rank: int, world: int, worker: int, nworkers: int) -> Iterator[RawRecord]:
        items = list(self.spec.items)
        e = epoch
        while True:
            order = list(range(len(items)))
            if self.train:
                random.Random(f"files-{self.seed}-{e}").shuffle(order)
            mine = order[rank * nworkers + worker :: world * nworkers]
            yield from file_records([items[i] for i in mine])
            if not self.resample:
                return
            e += 1

    def _shard_records(self, epoch: int, rng: random.Random) -> Iterator[RawRecord]:
        def records() -> Iterator[RawRecord]:
            urls = shard_url_stream(
                self.spec.urls, train=self.train, resample=self.resample, seed=self.seed, epoch=epoch
            )
            for url in urls:
                yield from iter_shard_records(url)

        if self.train and self.shuffle_buffer > 1:
            initial = min(100, self.shuffle_buffer)
            return wds.shuffle(self.shuffle_buffer, initial, rng=rng)(records())
        return records()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        rank, world, worker, nworkers = wds.utils.pytorch_worker_info()
        epoch = self.epoch
        if torch.utils.data.get_worker_info() is None:
            self.epoch += 1  # in-process iteration advances by itself; loaders call set_epoch
        rng = random.Random(f"{self.seed}-{epoch}-{rank}-{worker}")
        if self.spec.kind == "files":
            records = self._file_records(epoch, rank, world, worker, nworkers)
        else:
            if worker == 0 and not self.resample:
                warn_if_few_shards(len(self.spec.urls), world, nworkers)
            records = self._shard_records(epoch, rng)
        if self.train:
            # each sample's crop/flip draws from its own seed (run seed, epoch, sample name), so the
            # augmentation of an image does not depend on the number of processes or workers
            tf = self.train_tf or train_transform(self.image_size)
            aug_rng = random.Random()
            views: Callable[[Image.Image], torch.Tensor] = lambda img: tf(img, aug_rng)  # noqa: E731

            def reseeded(recs: Iterable[RawRecord]) -> Iterator[RawRecord]:
                for rec in recs:
                    aug_rng.seed(f"aug-{self.seed}-{epoch}-{rec.name}")
                    yield rec

            records = reseeded(records)
        else:
            views = eval_transform(self.image_size)
        for rec, image in process_records(
            records, views, bad_files=self.bad_files_policy, on_bad=self._log, options=self.read_options
        ):
            yield {"image": image, "label": int(rec.label), "key": rec.key, "path": rec.name, "bad": self._log.take()}
        trailing = self._log.take()
        if trailing and self.emit_markers:
            yield {"image": None, "label": -1, "key": "", "path": "", "bad": trailing}


def open_image_source(
    source: SourceLike,
    *,
    image_size: int,
    train: bool = False,
    bad_files: str = "skip",
    seed: int = 0,
    resample: bool = False,
    read_options: Optional[ReadOptions] = None,
    train_tf: Optional[Callable[[Image.Image, random.Random], torch.Tensor]] = None,
) -> ImageStream:
    """Open any image source as an IterableDataset of preprocessed samples.

    Args:
        source: class-tree dir, flat dir, .txt file list, single image, list of paths, or WebDataset
            shards (local path, shard folder, brace pattern, ``http(s)://`` / ``pipe:`` URL).
        image_size: S, the square side of the output images.
        train: ADM random-resize-crop + flip and per-epoch reshuffling (else ADM center crop, fixed order).
        bad_files: ``"skip"`` (skip, count, report) or ``"fail"`` (DataError naming the input).
        seed: shuffling / augmentation seed.
        resample: endless stream (files: epoch after epoch; shards: ``wds.ResampledShards``).
        read_options: EXIF orientation and aspect-ratio limit (default :meth:`ReadOptions.from_env`).
        train_tf: training transform ``(image, rng) -> [3, S, S]`` replacing the ADM one (e.g. VAR's
            :func:`~xqtool.data.transforms.var_train_transform`).

    Yields dicts ``{"image": FloatTensor [3, S, S] in [-1, 1], "label": int, "key": str, "path": str,
    "bad": list[(name, reason)]}``. Raises DataError for a missing or empty source.
    """
    spec = resolve_source(source)
    stream = ImageStream(
        spec, image_size=image_size, train=train, bad_files=bad_files, seed=seed, resample=resample,
        read_options=read_options,
    )
    stream.train_tf = train_tf
    return stream


def collate_samples(samples: Sequence[Dict[str, Any]], image_size: int) -> Dict[str, Any]:
    """Batch samples (dropping marker samples) -> {"image": [B,3,S,S], "label": LongTensor[B],
    "key": list[str], "path": list[str], "bad": list[(name, reason)]} (B may be 0)."""
    real = [s for s in samples if s["image"] is not None]
    bad = [tuple(b) for s in samples for b in s.get("bad", ())]
    if real:
        images = torch.stack([s["image"] for s in real])
    else:
        images = torch.empty(0, 3, image_size, image_size)
    return {
        "image": images,
        "label": torch.tensor([int(s["label"]) for s in real], dtype=torch.long),
        "key": [s["key"] for s in real],
        "path": [s.get("path", "") for s in real],
        "bad": bad,
    }


def _one_line_data_error(exc: DataError) -> DataError:
    """DataLoader workers re-raise with a traceback in the message; keep the original last line."""
    text = str(exc)
    if "\n" not in text:
        return exc
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    prefix = "xqtool.errors.DataError: "
    return DataError(last[len(prefix):] if last.startswith(prefix) else last)


def one_line_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate `batches` (a DataLoader), re-raising a worker's DataError as its one-line message."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DataError as exc:
            raise _one_line_data_error(exc) from None
        yield batch


class ImageLoader(DataLoader):
    """DataLoader over an :class:`ImageStream` that collects skipped inputs in ``bad_files``.

    Do not pass it through ``accelerator.prepare``: the stream already splits by node.
    """

    def __init__(self, dataset: ImageStream, *, batch_size: int, num_workers: int, drop_last: bool, **kw: Any):
        dataset.emit_markers = True
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=False,
            collate_fn=functools.partial(collate_samples, image_size=dataset.image_size),
            persistent_workers=False,
            **kw,
        )
        self.drop_partial = bool(drop_last)
        self.skipped: Dict[str, str] = {}
        self._epoch = 0

    @property
    def bad_files(self) -> Dict[str, str]:
        """{name: reason} of every input skipped by any worker so far (all epochs)."""
        return self.skipped

    def __iter__(self) -> Iterator[Dict[str, Any]]:  # type: ignore[override]
        ds: ImageStream = self.dataset  # type: ignore[assignment]
        ds.set_epoch(self._epoch)
        self._epoch += 1
        for batch in one_line_errors(super().__iter__()):
            for name, reason in batch["bad"]:
                self.skipped[name] = reason
            n = batch["image"].shape[0]
            if n == 0 or (self.drop_partial and n < self.batch_size):
                continue
            yield batch


def make_loader(
    source: SourceLike,
    *,
    image_size: int,
    batch_size: int,
    train: bool = False,
    num_workers: int = 0,
    bad_files: str = "skip",
    seed: int = 0,
    resample: bool = False,
    drop_last: bool = False,
    read_options: Optional[ReadOptions] = None,
    train_tf: Optional[Callable[[Image.Image, random.Random], torch.Tensor]] = None,
) -> ImageLoader:
    """DataLoader over :func:`open_image_source` -> batches
    ``{"image": FloatTensor [B, 3, S, S] in [-1, 1], "label": LongTensor [B], "key": list[str],
    "path": list[str], "bad": list[(name, reason)]}``; ``loader.bad_files`` accumulates skipped inputs
    from all workers. ``drop_last`` drops each reader's final partial batch.
    """
    ds = open_image_source(
        source, image_size=image_size, train=train, bad_files=bad_files, seed=seed, resample=resample,
        read_options=read_options,
        train_tf=train_tf,
    )
    return ImageLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)
