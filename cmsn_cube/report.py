"""Plain-text and Markdown summaries of stores, evaluations and runs (what `cmsn-cube info` prints)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import xarray as xr

from cmsn_cube.cube import crs_of
from cmsn_cube.store import naming_damaged_chunks, open_cube, open_store


def describe_cube(cube: xr.Dataset, *, name: str = "cube") -> str:
    """Dates, sensors, bands, cloud fraction per date, CRS, grid and size of a cube, as text.

    Computes the cloud fraction (reads ``cloud_mask``/``qa_pixel`` and the reflectance's no-data pattern).
    """
    from cmsn_cube.qa import cloud_fraction

    has_mask = "cloud_mask" in cube or "qa_pixel" in cube
    fractions = cloud_fraction(cube).values if has_mask else np.full(cube.sizes["time"], np.nan)
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    dx = abs(float(cube.x[1] - cube.x[0])) if nx > 1 else float("nan")
    dy = abs(float(cube.y[1] - cube.y[0])) if ny > 1 else float("nan")
    size_mb = sum(v.nbytes for v in cube.data_vars.values()) / 1e6
    lines = [
        f"{name}",
        f"  CRS        {crs_of(cube)}",
        f"  grid       {ny} x {nx} px at {dy:g} m x {dx:g} m ({ny * dy / 1000:.1f} km x {nx * dx / 1000:.1f} km)",
        f"  bands      {', '.join(str(b) for b in cube.band.values)}",
        f"  variables  {', '.join(sorted(str(v) for v in cube.data_vars))}",
        f"  size       {size_mb:.1f} MB uncompressed",
        f"  dates      {cube.sizes['time']}",
        "    date         sensor      cloud %",
    ]
    sensors = cube["sensor"].values if "sensor" in cube.coords else ["?"] * cube.sizes["time"]
    for t, fraction, sensor in zip(cube.time.values, fractions, sensors, strict=True):
        cloud = f"{100 * fraction:6.1f}" if np.isfinite(fraction) else "   n/a"
        lines.append(f"    {np.datetime_as_string(t, unit='D')}   {sensor:<10}  {cloud}")
    return "\n".join(lines)


def describe_reconstruction(result: xr.Dataset, *, name: str = "reconstruction") -> str:
    """Describe a reconstruction as text: model, input, grid and, per date, the share of pixels filled and unobserved.

    Computes the ``filled`` layer, and the ``uncertainty`` layer's RMS per date (the typical predicted error of a
    filled pixel, in reflectance; "-" in reconstructions written before it, or on dates with nothing filled).
    """
    from cmsn_cube.inference import FILLED, INVENTED, NO_DATA_FILLED, SERIES_FILLED, UNOBSERVED

    flags = result["filled"]
    counts = {
        flag: (flags == flag).mean(("y", "x")).values
        for flag in (FILLED, UNOBSERVED, INVENTED, NO_DATA_FILLED, SERIES_FILLED)
    }  # one pass each over a small uint8 layer
    spread = np.full(result.sizes["time"], np.nan)
    if "uncertainty" in result:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a date with nothing filled: all NaN, said as "-"
            spread = np.sqrt((result["uncertainty"] ** 2).mean(("band", "y", "x")).values)
    ny, nx = result.sizes["y"], result.sizes["x"]
    lines = [
        f"{name} (reconstruction)",
        f"  model      {result.attrs.get('model', '?')} (sha256 {str(result.attrs.get('model_sha256', '?'))[:12]}…)",
        f"  input      {result.attrs.get('input_store', 'in-memory cube')}",
        f"  CRS        {crs_of(result)}",
        f"  grid       {ny} x {nx} px",
        f"  variables  {', '.join(sorted(str(v) for v in result.data_vars))}",
        f"  dates      {result.sizes['time']}",
        "    date         filled %   no data filled %   from the series %   unobserved (NaN) %   unobserved filled %"
        "   uncertainty RMS (refl.)",
    ]
    for index, t in enumerate(result.time.values):
        rms = f"{spread[index]:.4f}" if np.isfinite(spread[index]) else "-"
        lines.append(
            f"    {np.datetime_as_string(t, unit='D')}   {100 * counts[FILLED][index]:7.2f}   "
            f"{100 * counts[NO_DATA_FILLED][index]:16.2f}   {100 * counts[SERIES_FILLED][index]:17.2f}   "
            f"{100 * counts[UNOBSERVED][index]:18.2f}   {100 * counts[INVENTED][index]:19.2f}   {rms:>23}"
        )
    return "\n".join(lines)


def describe_store(path: str | os.PathLike[str]) -> str:
    """:func:`describe_cube` or :func:`describe_reconstruction` of the store at ``path``.

    A chunk that cannot be decoded is a :class:`~cmsn_cube.exceptions.StoreError` naming its file.
    """
    ds = open_store(path)
    with naming_damaged_chunks(path):
        if "reconstructed" in ds:
            return describe_reconstruction(ds, name=str(path))
        return describe_cube(open_cube(path), name=str(path))
