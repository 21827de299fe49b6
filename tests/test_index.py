"""`tinyclip index` and tinyclip.index: recall of the approximate index against exact search, the exact
index against `tinyclip search` on the .npz it was built from, and the files' checks."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install 'tinyclip[search]')")

from tinyclip import identity, index, shards  # noqa: E402
from tests.test_cli import BATCH, DATA, GOOD, assert_ok, assert_one_line_error, tinyclip  # noqa: E402

RECALL_AT_10 = 0.95        # what the approximate index must find of the exact top 10
SCORE_ATOL = 1e-6          # faiss's float32 dot products against numpy's


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(found, truth):
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


def exact_top10(x, queries):
    scores = queries @ x.T
    return np.argsort(-scores, axis=1)[:, :10]


@pytest.mark.slow
def test_ivf_recall_at_10_on_100000_random_unit_vectors():
    """The issue's bar: uniformly random vectors, the hardest case (no cells hold the neighbours), with
    queries the index never saw."""
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((100_000, 512), dtype=np.float32))
    queries = unit(rng.standard_normal((100, 512), dtype=np.float32))
    built, info = index.build(x, exact=False)
    assert info["kind"] == "ivf-flat" and info["params"]["nlist"] == index.lists_for(100_000) == 256
    _, found = built.search(queries, 10)
    assert recall_at_10(found, exact_top10(x, queries)) >= RECALL_AT_10


def test_ivf_scans_few_cells_where_the_vectors_cluster():
    """Embeddings of real images cluster: there nprobe comes out small and recall still holds."""
    rng = np.random.default_rng(1)
    centres = unit(rng.standard_normal((400, 512), dtype=np.float32))
    x = unit(centres[rng.integers(0, 400, 20_000)] + 0.05 * rng.standard_normal((20_000, 512), dtype=np.float32))
    queries = unit(centres[rng.integers(0, 400, 100)] + 0.05 * rng.standard_normal((100, 512), dtype=np.float32))
    built, info = index.build(x, exact=False)
    params = info["params"]
    assert params["nprobe"] <= params["nlist"] // 4, params
    _, found = built.search(queries, 10)
    assert recall_at_10(found, exact_top10(x, queries)) >= RECALL_AT_10


def test_size_chooses_the_kind():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16), dtype=np.float32)
    assert index.build(x)[1]["kind"] == "flat"
    assert index.lists_for(10**6) == 1024 and index.lists_for(10) == index.MIN_LISTS


def test_written_index_reads_back(tmp_path):
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((5_000, 32), dtype=np.float32))
    built, info = index.build(x, exact=False)
    ident = {"hub_id": None, "revision": None, "folder": "/m", "fingerprint": "f" * 32}
    paths = [f"/photos/{i}.jpg" for i in range(len(x))]
    index.write(tmp_path / "x.index", built, info, paths, ident, "float32", "/photos.npz")
    back = index.read(tmp_path / "x.index")
    assert back.paths == paths and back.identity == ident and back.kind == "ivf-flat"
    assert back.meta["params"]["nprobe"] == info["params"]["nprobe"]
    np.testing.assert_allclose(back.vector(7), x[7], atol=SCORE_ATOL)
    np.testing.assert_array_equal(back.search(x[:5], 3)[1], built.search(x[:5], 3)[1])


def test_index_files_others_can_write_are_refused(tmp_path):
    built, info = index.build(np.eye(4, dtype=np.float32))
    index.write(tmp_path / "x.index", built, info, list("abcd"), {"fingerprint": "f"}, "float32", "-")
    target = tmp_path / "x.index" / index.FAISS_FILE
    os.chmod(target, 0o666)
    with pytest.raises(index.IndexFileError, match="writable by group or others"):
        index.read(tmp_path / "x.index")
    os.chmod(target, 0o644)
    os.rename(target, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", target)
    with pytest.raises(index.IndexFileError, match="a link is never followed"):
        index.read(tmp_path / "x.index")


# ---- the command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_quick):
    """gallery/ (six images), its .npz from `tinyclip embed` and an exact index built from it."""
    root = tmp_path_factory.mktemp("index")
    for rel in GOOD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / rel.rsplit("/", 1)[1], root / rel)
    assert_ok(tinyclip(root, "embed", "gallery", "--out", "gallery.npz", model=tiny_quick.folder))
    run = tinyclip(root, "index", "gallery.npz", "--out", "gallery.index", "--json")
    assert_ok(run)
    assert json.loads(run.stdout)["kind"] == "flat"
    return root


@pytest.mark.parametrize("query", ["a photo of a cat", GOOD[2]])
def test_exact_index_equals_search_on_the_npz(tiny_quick, work, query):
    by_npz = tinyclip(work, "search", query, "--images", "gallery.npz", "--top", "4", "--json", model=tiny_quick.folder)
    by_index = tinyclip(work, "search", query, "--images", "gallery.index", "--top", "4", "--json",
                        model=tiny_quick.folder)
    assert_ok(by_npz), assert_ok(by_index)
    want, got = json.loads(by_npz.stdout), json.loads(by_index.stdout)
    assert [r["path"] for r in got] == [r["path"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=SCORE_ATOL)


def test_index_of_a_ray_output_folder(tiny_quick, work):
    """The Parquet folder of `embed --engine ray`, written here by its writer, indexes like an .npz."""
    with np.load(work / "gallery.npz", allow_pickle=False) as data:
        embeddings, paths = data["embeddings"], [str(work / p) for p in data["paths"]]
        model = json.loads(str(data["model_identity"]))
    writer = shards.ShardWriter(work / "emb", shards.manifest_for(model, "float32", embeddings.shape[1], False))
    writer.write(paths, [1] * len(paths), [2] * len(paths), embeddings, [None] * len(paths))
    writer.finish()
    assert_ok(tinyclip(work, "index", "emb", "--out", "emb.index"))
    by_folder = tinyclip(work, "search", "a rocket", "--images", "emb", "--json", model=tiny_quick.folder)
    by_index = tinyclip(work, "search", "a rocket", "--images", "emb.index", "--json", model=tiny_quick.folder)
    assert_ok(by_folder), assert_ok(by_index)
    want, got = json.loads(by_folder.stdout), json.loads(by_index.stdout)
    assert [os.path.abspath(work / r["path"]) for r in got] == [r["path"] for r in want]


def test_search_refuses_an_index_of_another_model(tiny_quick, work, tmp_path):
    built, info = index.build(np.eye(tiny_quick.config.projection_dim, dtype=np.float32)[:3])
    other = {"hub_id": "someone/else", "revision": None, "folder": "/x", "fingerprint": "0" * 32}
    index.write(tmp_path / "other.index", built, info, ["/a.png", "/b.png", "/c.png"], other, "float32", "-")
    run = tinyclip(work, "search", "cat", "--images", str(tmp_path / "other.index"), model=tiny_quick.folder)
    assert_one_line_error(run, "embedded with someone/else (fingerprint 000000000000), not with")
    fingerprint = identity.of_checkpoint(tiny_quick.folder)["fingerprint"]
    assert fingerprint[:12] in run.stderr


def test_index_command_errors(work):
    assert_one_line_error(tinyclip(work, "index", "gallery", "--out", "x.index"),
                          "EMBEDDINGS gallery: an index is built from an .npz")
    assert_one_line_error(tinyclip(work, "index", "gallery.npz", "--out", "gallery"),
                          "--out gallery: exists and is not a tinyclip index")


def test_a_missing_faiss_is_a_one_line_error(work):
    code = ("import sys; sys.modules['faiss'] = None; from tinyclip.cli import main; "
            "sys.exit(main(['index', 'gallery.npz', '--out', 'y.index']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
    assert_one_line_error(run, "pip install 'tinyclip[search]'")
    assert not (work / "y.index").exists()


def test_tinyclip_imports_without_the_search_extra():
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('faiss', 'starlette', 'uvicorn', 'multipart')]; "
            "import tinyclip, tinyclip.index, tinyclip.cli; tinyclip.cli.build_parser()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
