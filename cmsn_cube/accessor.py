"""The ``ds.cmsn`` accessor: thin, stateless calls into the public functions.

Like xarray's own accessors it holds only ``_obj`` (state cached on an accessor would be pickled into every Dask
task; xarray caches the accessor itself on the dataset) and validates when a method is called, not in
``__init__`` (xarray turns errors there into opaque ones). Each method is one call into the function its
docstring names, which holds every default.
"""

from __future__ import annotations

from typing import Any

import xarray as xr


@xr.register_dataset_accessor("cmsn")
class CMSNAccessor:
    """Cloud removal and QA helpers on a cube: ``ds.cmsn.cloud_mask()``, ``ds.cmsn.reconstruct()``, …."""

    __slots__ = ("_obj",)

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def validate(self, **options: Any) -> xr.Dataset:
        """Validate the cube against the schema; see :func:`cmsn_cube.cube.validate_cube`."""
        from cmsn_cube.cube import validate_cube

        return validate_cube(self._obj, **options)

    def cloud_mask(self, **options: Any) -> xr.DataArray:
        """Return the cloud mask, the cube's own or decoded from ``qa_pixel``; see :func:`cmsn_cube.qa.ensure_cloud_mask`."""
        from cmsn_cube.qa import ensure_cloud_mask

        return ensure_cloud_mask(self._obj, **options)["cloud_mask"]

    def reconstruct(self, **options: Any) -> xr.Dataset:
        """Remove the clouds of every date, lazily; see :func:`cmsn_cube.inference.reconstruct` (``adapt=True`` first fine-tunes the model on this cube)."""
        from cmsn_cube.inference import reconstruct

        return reconstruct(self._obj, **options)

    def quality(self) -> Any:
        """Return the scene self-check of a reconstruction as a tidy table; see :func:`cmsn_cube.selfcheck.quality_table`."""
        from cmsn_cube.selfcheck import quality_table

        return quality_table(self._obj)

    def fit(self, **options: Any) -> Any:
        """Adapt a checkpoint to this cube from its own clear pixels; see :func:`cmsn_cube.adapt.fit`."""
        from cmsn_cube.adapt import fit

        return fit(self._obj, **options)

    def ndvi(self) -> xr.DataArray:
        """Return the NDVI of the observed reflectance, NaN under clouds; see :func:`cmsn_cube.qa.observed_ndvi`."""
        from cmsn_cube.qa import observed_ndvi

        return observed_ndvi(self._obj)

    def plot(self, *args: Any, **options: Any) -> Any:
        """Draw the cloudy dates, the reconstruction stages, truth and error; see :func:`cmsn_cube.plot.plot_reconstruction`.

        ``date`` (an index or a date; default the cloudiest) is drawn with its two neighbours in time, so a cube
        of any number of dates can be drawn. A Figure (shown inline in a notebook), or a PNG panel written to the
        path given. On a reconstruction (the output of ``reconstruct()``), a filled date beside its uncertainty
        (:func:`cmsn_cube.plot.plot_uncertainty`).
        """
        from cmsn_cube.plot import plot_reconstruction, plot_uncertainty

        if "reconstructed" in self._obj and "uncertainty" in self._obj:
            return plot_uncertainty(self._obj, *args, **options)
        return plot_reconstruction(self._obj, *args, **options)

    def cloud_fraction(self) -> xr.DataArray:
        """Return the fraction of valid pixels that are cloud, per date; see :func:`cmsn_cube.qa.cloud_fraction`."""
        from cmsn_cube.qa import cloud_fraction

        return cloud_fraction(self._obj)
