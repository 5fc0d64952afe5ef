"""Earth Engine initialisation: find credentials without a request, then ``ee.Initialize`` with a time limit.

Without credentials, :func:`initialize_earthengine` raises at once with what to do instead of letting
``ee.Initialize`` retry for seconds; with credentials that do not work, it gives up after
:data:`INITIALIZE_TIMEOUT_S`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from cmsn_cube.exceptions import EarthEngineError
from cmsn_cube.extras import require

#: Environment variables that name credentials. ``GOOGLE_APPLICATION_CREDENTIALS`` is Google's standard
#: (a service-account JSON key, or any ADC file); ``EE_SERVICE_ACCOUNT_KEY`` is ours: a service-account JSON key.
CREDENTIAL_ENV_VARS: tuple[str, ...] = ("EE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS")

#: Environment variables read for the Cloud project when ``project`` is not given.
PROJECT_ENV_VARS: tuple[str, ...] = ("EE_PROJECT", "GOOGLE_CLOUD_PROJECT")

#: Upper bound on ``ee.Initialize`` with credentials that exist but do not work: it retries ~24 s otherwise.
INITIALIZE_TIMEOUT_S = 20.0

_HOW_TO_AUTHENTICATE = (
    "authenticate once with `earthengine authenticate` (writes ~/.config/earthengine/credentials), "
    "or point EE_SERVICE_ACCOUNT_KEY / GOOGLE_APPLICATION_CREDENTIALS at a service-account JSON key; "
    "to work offline, use the embedded scene instead: `cmsn-cube synth stores/synthetic.zarr`"
)


def _credentials_source() -> tuple[str, str | None]:
    """Find where credentials are, without any request: ``(kind, path)``; raise when there are none."""
    for variable in CREDENTIAL_ENV_VARS:
        value = os.environ.get(variable)
        if not value:
            continue
        if not Path(value).expanduser().is_file():
            raise EarthEngineError(f"{variable}={value} names no file; point it at a service-account JSON key")
        return variable, str(Path(value).expanduser())
    oauth = require("ee.oauth", "ee", package="earthengine-api")

    persistent = Path(oauth.get_credentials_path())
    if persistent.is_file():
        return "earthengine", str(persistent)
    # gcloud's application default credentials (`gcloud auth application-default login`)
    gcloud_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    adc = Path(gcloud_dir) / "application_default_credentials.json"
    if adc.is_file():
        return "gcloud", str(adc)
    raise EarthEngineError(f"no Earth Engine credentials found: {_HOW_TO_AUTHENTICATE}")


def _service_account_credentials(key_file: str) -> Any:
    """Return ``ee.ServiceAccountCredentials`` of a service-account JSON key."""
    ee = require("ee", "ee", package="earthengine-api")

    try:
        email = json.loads(Path(key_file).read_text())["client_email"]
    except (OSError, ValueError, KeyError) as error:
        raise EarthEngineError(f"{key_file} is not a service-account JSON key (no client_email): {error}") from error
    return ee.ServiceAccountCredentials(email, key_file=key_file)


def initialize_earthengine(project: str | None = None, *, timeout_s: float = INITIALIZE_TIMEOUT_S) -> None:
    """Initialize Earth Engine, or fail fast with what to do.

    Credentials are looked for first, without any request (``EE_SERVICE_ACCOUNT_KEY``,
    ``GOOGLE_APPLICATION_CREDENTIALS``, ``~/.config/earthengine/credentials``, gcloud's application default
    credentials): without any, this raises at once instead of letting ``ee.Initialize`` try for seconds. Does
    nothing when Earth Engine is already initialized.

    Parameters
    ----------
    project : str, optional
        Google Cloud project registered for Earth Engine; default ``EE_PROJECT``/``GOOGLE_CLOUD_PROJECT`` or
        the credentials' quota project (a service account's own project).
    timeout_s : float
        Give up on ``ee.Initialize`` after this long (bad credentials or no network make it retry).

    Raises
    ------
    EarthEngineError
        No credentials, bad credentials, no project, or Earth Engine unreachable; the message says what to do.
    """
    ee = require("ee", "ee", package="earthengine-api")

    if ee.data.is_initialized():
        return
    kind, path = _credentials_source()
    project = project or next((os.environ[v] for v in PROJECT_ENV_VARS if os.environ.get(v)), None)
    credentials: Any = "persistent"
    if kind == "EE_SERVICE_ACCOUNT_KEY" and path:
        credentials = _service_account_credentials(path)

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            ee.Initialize(credentials, project=project)
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    # a daemon thread so that unreachable servers cannot hold the caller past timeout_s
    worker = threading.Thread(target=run, name="ee-initialize", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise EarthEngineError(
            f"Earth Engine did not answer within {timeout_s:g} s (credentials from {kind}: {path}); check the network"
            f" and that the credentials are valid, or {_HOW_TO_AUTHENTICATE.split('; ', 1)[1]}"
        )
    if "error" in outcome:
        error = outcome["error"]
        hint = "pass --project (a Cloud project registered for Earth Engine)" if "project" in str(error) else ""
        raise EarthEngineError(
            f"Earth Engine initialization failed with credentials from {kind} ({path}): "
            f"{type(error).__name__}: {error}. {hint or _HOW_TO_AUTHENTICATE}"
        ) from error
