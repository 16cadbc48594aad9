"""Versions of the packages that decide a run's results (manifests, benchmark results).

Kept apart from :mod:`rsflow.pipeline` so that a process with only the model stack (the benchmark's
GPU section on a machine without Ray or GDAL) can record them too.
"""

from __future__ import annotations

import importlib.metadata
import platform

_VERSIONED = (
    "rsflow", "ray", "torch", "transformers", "peft", "tokenizers", "rasterio", "pystac", "pystac-client",
    "geopandas", "pyarrow", "shapely", "pyproj", "numpy", "vllm", "flash-attn",
)


def package_versions() -> dict[str, str]:
    """``{"python": ..., "gdal": ..., package: version or "not installed"}``."""
    try:
        import rasterio

        gdal = str(rasterio.__gdal_version__)
    except ImportError:
        gdal = "not installed"
    versions = {"python": platform.python_version(), "gdal": gdal}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
