"""What the server searches: a faiss index (tinyclip.index), or unit embeddings in memory searched
exactly, with the same arithmetic as `tinyclip search` on an .npz."""
from __future__ import annotations

import os

import numpy as np

from .. import tasks
from ..vectors import unit_rows


class Collection:
    """paths (absolute), the folder they lie in (`root`), and search by a unit query vector."""

    def __init__(self, paths: list[str], root: str | None = None):
        self.paths = [os.path.abspath(p) for p in paths]
        if root is None:
            root = os.path.commonpath([os.path.dirname(p) for p in self.paths]) if self.paths else os.sep
        self.root = os.path.abspath(root)

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        raise NotImplementedError

    def vector(self, i: int) -> np.ndarray:
        raise NotImplementedError


class InMemory(Collection):
    """Embeddings (N, D) held as unit rows; a query scores every row (N x D multiply-adds)."""
    kind = "exact"

    def __init__(self, embeddings: np.ndarray, paths: list[str], root: str | None = None):
        super().__init__(paths, root)
        self.unit = unit_rows(np.asarray(embeddings, np.float32))
        self.dim = self.unit.shape[1]

    def search(self, query, k):
        scores = self.unit @ query
        return [(int(i), float(scores[i])) for i in tasks.top_indices(scores, k)]

    def vector(self, i):
        return self.unit[i]


class Indexed(Collection):
    """A tinyclip.index.Index."""

    def __init__(self, index):
        super().__init__(index.paths)
        self.index = index
        self.dim = index.dim
        self.kind = index.kind

    def search(self, query, k):
        scores, ids = self.index.search(query, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def vector(self, i):
        return self.index.vector(i)
