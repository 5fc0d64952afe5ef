"""The ``ds.cmsn`` accessor: thin, stateless calls into the public functions.

Like xarray's own accessors it holds only ``_obj`` (state cached on an accessor would be pickled into every Dask
task) and validates when a method is called, not in ``__init__`` (xarray turns errors there into opaque ones).
"""

from __future__ import annotations

import os
from typing import Any

import xarray as xr


@xr.register_dataset_accessor("cmsn")
class CMSNAccessor:
    """Cloud removal and QA helpers on a cube: ``ds.cmsn.cloud_mask()``, ``ds.cmsn.cloud_fraction()``."""

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def validate(self, **options: Any) -> xr.Dataset:
        """See :func:`cmsn_cube.cube.validate_cube`."""
        from cmsn_cube.cube import validate_cube

        return validate_cube(self._obj, **options)

    def cloud_mask(self, **options: Any) -> xr.DataArray:
        """The cloud mask: the cube's own, or decoded from ``qa_pixel`` (see :func:`cmsn_cube.qa.add_cloud_mask`)."""
        from cmsn_cube.qa import add_cloud_mask

        if "cloud_mask" in self._obj and not options:
            return self._obj["cloud_mask"]
        return add_cloud_mask(self._obj.drop_vars("cloud_mask", errors="ignore"), **options)["cloud_mask"]

    def reconstruct(
        self, model: Any = None, *, adapt: bool = False, fit_options: dict[str, Any] | None = None, **options: Any
    ) -> xr.Dataset:
        """Lazy cloud removal of every date; ``options`` (``tile``, ``overlap``, ``batch_size``, ``device``,
        ``chunk``, ``fill_unobserved``) as :func:`cmsn_cube.inference.reconstruct`, with its defaults.

        With ``adapt=True`` the model is first fine-tuned on this cube (:func:`cmsn_cube.adapt.fit` with
        ``fit_options``; that part computes), then the adapted model reconstructs it.
        """
        from cmsn_cube.inference import reconstruct

        if adapt:
            model = self.fit(**{"model": model, "device": options.get("device"), **(fit_options or {})}).model
        return reconstruct(self._obj, model=model, **options)

    def quality(self) -> Any:
        """The scene self-check of a reconstruction as a tidy table; see :func:`cmsn_cube.selfcheck.quality_table`."""
        from cmsn_cube.selfcheck import quality_table

        return quality_table(self._obj)

    def fit(self, **options: Any) -> Any:
        """Adapt a checkpoint to this cube from its own clear pixels; see :func:`cmsn_cube.adapt.fit`."""
        from cmsn_cube.adapt import fit

        return fit(self._obj, **options)

    def ndvi(self) -> xr.DataArray:
        """NDVI of the observed reflectance, NaN under clouds (see :func:`cmsn_cube.metrics.ndvi`)."""
        from cmsn_cube.metrics import ndvi

        reflectance = self._obj["reflectance"]
        if "cloud_mask" in self._obj or "qa_pixel" in self._obj:
            reflectance = reflectance.where(~self.cloud_mask())
        return ndvi(reflectance).rename("ndvi")

    def plot(
        self, path: str | os.PathLike[str] | None = None, *, date: int = 0, model: Any = None, device: str | None = None
    ) -> Any:
        """The cloudy dates, coarse and refined reconstruction, truth and error: a Figure (shown inline in a
        notebook), or a PNG panel written to ``path``.

        The cube must have three dates; select a window first for a readable picture. See
        :func:`cmsn_cube.plot.plot_reconstruction`.
        """
        from cmsn_cube.plot import plot_reconstruction

        return plot_reconstruction(self._obj, path, date=date, model=model, device=device)

    def cloud_fraction(self) -> xr.DataArray:
        """See :func:`cmsn_cube.qa.cloud_fraction`."""
        from cmsn_cube.qa import cloud_fraction

        return cloud_fraction(self._obj)
