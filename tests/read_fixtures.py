"""A rasterio ``opener`` that counts the bytes GDAL reads through it (for tests of what reads touch)."""

from __future__ import annotations

import io
from typing import Any


class CountingOpener:
    """rasterio ``opener``: hands GDAL Python file objects and counts the bytes it reads."""

    def __init__(self) -> None:
        self.bytes_read = 0

    def __call__(self, path: str, mode: str = "rb") -> io.RawIOBase:
        fh = open(path, mode)  # noqa: SIM115 - closed by GDAL through the wrapper
        counter = self

        class _Counted(io.RawIOBase):
            def readinto(self, b: Any) -> int:
                n = fh.readinto(b) or 0
                counter.bytes_read += n
                return n

            def seek(self, offset: int, whence: int = 0) -> int:
                return fh.seek(offset, whence)

            def tell(self) -> int:
                return fh.tell()

            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def close(self) -> None:
                fh.close()
                super().close()

        return _Counted()
