"""The Parquet output folder (tinyclip.shards) and the image lists (tinyclip.sources), without Ray."""
import csv
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tinyclip import identity, shards, sources
from tinyclip.tasks import UsageError

DIM = 4
MODEL = {"hub_id": None, "revision": None, "folder": "/checkpoints/a", "fingerprint": "a" * 32}


def manifest(**changes):
    m = shards.manifest_for(MODEL, "float32", DIM, False)
    m.update(changes)
    return m


def vectors(n, start=0.0):
    return (np.arange(n * DIM, dtype=np.float32) + start).reshape(n, DIM)


def test_rows_round_trip_with_null_embeddings_for_errors(tmp_path):
    writer = shards.ShardWriter(tmp_path / "out", manifest())
    assert writer.write(["/a", "/b", "/c"], [1, 2, 3], [10, 20, 30], vectors(3), [None, "not an image", None]) == 3
    assert writer.finish()["count"] == 2 and shards.read_manifest(tmp_path / "out")["errors"] == 1
    rows = list(shards.iter_rows(tmp_path / "out"))
    assert [r["path"] for r in rows] == ["/a", "/b", "/c"]
    assert rows[0]["embedding"] == vectors(3)[0].tolist() and (rows[0]["size"], rows[0]["mtime"]) == (1, 10)
    assert rows[1]["embedding"] is None and rows[1]["error"] == "not an image"
    table = pq.read_table(shards.shard_files(tmp_path / "out")[0])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)


def test_rows_already_in_the_folder_are_not_written_again(tmp_path):
    shards.ShardWriter(tmp_path / "out", manifest()).write(["/a", "/b"], [1, 2], [10, 20], vectors(2), [None, None])
    writer = shards.ShardWriter(tmp_path / "out", manifest())
    assert writer.done == {("/a", 1, 10), ("/b", 2, 20)}
    # /a unchanged is skipped; /b with another mtime (the file changed) is written again
    assert writer.write(["/a", "/b"], [1, 2], [10, 21], vectors(2, 100), [None, None]) == 1
    embeddings, paths, _ = shards.read_embeddings(tmp_path / "out")
    assert paths.tolist() == ["/a", "/b"]
    np.testing.assert_array_equal(embeddings, np.stack([vectors(2)[0], vectors(2, 100)[1]]))


def test_a_half_written_shard_never_counts_and_is_removed(tmp_path):
    out = tmp_path / "out"
    shards.ShardWriter(out, manifest()).write(["/a"], [1], [10], vectors(1), [None])
    half = out / f"{shards.TMP_PREFIX}part-x-000001.parquet"
    half.write_bytes(b"PAR1 cut short")
    writer = shards.ShardWriter(out, manifest())
    assert writer.done == {("/a", 1, 10)} and not half.exists()


def test_errors_are_left_out_of_search_and_the_newest_row_wins(tmp_path):
    writer = shards.ShardWriter(tmp_path / "out", manifest())
    writer.write(["/a", "/b"], [1, 2], [10, 20], vectors(2), [None, "truncated"])
    writer.write(["/a"], [5], [50], vectors(1, 7), [None])
    embeddings, paths, _ = shards.read_embeddings(tmp_path / "out")
    assert paths.tolist() == ["/a"]
    np.testing.assert_array_equal(embeddings, vectors(1, 7))


@pytest.mark.parametrize("change, words", [
    (dict(model=dict(MODEL, fingerprint="b" * 32, hub_id="other/clip")), "other/clip"),
    (dict(dtype="float16"), "dtype 'float32', this run makes 'float16'"),
    (dict(normalized=True), "normalized False"),
])
def test_another_model_dtype_or_normalisation_is_refused(tmp_path, change, words):
    shards.ShardWriter(tmp_path / "out", manifest())
    with pytest.raises(shards.OutputFolderError, match=words.replace("(", r"\(")):
        shards.ShardWriter(tmp_path / "out", manifest(**change))


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"")
    with pytest.raises(shards.OutputFolderError, match="not empty and has no manifest.json"):
        shards.ShardWriter(tmp_path, manifest())


def test_search_refuses_embeddings_of_another_checkpoint(tiny_quick, tmp_path):
    shards.ShardWriter(tmp_path / "out", manifest()).write(["/a"], [1], [10], vectors(1), [None])
    with pytest.raises(shards.OutputFolderError, match="embedded with /checkpoints/a"):
        shards.read_for_search(tmp_path / "out", str(tiny_quick.folder))
    same = manifest(model=identity.of_checkpoint(tiny_quick.folder))
    shards.write_json(tmp_path / "out" / shards.MANIFEST, same)
    embeddings, paths = shards.read_for_search(tmp_path / "out", str(tiny_quick.folder))
    assert paths.tolist() == ["/a"] and embeddings.shape == (1, DIM)


@pytest.fixture
def collection(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / name)
    return tmp_path / "imgs"


def test_a_folder_is_searched_recursively(collection):
    assert list(sources.image_paths(collection)) == [str(collection / "a.png"), str(collection / "sub" / "b.jpg")]


def test_lists_of_paths_are_read_relative_to_the_list(collection, tmp_path):
    expected = [str(collection / "a.png"), str(collection / "sub" / "b.jpg"), "/elsewhere/c.png"]
    text = tmp_path / "paths.txt"
    text.write_text("# my photos\nimgs/a.png\n\nimgs/sub/b.jpg\n/elsewhere/c.png\n")
    table = tmp_path / "paths.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["id", "path"], [1, "imgs/a.png"], [2, "imgs/sub/b.jpg"], [3, "/elsewhere/c.png"]])
    parquet = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": ["imgs/a.png", "imgs/sub/b.jpg", "/elsewhere/c.png"], "n": [1, 2, 3]}), parquet)
    cwd = os.getcwd()
    os.chdir(collection)       # relative to the list, not to where the command runs
    try:
        for src in (text, table, parquet):
            assert list(sources.image_paths(src)) == expected, src
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_without_a_path_column_is_refused(tmp_path, suffix):
    src = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        src.write_text("file,label\na.png,cat\n")
    else:
        pq.write_table(pa.table({"file": ["a.png"]}), src)
    with pytest.raises(UsageError, match="no 'path' column"):
        list(sources.image_paths(src))
