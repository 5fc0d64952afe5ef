"""The one path from window datasets to the batches training sees (``train_on_stores``, ``adapt.fit``, pipelines).

1. :func:`holdout_datasets` splits a cube into a training and a validation block of rows
   (:func:`cmsn_cube.samples.split_rows`) and builds a :class:`cmsn_cube.samples.TripletWindowDataset` on each;
2. :func:`epoch_loader` pools training datasets into an :class:`EpochLoader`: new pasted clouds, a new shuffle
   and new augmentation (:func:`square_symmetry`, :func:`radiometric_augmentation`) every epoch, each seeded by
   ``(seed, epoch)`` so a resumed run sees the batches of a straight one; :class:`Rounds` cuts it into rounds
   of a fixed number of batches when validation should come at a fixed step cadence rather than per epoch;
3. :func:`validation_loader` gives the held-out windows in a fixed order (at most ``max_windows``, spread
   evenly).

Batches follow the sample-stream contract (:data:`REQUIRED_KEYS`): ``inputs`` ``(B, 3, 5, H, W)``, ``truth``
``(B, 3, 4, H, W)``, ``truth_valid`` ``(B, 3, H, W)`` bool and ``sim_mask`` ``(B, 3, H, W)`` bool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    import xarray as xr
    from torch.utils.data import DataLoader

    from cmsn_cube.samples import TripletWindowDataset

__all__ = [
    "REQUIRED_KEYS",
    "EpochLoader",
    "Holdout",
    "Rounds",
    "batch_to_device",
    "epoch_loader",
    "holdout_datasets",
    "make_dataloaders",
    "radiometric_augmentation",
    "square_symmetry",
    "validation_loader",
]

#: Keys every training or validation batch must have.
REQUIRED_KEYS = ("inputs", "truth", "truth_valid", "sim_mask")
#: Per-date, per-band gain range of :func:`radiometric_augmentation` (TOA vs surface reflectance, sensors).
GAIN_RANGE = (0.8, 1.25)
#: Per-date, per-band offset range (reflectance).
OFFSET_RANGE = (-0.03, 0.03)
#: Haze: a veil ``h * (1 - x)`` strongest in blue, weakest in NIR, on a third of the dates, h up to 0.08.
HAZE_MAX, HAZE_SHARE, HAZE_BY_BAND = 0.08, 1 / 3, (1.0, 0.75, 0.5, 0.2)


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Move the tensors of a batch to ``device``, after checking it has every key of :data:`REQUIRED_KEYS`.

    Raises
    ------
    KeyError
        The batch lacks a key of the sample-stream contract.
    """
    missing = [key for key in REQUIRED_KEYS if key not in batch]
    if missing:
        raise KeyError(f"training batches need keys {list(REQUIRED_KEYS)}; this batch lacks {missing}")
    return {key: value.to(device, non_blocking=True) for key, value in batch.items() if isinstance(value, torch.Tensor)}


# ------------------------------------------------------------------------------------------------ augmentation


