"""Errors raised by cmsn-cube.

Every error derives from :class:`CMSNCubeError` and from the built-in it refines, so ``except ValueError``
keeps working for callers that do not know this package. Messages say what is wrong and how to fix it.
"""

from __future__ import annotations


class CMSNCubeError(Exception):
    """Base class of every error raised by cmsn-cube."""


class CubeValidationError(CMSNCubeError, ValueError):
    """A cube does not follow the schema (see :func:`cmsn_cube.cube.validate_cube`)."""


class DimensionError(CubeValidationError):
    """A variable is missing a dimension or has them in the wrong order."""


class BandMismatchError(CubeValidationError):
    """Band names differ from the expected ``blue, green, red, nir`` (or a checkpoint's bands)."""


class DTypeError(CubeValidationError, TypeError):
    """A variable has the wrong dtype (e.g. integer digital numbers instead of float reflectance)."""


class ReflectanceRangeError(CubeValidationError):
    """Reflectance values lie far outside [0, 1] (usually unscaled digital numbers)."""


class MissingCRSError(CubeValidationError):
    """The cube carries no coordinate reference system."""


class TimeAxisError(CubeValidationError):
    """Times are not strictly increasing (unsorted or duplicated)."""


class GridError(CubeValidationError):
    """``x``/``y`` are not a regular grid, or two inputs are on different grids."""


class NoDataError(CMSNCubeError, ValueError):
    """Nothing usable: all pixels are no-data or all are cloud."""


class StoreError(CMSNCubeError, OSError):
    """A Zarr store is missing, incomplete (interrupted write) or corrupt."""


class MissingDateError(CMSNCubeError, FileNotFoundError):
    """An expected date (e.g. ``Region_T2_Patch1.tif``) is missing."""


class CheckpointError(CMSNCubeError, ValueError):
    """A checkpoint is not a cmsn-cube checkpoint, is corrupt, or does not fit the model/bands."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path names no file."""


class ModelOutputError(CMSNCubeError, FloatingPointError):
    """A model gave NaN or infinite values: nothing it filled is written."""


class UnknownModelError(CMSNCubeError, LookupError):
    """No packaged model is registered under that name."""


class RegionError(CMSNCubeError, ValueError):
    """A region (bbox, WRS path/row, config entry) is malformed or unknown."""


class EarthEngineError(CMSNCubeError, RuntimeError):
    """Earth Engine is unreachable or not authenticated."""


class ArgumentError(CMSNCubeError, ValueError):
    """An argument is out of its range (a negative size, a zero batch, an overlap as wide as a tile...)."""


class SchedulerError(CMSNCubeError, ConnectionError):
    """A Dask scheduler address cannot be reached, or what answers there is not a Dask scheduler."""


class OutputExistsError(StoreError, FileExistsError):
    """An output path holds something that a command would replace, and ``overwrite`` was not asked for."""


class OutputLockedError(StoreError):
    """Another run is writing the same output (see :func:`cmsn_cube.outputs.exclusive_writer`)."""


class CMSNCubeWarning(UserWarning):
    """Something the user should know about a result (e.g. pixels that no date observed)."""


def check_positive(**values: float | None) -> None:
    """Raise :class:`ArgumentError` naming each argument that is given and not > 0 (``None`` = not given)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ArgumentError(f"{name} must be > 0, got {value}")


def check_non_negative(**values: float | None) -> None:
    """Raise :class:`ArgumentError` naming each argument that is given and < 0."""
    for name, value in values.items():
        if value is not None and not value >= 0:
            raise ArgumentError(f"{name} must be >= 0, got {value}")
