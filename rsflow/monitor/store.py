"""Small files under a monitor's output root, written so that a reader never sees half of one.

The output root is a local directory or any fsspec URL (``s3://bucket/prefix``). Every write here is
atomic for readers:

- local: the bytes go to a hidden temporary file in the same directory (``.NAME.tmp-<uuid>``), are
  flushed to disk, then ``os.replace`` puts the file in place in one rename;
- object storage: one ``pipe_file`` (a single PUT; the object appears whole or not at all). Stores
  have no rename, so a temporary object would only add a copy.

Temporary names start with ``.``, which pyarrow, geopandas and DuckDB skip when they read a dataset
directory, and which :func:`remove_temporaries` deletes after a killed run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
"""Part of the name of every temporary file written here."""


def filesystem(url: str) -> tuple[Any, str]:
    """``url`` -> (fsspec filesystem, path on it)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def is_local(fs: Any) -> bool:
    """True for the local filesystem (where ``os.replace`` is available)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def join(url: str, *parts: str) -> str:
    """``url`` with path parts appended (``/`` separated, for local paths and URLs alike)."""
    return posixpath.join(url.rstrip("/"), *parts)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old file or the new one, never a part."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)


def write_json_atomic(url: str, value: Any) -> None:
    """:func:`write_bytes_atomic` of ``value`` as indented JSON with sorted keys."""
    text = json.dumps(value, indent=1, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(url, text.encode())


def write_parquet_atomic(table: Any, url: str) -> None:
    """One GeoParquet 1.1 file of result rows (:func:`rsflow.output.write_geoparquet`), atomically."""
    from rsflow.output import write_geoparquet

    buffer = io.BytesIO()
    write_geoparquet(table, buffer)
    write_bytes_atomic(url, buffer.getvalue())


def read_bytes(url: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        return None


def read_json(url: str) -> Any | None:
    """The parsed JSON file, or None when it does not exist.

    Raises:
        ValueError: the file exists but is not JSON (never the case for files written here).
    """
    data = read_bytes(url)
    return None if data is None else json.loads(data)


def remove(url: str, *, recursive: bool = False) -> bool:
    """Delete a file (or a directory tree); False when there was nothing."""
    fs, path = filesystem(url)
    try:
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        return False
    return True


def list_files(url: str) -> list[str]:
    """Every file under ``url`` (recursively) as paths relative to it, sorted; [] when it is absent."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    found = fs.find(path)
    return sorted(posixpath.relpath(p, path) for p in found)


def remove_temporaries(url: str) -> list[str]:
    """Delete the temporary files a killed writer left under ``url``; returns their relative paths."""
    gone = [rel for rel in list_files(url) if TMP_MARK in posixpath.basename(rel)]
    for rel in gone:
        remove(join(url, rel))
    return gone