def square_symmetry(tensor: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """Turn the last two axes by ``turns`` quarter turns, then mirror the last axis if ``flip``.

    The 4 x 2 choices are the 8 symmetries of the square; applying the same one to every tensor of a batch
    keeps inputs, truth and masks aligned.

    Examples
    --------
    >>> square_symmetry(torch.tensor([[1, 2], [3, 4]]), 1, flip=True).tolist()
    [[4, 2], [3, 1]]
    """
    turned = torch.rot90(tensor, turns, dims=(-2, -1)) if turns else tensor
    return torch.flip(turned, dims=(-1,)) if flip else turned


def radiometric_augmentation(batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Change each date's radiometry as another product, sensor or a hazy day would, in inputs and truth alike.

    Per sample, date and band: ``x * gain + offset`` (gain log-uniform in :data:`GAIN_RANGE`, offset in
    :data:`OFFSET_RANGE`), and on a third of the dates a haze veil; clipped to [0, 1]. Masked input pixels stay 0.
    """
    inputs, truth = batch["inputs"], batch["truth"]
    batch_size, dates, channels = inputs.shape[:3]
    bands = channels - 1
    shape = (batch_size, dates, bands, 1, 1)
    low, high = np.log(GAIN_RANGE[0]), np.log(GAIN_RANGE[1])
    gain = torch.exp(low + (high - low) * torch.rand(shape, generator=generator))
    offset = OFFSET_RANGE[0] + (OFFSET_RANGE[1] - OFFSET_RANGE[0]) * torch.rand(shape, generator=generator)
    hazy = torch.rand((batch_size, dates, 1, 1, 1), generator=generator) < HAZE_SHARE
    haze = hazy * HAZE_MAX * torch.rand((batch_size, dates, 1, 1, 1), generator=generator)
    veil = haze * torch.tensor(HAZE_BY_BAND[:bands] + (0.2,) * (bands - len(HAZE_BY_BAND))).view(1, 1, -1, 1, 1)

    def change(values: torch.Tensor) -> torch.Tensor:
        return ((values * gain + offset) * (1 - veil) + veil).clamp(0, 1)

    clear = 1 - inputs[:, :, bands:]
    out = dict(batch)
    out["inputs"] = torch.cat([change(inputs[:, :, :bands]) * clear, inputs[:, :, bands:]], dim=2)
    out["truth"] = change(truth) * batch["truth_valid"].unsqueeze(2).to(truth.dtype)
    return out


# ------------------------------------------------------------------------------------------------ training loaders


class EpochLoader:
    """A DataLoader wrapper that draws fresh clouds every epoch and augments batches with flips/quarter turns.

    The datasets seed their clouds by ``(seed, epoch, index)``; :func:`cmsn_cube.train.train` calls
    ``set_epoch`` before each epoch, so every epoch gets new cloud shapes over the same windows. The shuffle
    (the DataLoader's generator, which also seeds its workers) and the augmentation are reseeded from
    ``(seed, epoch)`` too, so an epoch gives the same batches whatever came before it: a resumed run sees the
    data of a straight one. Iterating without ``set_epoch`` goes on to the next epoch. The same symmetry
    (:func:`square_symmetry`) is applied to all dates and all tensors of a batch (geometry must stay aligned).

    Parameters
    ----------
    loader : torch.utils.data.DataLoader
        Over the pooled datasets; its ``generator`` (if any) is reseeded every epoch.
    datasets : iterable of TripletWindowDataset
        The datasets the loader reads, told each epoch's number (``set_epoch``).
    augment : bool
        Random flips and quarter turns.
    seed : int
        Seeds every epoch's shuffle and augmentation.
    radiometric : bool
        Also :func:`radiometric_augmentation`.
    """

    def __init__(
        self, loader: Any, datasets: Iterable[Any], *, augment: bool, seed: int, radiometric: bool = False
    ) -> None:
        self.loader, self.datasets, self.augment, self.seed = loader, list(datasets), augment, seed
        self.radiometric = radiometric
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration give epoch ``epoch`` (counted from 0)."""
        self.epoch = int(epoch)

    def _epoch_seeds(self, epoch: int) -> tuple[int, int]:
        shuffle, augmentation = np.random.SeedSequence([self.seed % 2**64, epoch]).generate_state(2, np.uint64)
        return int(shuffle), int(augmentation)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        for dataset in self.datasets:
            dataset.set_epoch(epoch)
        shuffle_seed, augmentation_seed = self._epoch_seeds(epoch)
        if isinstance(getattr(self.loader, "generator", None), torch.Generator):
            self.loader.generator.manual_seed(shuffle_seed)
        generator = torch.Generator().manual_seed(augmentation_seed)
        for batch in self.loader:
            yield self._augment(batch, generator) if self.augment or self.radiometric else batch

    def _augment(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        turns, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=generator))
        out = dict(batch)
        for key, value in batch.items() if self.augment else ():
            out[key] = square_symmetry(value, turns, flip=bool(flip % 2))
        if self.radiometric:
            out = radiometric_augmentation(out, generator)
        return {key: value.contiguous() for key, value in out.items()}


def epoch_loader(
    datasets: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    augment: bool = True,
    radiometric: bool = False,
    balance: bool = False,
    num_workers: int = 0,
) -> EpochLoader:
    """Pool window datasets into training batches with new clouds and augmentation every epoch.

    Parameters
    ----------
    datasets : sequence of TripletWindowDataset
        Pooled into one epoch.
    batch_size, num_workers : int
        As :class:`torch.utils.data.DataLoader`. The last, smaller batch of an epoch is dropped unless it is
        the only one.
    seed : int
        Seeds the shuffle, the clouds and the augmentation of every epoch.
    augment : bool
        Random flips and quarter turns (the same for every tensor of a batch).
    radiometric : bool
        Also :func:`radiometric_augmentation`.
    balance : bool
        Every dataset gives the same share of an epoch's windows (drawn with replacement), however many
        windows it has; an epoch keeps the pooled length.

    Returns
    -------
    EpochLoader
    """
    from torch.utils.data import ConcatDataset, DataLoader, WeightedRandomSampler

    pooled: ConcatDataset[Any] = ConcatDataset(datasets)
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(pooled) > batch_size  # no tiny last batch, unless that is all there is
    sampler = None
    if balance:
        shares = [1.0 / len(d) for d in datasets for _ in range(len(d))]
        # the sampler shares the loader's generator, so reseeding it per epoch reseeds the draw
        sampler = WeightedRandomSampler(shares, num_samples=len(pooled), generator=generator)
    loader = DataLoader(
        pooled, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=num_workers,
        generator=generator, drop_last=drop_last,
    )  # fmt: skip
    return EpochLoader(loader, datasets, augment=augment, radiometric=radiometric, seed=seed)


class Rounds:
    """Rounds of ``batches`` batches from an :class:`EpochLoader`, going on across its epochs.

    :func:`cmsn_cube.train.train` takes a round for an epoch and validates after each, so the validation
    cadence is a number of steps whatever the number of windows; every pass over the windows is a new epoch
    of the loader (new pasted clouds, shuffle and augmentation).

    Parameters
    ----------
    loader : EpochLoader
        The batches.
    batches : int
        Batches per round.
    """

    def __init__(self, loader: EpochLoader, *, batches: int) -> None:
        self.loader, self.batches = loader, batches
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.batches

    def _next(self) -> dict[str, torch.Tensor]:
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)  # the loader's next epoch
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.batches):
            yield self._next()


