"""A faiss index over a collection's image embeddings, with its paths and its model beside it.

An index is a folder (what `tinyclip index EMBEDDINGS --out INDEX` writes)::

    INDEX/index.json    format, kind, parameters, count, dim, model identity, dtype, tinyclip version
    INDEX/paths.npz     `paths` (N,): the absolute path of each row's image
    INDEX/index.faiss   faiss's own file (faiss.write_index), rows unit length, inner product = cosine

Up to EXACT_UP_TO rows it is exact: a flat inner-product index, the scores `tinyclip search` computes
from an .npz. Beyond that a scan of every row costs more than it needs to, and the index is IVF-Flat:
the rows are split into `nlist` k-means cells (about sqrt(N), a power of two) and a query scans the
rows of the `nprobe` cells nearest to it, with exact scores. nprobe is measured at build time, not
guessed: CALIBRATION_QUERIES rows of the collection are taken as queries, their exact
CALIBRATION_K nearest rows (their own left out) found by a full scan, and nprobe is the smallest
number of cells that holds CALIBRATION_RECALL of those neighbours. Embeddings of real images cluster,
so a few cells hold a query's neighbours; vectors without any structure (uniformly random ones)
have their neighbours spread over every cell, and there nprobe comes out near nlist: as slow as a
flat scan, and as exact. `Index.scanned` says which it was.

Why not compressed codes (IVF-PQ, IVF-SQ8): they save memory, but their score errors are larger than
the gaps between neighbours in unstructured data. On 100,000 random unit 512-d vectors, scanning
every cell, IVF-SQ8 found 0.97 of the true top 10 and IVF-PQ64 0.09; keeping the float32 rows keeps
the scores exact, and recall is then only a matter of which cells are scanned.

faiss is imported on first use (pip install 'tinyclip[search]'): `import tinyclip` does not need it.
Index files are read only when they are the user's own and nobody else can write them (tinyclip.trust):
faiss parses them in C++, which is not meant for files from others.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from . import __version__, trust
from .errors import MissingDependencyError, TinyClipError
from .vectors import unit_rows

FORMAT = 1
MARKER = "tinyclip-index"       # index.json's "kind_of_file": what tells an index folder from others
META, PATHS, FAISS_FILE = "index.json", "paths.npz", "index.faiss"

EXACT_UP_TO = 100_000           # rows; a flat scan of 100,000 x 512 float32 takes tens of ms on one core
MIN_LISTS, MAX_LISTS = 64, 65_536
TRAIN_POINTS_PER_LIST = 40      # k-means sample per cell (faiss warns below 39)
KMEANS_ITERATIONS = 10
CALIBRATION_QUERIES = 300
CALIBRATION_K = 10
CALIBRATION_RECALL = 0.97       # a margin over the 0.95 the tests ask of queries it never saw
SEED = 1234


class IndexFileError(TinyClipError, ValueError):
    """An index folder cannot be used: missing, damaged, from another tinyclip format, or not yours alone."""


def faiss():
    """The faiss module, or a one-line error saying how to install it."""
    try:
        import faiss as module
    except ImportError:
        raise MissingDependencyError("indexes need faiss: pip install 'tinyclip[search]'") from None
    return module


def is_index(path) -> bool:
    """Whether `path` is an index folder (it has an index.json)."""
    return (pathlib.Path(path) / META).is_file()


def lists_for(n: int) -> int:
    """nlist for n rows: the power of two nearest sqrt(n), within [MIN_LISTS, MAX_LISTS]."""
    return int(min(MAX_LISTS, max(MIN_LISTS, 2 ** round(np.log2(max(n, 1)) / 2))))


@dataclasses.dataclass
class Index:
    """An index in memory: search it with `search`, read a row back with `vector`."""
    faiss_index: object
    paths: list[str]             # absolute
    meta: dict

    @property
    def identity(self) -> dict:
        return self.meta["model"]

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def scanned(self) -> float:
        """The share of the cells a query scans: 1 for an exact index, nprobe / nlist for IVF."""
        params = self.meta["params"]
        return 1.0 if self.kind == "flat" else params["nprobe"] / params["nlist"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k') float32, ids (Q, k') int64) of the k best rows per unit query (Q, dim), best
        first, k' = min(k, count). Thread-safe: faiss searches release the GIL and share no state."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise IndexFileError(f"queries have {queries.shape[1]} dimensions, the index {self.dim}")
        k = min(int(k), len(self.paths))
        scores, ids = self.faiss_index.search(queries, k)
        return scores, ids

    def vector(self, i: int) -> np.ndarray:
        """Row i as stored: unit length."""
        return unit_rows(self.faiss_index.reconstruct(int(i)).astype(np.float32))


def build(embeddings: np.ndarray, exact: bool | None = None, on_status=None) -> tuple[object, dict]:
    """A faiss index over the unit rows of `embeddings` (N, D): (the index, its kind and parameters).

    exact: None chooses by size (flat up to EXACT_UP_TO rows), True or False forces it.
    on_status(message) is told what is being done (training, adding, calibrating).
    """
    f = faiss()
    x = np.ascontiguousarray(unit_rows(np.asarray(embeddings, np.float32)))
    n, dim = x.shape
    say = on_status or (lambda message: None)
    if exact is None:
        exact = n <= EXACT_UP_TO
    if exact:
        index = f.IndexFlatIP(dim)
        index.add(x)
        return index, {"kind": "flat", "params": {}}
    nlist = lists_for(n)
    rng = np.random.default_rng(SEED)
    quantizer = f.IndexFlatIP(dim)
    index = f.IndexIVFFlat(quantizer, dim, nlist, f.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = SEED
    index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST   # faiss would sample 256 per cell
    sample = x[np.sort(rng.choice(n, min(n, TRAIN_POINTS_PER_LIST * nlist), replace=False))]
    say(f"training {nlist} cells on {len(sample):,} rows")
    index.train(sample)
    say(f"adding {n:,} rows")
    index.add(x)
    say("measuring which cells hold the neighbours, to choose nprobe")
    nprobe, recall = calibrate(index, x, rng)
    index.nprobe = nprobe
    index.make_direct_map()      # vector(i), for "more like this"
    return index, {"kind": "ivf-flat", "params": {"nlist": nlist, "nprobe": nprobe, "calibration_recall": recall,
                                                  "calibration_queries": min(CALIBRATION_QUERIES, n)}}


def calibrate(index, x: np.ndarray, rng) -> tuple[int, float]:
    """(nprobe, its recall): the fewest cells to scan so that CALIBRATION_RECALL of the exact
    CALIBRATION_K nearest rows of sample rows of `x` (each one's own row left out) lie in them.

    An IVF-Flat index scores exactly, so a neighbour is found exactly when its cell is scanned: the
    rank of its cell among the query's cells says at which nprobe it is found, for every nprobe at once.
    """
    n, nlist = len(x), index.nlist
    picked = np.sort(rng.choice(n, min(n, CALIBRATION_QUERIES), replace=False))
    queries = x[picked]
    neighbours = _exact_top(x, queries, min(CALIBRATION_K + 1, n))            # (Q, K + 1)
    neighbours = np.array([[j for j in row if j != own][:CALIBRATION_K] for row, own in zip(neighbours, picked)])
    if neighbours.size == 0:
        return 1, 1.0
    _, cell_of = index.quantizer.search(x[neighbours.reshape(-1)], 1)      # the cell add() put each row in
    _, ranked = index.quantizer.search(queries, nlist)                     # (Q, nlist) the query's cells, best first
    rank = np.empty_like(ranked)
    np.put_along_axis(rank, ranked, np.arange(nlist)[None, :].repeat(len(queries), 0), axis=1)
    needed = np.take_along_axis(rank, cell_of.reshape(neighbours.shape), axis=1)   # 0-based rank of each cell
    found = np.bincount(needed.reshape(-1), minlength=nlist).cumsum() / needed.size  # recall at nprobe = i + 1
    nprobe = int(np.searchsorted(found, CALIBRATION_RECALL) + 1)
    return min(nprobe, nlist), float(found[min(nprobe, nlist) - 1])


def _exact_top(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """The ids of the k highest inner products of each query over the rows of x, a chunk at a time."""
    best_ids = np.zeros((len(queries), 0), np.int64)
    best = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(x), chunk):
        scores = queries @ x[start:start + chunk].T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores, ids = np.concatenate([best, scores], 1), np.concatenate([best_ids, ids], 1)
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else \
            np.arange(scores.shape[1])[None].repeat(len(scores), 0)
        best, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, 1)


# ---- on disk -------------------------------------------------------------------------------------

def write(out, index, info: dict, paths, model_identity: dict, dtype: str, source: str) -> dict:
    """Write an index folder at `out`; returns its index.json. An existing index at `out` is replaced
    only once the new one is complete; the old one is kept under a hidden name if the swap is cut short."""
    f = faiss()
    out = pathlib.Path(out)
    if out.exists() and not is_index(out):
        raise IndexFileError(f"--out {out}: exists and is not a tinyclip index; give a new name")
    if not out.parent.is_dir():
        raise IndexFileError(f"--out {out}: the folder {out.parent} does not exist")
    meta = {"kind_of_file": MARKER, "format": FORMAT, "kind": info["kind"], "params": info["params"],
            "count": int(index.ntotal), "dim": int(index.d), "model": model_identity, "dtype": dtype,
            "metric": "inner_product", "source": source, "tinyclip_version": __version__,
            "faiss_version": f.__version__}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        f.write_index(index, str(tmp / FAISS_FILE))
        with open(tmp / PATHS, "wb") as fh:
            np.savez(fh, paths=np.array(list(paths), dtype=str))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        raise IndexFileError(f"--out {out}: cannot write the index ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_meta(folder) -> dict:
    """index.json of an index folder, checked (no faiss needed)."""
    folder = pathlib.Path(folder)
    data = _read_trusted(folder, META)
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise IndexFileError(f"{folder / META}: not valid JSON ({e}); build the index again") from None
    if not isinstance(meta, dict) or meta.get("kind_of_file") != MARKER:
        raise IndexFileError(f"{folder / META}: not a tinyclip index file")
    if meta.get("format") != FORMAT:
        raise IndexFileError(f"{folder / META}: format {meta.get('format')!r}, this tinyclip reads format {FORMAT}; "
                             f"build the index again (it was made by tinyclip {meta.get('tinyclip_version')})")
    missing = [k for k in ("kind", "params", "count", "dim", "model", "dtype") if k not in meta]
    if missing or meta["kind"] not in ("flat", "ivf-flat"):
        raise IndexFileError(f"{folder / META}: damaged (no {', '.join(missing) or 'known kind'}); "
                             "build the index again")
    return meta


def read(folder, meta: dict | None = None) -> Index:
    """The index in `folder`, loaded into memory and checked against its index.json."""
    f = faiss()
    folder = pathlib.Path(folder)
    meta = meta or read_meta(folder)
    data = _read_trusted(folder, PATHS)
    try:
        import io
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            paths = [str(p) for p in arrays["paths"]]
    except Exception as e:
        raise IndexFileError(f"{folder / PATHS}: not readable ({type(e).__name__}: {e}); build the index again") \
            from None
    raw = _read_trusted(folder, FAISS_FILE)
    try:
        index = f.deserialize_index(np.frombuffer(raw, np.uint8))
    except Exception as e:     # faiss raises RuntimeError with its C++ message
        first = (str(e).strip().splitlines() or ["?"])[0][:200]
        raise IndexFileError(f"{folder / FAISS_FILE}: faiss cannot read it ({first}); build the index again") \
            from None
    del raw
    if index.ntotal != meta["count"] or index.d != meta["dim"] or len(paths) != meta["count"]:
        raise IndexFileError(f"{folder}: the index holds {index.ntotal} rows of {index.d}, {PATHS} {len(paths)} "
                             f"paths, {META} says {meta['count']} of {meta['dim']}; build the index again")
    if meta["kind"] == "ivf-flat":
        ivf = f.extract_index_ivf(index)
        ivf.nprobe = int(meta["params"]["nprobe"])
        ivf.make_direct_map()
    return Index(index, paths, meta)


def _read_trusted(folder: pathlib.Path, name: str) -> bytes:
    """The bytes of folder/name, read only if it and its folder are the user's alone (never through a link)."""
    path = folder / name
    if why := trust.untrusted(folder):
        raise IndexFileError(f"{folder}: not read: {why}. tinyclip reads index files only when they are yours "
                             f"alone (chmod go-w {folder})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise IndexFileError(f"{path}: missing; the index folder is incomplete, build it again") from None
    except OSError as e:
        raise IndexFileError(f"{path}: cannot open it ({e.strerror or e}; a link is never followed)") from None
    with os.fdopen(fd, "rb") as fh:
        if why := trust.untrusted_stat(os.fstat(fh.fileno()), path):
            raise IndexFileError(f"{path}: not read: {why}. tinyclip reads index files only when they are yours "
                                 f"alone (chmod go-w {path})")
        return fh.read()
