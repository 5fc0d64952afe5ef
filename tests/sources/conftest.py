"""Earth Engine offline: the library's own test harness plus a fake server for the two calls xee makes.

``ee_offline`` initializes ``ee`` exactly as ``ee.apitestcase.ApiTestCase.InitializeApi`` does (bundled
``algorithms.json``, no network), so collections, filters and band selections are built and serialized by the
real client library. ``FakeEarthEngine`` then answers only ``ee.data.computeValue`` (xee's one metadata request)
and ``ee.data.computePixels`` (pixels), with data of the server's shape: the evaluated JSON of the expression,
and NPY bytes turned into a structured array by the library's own ``NUMPY_NDARRAY`` converter.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def ee_offline(monkeypatch: pytest.MonkeyPatch):
    """``ee`` initialized offline with the harness of earthengine-api (restored afterwards)."""
    ee = pytest.importorskip("ee")
    from ee import _state, apitestcase

    ee.Reset()
    monkeypatch.setattr(ee.data, "_install_cloud_api_resource", lambda: None)
    monkeypatch.setattr(ee.data, "getAlgorithms", apitestcase.GetAlgorithms)
    monkeypatch.setattr(ee.deprecation, "_FetchDataCatalogStac", lambda: {})
    ee.Initialize(None, "", project="my-project")
    yield ee
    _state.reset_state()
    ee.Reset()


def resolve(encoded: dict[str, Any]) -> Any:
    """Inline the ``valueReference`` s of a serialized expression into one nested tree."""
    values = encoded["values"]

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"valueReference"}:
                return walk(values[node["valueReference"]])
            if "functionDefinitionValue" in node:  # a mapped function's body is a bare reference
                definition = node["functionDefinitionValue"]
                return {"functionDefinitionValue": {**definition, "body": walk(values[definition["body"]])}}
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(values[encoded["result"]])


def invocations(tree: Any, name: str) -> list[dict[str, Any]]:
    """Arguments of every invocation of function ``name`` in a resolved tree."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            call = node.get("functionInvocationValue")
            if call and call.get("functionName") == name:
                found.append(call["arguments"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    return found


def constant(node: dict[str, Any]) -> Any:
    """A constant argument: ``constantValue`` or an ``arrayValue`` of constants."""
    if "constantValue" in node:
        return node["constantValue"]
    return [constant(value) for value in node["arrayValue"]["values"]]


@dataclass
class FakeEarthEngine:
    """Images (already one per acquisition day, as the server's mosaic makes them) on one pixel grid.

    ``bands[name]`` is ``(time, height, width)``; NaN marks masked pixels (outside the scene footprint).
    """

    crs: str
    crs_transform: tuple[float, ...]
    times_ms: list[int]
    bands: dict[str, np.ndarray]
    band_types: dict[str, dict[str, Any]]
    value_requests: list[Any] = field(default_factory=list)
    pixel_requests: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def compute_value(self, obj: Any) -> Any:
        from ee import serializer

        tree = resolve(serializer.encode(obj, for_cloud_api=True))
        with self._lock:
            self.value_requests.append(tree)
        items = tree["arrayValue"]["values"]
        names = [item["functionInvocationValue"]["functionName"] for item in items]
        # xee 0.1.2's EarthEngineStore.get_info: [size, toDictionary, first, reduceColumns(...).get('list')]
        if names != ["Collection.size", "Element.toDictionary", "Collection.first", "Dictionary.get"]:
            raise NotImplementedError(f"the fake server only answers xee's metadata request, not {names}")
        height, width = next(iter(self.bands.values())).shape[1:]
        first = {
            "type": "Image",
            "bands": [
                {
                    "id": name,
                    "data_type": self.band_types[name],
                    "dimensions": [width, height],
                    "crs": "EPSG:4326",  # a mosaic's default projection
                    "crs_transform": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                }
                for name in self.bands
            ],
            "properties": {"system:time_start": self.times_ms[0], "system:index": "0"},
        }
        ids = [f"day{i}" for i in range(len(self.times_ms))]
        return [len(self.times_ms), {}, first, [ids, list(self.times_ms)]]

    def compute_pixels(self, params: dict[str, Any]) -> np.ndarray:
        from ee import image_converter, serializer

        tree = resolve(serializer.encode(params["expression"], for_cloud_api=True))
        grid = params["grid"]
        with self._lock:
            self.pixel_requests.append({"tree": tree, **{k: v for k, v in params.items() if k != "expression"}})
        if grid["crsCode"] != self.crs:
            raise ValueError(f"requested CRS {grid['crsCode']}, the data are in {self.crs}")
        # xee's slice of the collection: toList(count, offset) with constants (the first one, outermost)
        to_list = next(a for a in invocations(tree, "Collection.toList") if "constantValue" in a.get("offset", {}))
        offset, count = constant(to_list["offset"]), constant(to_list["count"])
        (band,) = constant(invocations(tree, "Image.addBands")[0]["names"])
        unmask = invocations(tree, "Image.unmask")[0]
        mask_value = constant(invocations(unmask["value"], "Image.constant")[0]["value"])
        affine = grid["affineTransform"]
        col = round((affine["translateX"] - self.crs_transform[2]) / self.crs_transform[0])
        row = round((affine["translateY"] - self.crs_transform[5]) / self.crs_transform[4])
        width, height = grid["dimensions"]["width"], grid["dimensions"]["height"]
        block = self.bands[band][offset : offset + count, row : row + height, col : col + width]
        dtype = np.dtype(_NUMPY_TYPES[self.band_types[band]["precision"]])
        # one field per image of the slice; EE renames repeated band names with a suffix
        fields = np.dtype([(band if i == 0 else f"{band}_{i}", dtype) for i in range(block.shape[0])])
        out = np.zeros((height, width), dtype=fields)
        for i in range(block.shape[0]):
            out[fields.names[i]] = np.where(np.isnan(block[i]), mask_value, block[i]).astype(dtype)
        buffer = io.BytesIO()
        np.save(buffer, out)
        # the client library turns the server's NPY bytes into the structured array
        return image_converter.from_file_format(params["fileFormat"]).do_conversion(buffer.getvalue())

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeEarthEngine:
        import ee

        monkeypatch.setattr(ee.data, "computeValue", self.compute_value)
        monkeypatch.setattr(ee.data, "computePixels", self.compute_pixels)
        return self


@pytest.fixture
def ee_fake():
    """The fake server class and the expression helpers, for tests (conftest is not importable by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(Server=FakeEarthEngine, resolve=resolve, invocations=invocations, constant=constant)


#: Pixel types after xee's ``unmask(2147483647)``: float stays float32, uint16 QA widens to int32.
_NUMPY_TYPES = {"float": "<f4", "int": "<i4", "double": "<f8"}