# ------------------------------------------------------------------------------------------- validation, split


def validation_loader(
    datasets: Sequence[Any], *, batch_size: int, num_workers: int = 0, max_windows: int | None = None
) -> DataLoader[Any]:
    """Batches of the held-out windows of ``datasets`` (pooled), always in the same order.

    Parameters
    ----------
    datasets : sequence of TripletWindowDataset
        The validation windows.
    batch_size, num_workers : int
        As :class:`torch.utils.data.DataLoader`.
    max_windows : int, optional
        Keep at most this many windows, evenly spread over the pooled ones (bounds the cost of a validation).

    Returns
    -------
    torch.utils.data.DataLoader
    """
    from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

    pooled: Dataset[Any] = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    if max_windows is not None:
        count = len(pooled)  # type: ignore[arg-type]
        kept = np.unique(np.linspace(0, count - 1, min(count, max_windows)).round().astype(int))
        pooled = Subset(pooled, kept.tolist())
    return DataLoader(pooled, batch_size=batch_size, shuffle=False, num_workers=num_workers)


class Holdout(NamedTuple):
    """The two blocks of :func:`holdout_datasets`: datasets and their ``(first, stop)`` row positions."""

    train: TripletWindowDataset
    validation: TripletWindowDataset
    train_rows: tuple[int, int]
    validation_rows: tuple[int, int]


