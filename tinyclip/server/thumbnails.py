"""Thumbnails of the collection's files, and of nothing else.

A thumbnail is asked for by the row number of a file in the collection, never by a path, so a URL
cannot name another file. The file's path is then resolved (every symbolic link followed) and
must still lie inside the collection's folder: a file replaced by a link to elsewhere is refused.
What is sent is a JPEG re-encoded from the decoded image, never the file's own bytes.
"""
from __future__ import annotations

import collections
import io
import os
import threading

from ..preprocess import load_image

THUMBNAIL_PX = 256
CACHE_ENTRIES = 1024                     # about 15 KB each


class NotServed(Exception):
    """The file is not served: `status` 404 (no such row, unreadable) or 403 (outside the collection)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Thumbnails:
    def __init__(self, paths: list[str], root: str):
        self.paths = paths
        self.root = os.path.realpath(root)
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, i: int) -> str:
        """The resolved path of row i, checked to lie inside the collection's folder."""
        if not 0 <= i < len(self.paths):
            raise NotServed(404, f"no image {i} in the collection")
        real = os.path.realpath(self.paths[i])
        if os.path.commonpath([real, self.root]) != self.root:
            raise NotServed(403, f"image {i} resolves outside the collection's folder; not served")
        return real

    def jpeg(self, i: int) -> bytes:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        path = self.path_of(i)
        try:
            image = load_image(path)
        except Exception:
            raise NotServed(404, f"image {i} cannot be read") from None
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        data = out.getvalue()
        with self._lock:
            self._cache[i] = data
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return data
