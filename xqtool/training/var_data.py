"""VAR training data (spec var.md §3): token rows or images encoded on the fly, as exactly resumable batches.

:func:`build_data` picks the source of a ``VARConfig``'s ``data`` section: a ``.npy`` token file
(:class:`TokenArrayBatches`, map-style, exact resume also across batch-size and process-count changes), token
shards or images encoded by the frozen tokenizer (:class:`StreamBatches`). :func:`check_tokenizer_fit` checks the
VAR geometry against the tokenizer; :func:`class_labels` maps unknown labels to the unconditional class.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch
from torch import Tensor

from xqtool.config import VARConfig
from xqtool.errors import ConfigError, DataError
from xqtool.checkpoints.training_state import SampleBatches


def check_tokenizer_fit(model_cfg: Any, tokenizer: Any, *, trained: bool = False) -> None:
    """ConfigError when the VAR geometry does not match the tokenizer (scales, P, K, D).

    ``trained=False`` (train-var): the fix is a config override ``--set model.NAME=VALUE``. ``trained=True``
    (sample, a finished VAR whose geometry cannot change): the fix is the tokenizer the VAR was trained on.
    """
    pairs = [("patch_nums", tuple(model_cfg.patch_nums), tuple(int(s) for s in tokenizer.scales)),
             ("num_branches", model_cfg.num_branches, int(tokenizer.num_branches)),
             ("codebook_size", model_cfg.codebook_size, int(tokenizer.codebook_size)),
             ("branch_dim", model_cfg.branch_dim, int(tokenizer.embed_dim))]
    for name, ours, theirs in pairs:
        if ours != theirs:
            show = (lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
            if trained:
                raise ConfigError(f"the VAR has {name} {show(ours)} but the tokenizer has {show(theirs)}: "
                                  "pass the tokenizer the VAR was trained on (--tokenizer/-t)")
            raise ConfigError(f"model.{name} is {show(ours)} but the tokenizer has {show(theirs)}: "
                              f"--set model.{name}={show(theirs)}")


def class_labels(raw: Tensor, num_classes: int) -> Tensor:
    lab = raw.long().clone()
    if bool((lab >= num_classes).any()):
        raise DataError(f"label {int(lab.max())} is out of range for model.num_classes={num_classes}")
    lab[lab < 0] = num_classes  # unknown label → unconditional class
    return lab


class TokenArrayBatches:
    """Deterministic batches from a map-style token dataset (``.npy``).

    The sample stream is the concatenation of one permutation per epoch (order = f(seed, epoch)); a global
    micro-batch takes the next ``micro_global`` samples of that stream (rank r its r-th slice of
    ``local_batch``). The position is the number of samples consumed, so a resume continues exactly, also with
    another batch size or process count.
    """

    def __init__(self, dataset: Any, local_batch: int, rank: int, world: int, seed: int) -> None:
        self.ds, self.lb, self.rank, self.world, self.seed = dataset, local_batch, rank, world, seed
        self.n = len(dataset)
        if self.n < local_batch * world:
            raise DataError(f"{self.n} token rows are fewer than one batch ({local_batch * world}): "
                            "lower train.global_batch_size")
        self.samples_seen = 0
        self._perm: Dict[int, np.ndarray] = {}

    def _row(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perm[epoch][pos])

    def state_dict(self) -> Dict[str, int]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.samples_seen = int(state["samples_seen"])

    def next_batch(self) -> Tuple[Tensor, Tensor]:
        """The next micro-batch of this process → (tokens [b, P, L], labels [b])."""
        start = self.samples_seen + self.rank * self.lb
        rows = [self.ds[self._row(i)] for i in range(start, start + self.lb)]
        self.samples_seen += self.lb * self.world
        return torch.stack([r["tokens"] for r in rows]), torch.tensor([r["label"] for r in rows])


class StreamBatches:
    """Batches from an iterable source (token shards or images encoded on the fly), resumable at any sample.

    The position (epoch, samples consumed in the epoch by this process) is kept by
    :class:`~xqtool.checkpoints.training_state.SampleBatches`; `encode` turns a raw batch into (tokens, labels).
    """

    def __init__(self, make_epoch: Any, local_batch: int, world: int, key: str, encode: Any = None) -> None:
        self.stream = SampleBatches(make_epoch, local_batch, (key, "label"))
        self.key, self.encode, self.world = key, encode, world

    @property
    def samples_seen(self) -> int:
        return self.stream.offset * self.world

    def state_dict(self) -> Dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.stream.epoch, self.stream.offset, self.stream._it = int(state["epoch"]), int(state["offset"]), None

    def next_batch(self) -> Tuple[Tensor, Tensor]:
        b = next(self.stream)
        x = b[self.key]
        return (self.encode(x) if self.encode is not None else x), b["label"]


def build_data(cfg: VARConfig, tokenizer: Any, global_batch: int, local_batch: int, rank: int, world: int,
                device: torch.device, ignore_fingerprint: bool = False) -> Tuple[Any, int]:
    """→ (batch source with ``.next_batch()`` / ``state_dict()``, optimizer steps per epoch)."""
    d = cfg.data
    if d.tokens:
        from xqtool.data.tokens import check_manifest, token_dataset

        # token shards: every process reads the whole (small) token stream and keeps its slice of each
        # global micro-batch, so batches do not depend on the number of processes or of shards
        ds = token_dataset(d.tokens, train=True, seed=cfg.train.seed, split_nodes=False)
        check_manifest(ds.manifest, tokenizer, ignore_fingerprint=ignore_fingerprint, what=f"the tokens {d.tokens}")
        if isinstance(ds, torch.utils.data.IterableDataset):
            per_epoch = max(int(ds.manifest.count) // global_batch, 1)
            lo = rank * local_batch

            def make(epoch: int) -> Iterator:
                ds.set_epoch(epoch)
                # own generator: creating a loader iterator must not draw from the global RNG (exact resume)
                loader = torch.utils.data.DataLoader(ds, batch_size=local_batch * world, num_workers=d.num_workers,
                                                     drop_last=True, generator=torch.Generator().manual_seed(epoch))
                return ({"tokens": b["tokens"][lo:lo + local_batch], "label": torch.as_tensor(b["label"])[lo:lo + local_batch]}
                        for b in loader)
            return StreamBatches(make, local_batch, world, "tokens"), per_epoch
        src = TokenArrayBatches(ds, local_batch, rank, world, cfg.train.seed)
        return src, max(len(ds) // global_batch, 1)
    if d.images:
        from xqtool.data.images import make_loader
        from xqtool.data.transforms import var_train_transform

        size = d.image_size or int(tokenizer.image_size)
        loader = make_loader(d.images, image_size=size, batch_size=local_batch, train=True,
                             num_workers=d.num_workers, bad_files=d.bad_files, seed=cfg.train.seed, drop_last=False,
                             train_tf=var_train_transform(size, hflip=d.hflip))
        loader.generator = torch.Generator().manual_seed(cfg.train.seed)  # keep the global RNG untouched
        n = getattr(loader.dataset, "num_items", None)
        per_epoch = max(int(n) // global_batch, 1) if n else 1000

        def make_img(epoch: int) -> Iterator:
            loader._epoch = epoch  # the loader sets the stream's epoch (shuffle, augmentation RNG) from this
            return iter(loader)

        def encode(images: Tensor) -> Tensor:
            with torch.no_grad():
                return tokenizer.encode(images.to(device))
        return StreamBatches(make_img, local_batch, world, "image", encode), per_epoch
    raise ConfigError("no training data: pass --tokens (token file/shards from `xqtool encode`) or --images "
                      "(config keys data.tokens / data.images)")


__all__ = ["StreamBatches", "TokenArrayBatches", "build_data", "check_tokenizer_fit", "class_labels"]