def holdout_datasets(
    store: str | os.PathLike[str] | xr.Dataset,
    *,
    size: int,
    overlap: int,
    val_fraction: float,
    gap: int | None = None,
    seed: int = 0,
    crop: bool = False,
    **options: Any,
) -> Holdout:
    """Window datasets of a training block (the first rows) and a validation block (the last rows) of a cube.

    Parameters
    ----------
    store : str, path-like or xarray.Dataset
        Zarr store path (DataLoader workers re-open it) or a cube.
    size, overlap : int
        Window side and overlap in pixels.
    val_fraction : float
        Share of the rows kept for validation (at least one window).
    gap : int, optional
        Rows left out between the blocks (default ``overlap``: the context a tiled model sees across a
        tile border); see :func:`cmsn_cube.samples.split_rows`.
    seed : int
        Seeds the training clouds; validation uses ``seed + 1``.
    crop : bool
        Build each dataset on a crop of the cube (needs a cube), so the training sampler cannot even borrow
        the validation block's cloud masks as paste shapes; otherwise both read the whole store, each keeping
        the windows of its rows.
    **options
        Passed to :class:`cmsn_cube.samples.TripletWindowDataset` (``levels``, ``truth``, ``sources``...).

    Returns
    -------
    Holdout

    Raises
    ------
    DimensionError
        The cube is too small for two blocks of at least one window each.
    """
    import xarray as xr

    from cmsn_cube.samples import TripletWindowDataset, split_rows
    from cmsn_cube.store import open_cube

    cube = store if isinstance(store, xr.Dataset) else open_cube(store)
    rows = split_rows(cube.sizes["y"], size=size, val_fraction=val_fraction, gap=overlap if gap is None else gap)
    options = {"size": size, "overlap": overlap, **options}
    datasets = [
        TripletWindowDataset(cube.isel(y=slice(*block)), seed=seed + offset, **options)
        if crop
        else TripletWindowDataset(store, rows=block, seed=seed + offset, **options)
        for offset, block in enumerate(rows)
    ]
    return Holdout(datasets[0], datasets[1], *rows)


def make_dataloaders(
    store: str | os.PathLike[str] | xr.Dataset,
    *,
    size: int = 256,
    overlap: int = 32,
    val_fraction: float = 0.2,
    gap: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    seed: int = 0,
    **options: Any,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Plain training and validation DataLoaders over the blocks of :func:`holdout_datasets`.

    For looking at the windows; training wants :func:`epoch_loader` (new clouds and augmentation each epoch).

    Parameters
    ----------
    store : str, path-like or xarray.Dataset
        Zarr store path (workers re-open it) or a cube.
    size, overlap : int
        Window side and overlap in pixels.
    val_fraction : float
        Share of the rows kept for validation.
    gap : int, optional
        Rows left out between the regions (default ``overlap``).
    batch_size, num_workers : int
        As :class:`torch.utils.data.DataLoader`.
    seed : int
        Seeds the clouds (validation uses ``seed + 1``) and the training shuffle.
    **options
        Passed to :class:`cmsn_cube.samples.TripletWindowDataset` (``levels``, ``truth``, ``sources``, ``triplets``...).

    Returns
    -------
    tuple of DataLoader
        ``(train, validation)``; their ``.dataset`` report ``windows`` and ``skipped``.
    """
    from torch.utils.data import DataLoader

    split = holdout_datasets(
        store, size=size, overlap=overlap, val_fraction=val_fraction, gap=gap, seed=seed, **options
    )
    # workers are not persistent, so TripletWindowDataset.set_epoch reaches them at the next epoch
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(split.train, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=generator)
    return train, validation_loader([split.validation], batch_size=batch_size, num_workers=num_workers)
