"""The Parquet output folder (tinyclip.shards) and the image lists (tinyclip.sources), without Ray."""
import csv
import json
import os
import socket
import subprocess
import sys

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
    assert [r["path"] for r in rows] == [b"/a", b"/b", b"/c"]
    assert rows[0]["embedding"] == vectors(3)[0].tolist() and (rows[0]["size"], rows[0]["mtime"]) == (1, 10)
    assert rows[1]["embedding"] is None and rows[1]["error"] == "not an image"
    table = pq.read_table(shards.shard_files(tmp_path / "out")[0])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)


def write_once(folder, *rows, **options):
    """One writer's run: write(*rows), then finish (which releases the folder's lock)."""
    writer = shards.ShardWriter(folder, manifest(), **options)
    n = writer.write(*rows)
    writer.finish()
    return n


def test_rows_already_in_the_folder_are_not_written_again(tmp_path):
    write_once(tmp_path / "out", ["/a", "/b"], [1, 2], [10, 20], vectors(2), [None, None])
    writer = shards.ShardWriter(tmp_path / "out", manifest())
    assert writer.is_done((b"/a", 1, 10)) and writer.is_done((b"/b", 2, 20)) and not writer.is_done((b"/b", 2, 21))
    # /a unchanged is skipped; /b with another mtime (the file changed) is written again
    assert writer.write(["/a", "/b"], [1, 2], [10, 21], vectors(2, 100), [None, None]) == 1
    writer.finish()
    embeddings, paths, _ = shards.read_embeddings(tmp_path / "out")
    assert paths.tolist() == ["/a", "/b"]
    np.testing.assert_array_equal(embeddings, np.stack([vectors(2)[0], vectors(2, 100)[1]]))


def test_a_half_written_shard_never_counts_and_is_removed(tmp_path):
    out = tmp_path / "out"
    write_once(out, ["/a"], [1], [10], vectors(1), [None])
    half = out / f"{shards.TMP_PREFIX}part-x-000001.parquet"
    half.write_bytes(b"PAR1 cut short")
    with shards.ShardWriter(out, manifest()) as writer:
        assert writer.rows == 1 and writer.is_done((b"/a", 1, 10)) and not half.exists()


def test_errors_are_left_out_of_search_and_the_newest_row_wins(tmp_path):
    writer = shards.ShardWriter(tmp_path / "out", manifest())
    writer.write(["/a", "/b"], [1, 2], [10, 20], vectors(2), [None, "truncated"])
    writer.write(["/a"], [5], [50], vectors(1, 7), [None])
    writer.finish()
    embeddings, paths, _ = shards.read_embeddings(tmp_path / "out")
    assert paths.tolist() == ["/a"]
    np.testing.assert_array_equal(embeddings, vectors(1, 7))


@pytest.mark.parametrize("change, words", [
    (dict(model=dict(MODEL, fingerprint="b" * 32, hub_id="other/clip")), "other/clip"),
    (dict(dtype="float16"), "dtype 'float32', this run makes 'float16'"),
    (dict(normalized=True), "normalized False"),
])
def test_another_model_dtype_or_normalisation_is_refused(tmp_path, change, words):
    shards.ShardWriter(tmp_path / "out", manifest()).finish()
    with pytest.raises(shards.OutputFolderError, match=words.replace("(", r"\(")):
        shards.ShardWriter(tmp_path / "out", manifest(**change))


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"")
    with pytest.raises(shards.OutputFolderError, match="not empty and has no manifest.json"):
        shards.ShardWriter(tmp_path, manifest())


def test_search_refuses_embeddings_of_another_checkpoint(tiny_quick, tmp_path):
    write_once(tmp_path / "out", ["/a"], [1], [10], vectors(1), [None])
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


NOT_UTF8 = os.fsdecode(b"/photos/caf\xe9-\xff.png")     # a Latin-1 name: bytes that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_stored_exactly(tmp_path):
    out = tmp_path / "out"
    assert write_once(out, [NOT_UTF8, "/b"], [1, 2], [10, 20], vectors(2), [None, None]) == 2
    assert [r["path"] for r in shards.iter_rows(out)] == [b"/photos/caf\xe9-\xff.png", b"/b"]
    embeddings, paths, _ = shards.read_embeddings(out)
    assert paths.tolist() == [NOT_UTF8, "/b"]      # os.fsdecode: what os.listdir gives for that name
    with shards.ShardWriter(out, manifest()) as writer:        # a resume matches it again
        assert writer.is_done((os.fsencode(NOT_UTF8), 1, 10))
    assert shards.shown(NOT_UTF8) == "/photos/caf\\xe9-\\xff.png"


def test_a_format_1_folder_with_string_paths_is_read_and_resumed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"path": ["/a", "/b"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(vectors(2).reshape(-1)), DIM), "size": [1, 2], "mtime": [10, 20], "error": pa.array([None, None],
                                                                                                       pa.string())}),
                   out / "part-20240101T000000.000000000-abcdef12-000000.parquet")
    shards.write_json(out / shards.MANIFEST, manifest(format=1, count=2))
    embeddings, paths, _ = shards.read_embeddings(out)
    assert paths.tolist() == ["/a", "/b"]
    np.testing.assert_array_equal(embeddings, vectors(2))
    writer = shards.ShardWriter(out, manifest())
    assert writer.is_done((b"/a", 1, 10))
    assert writer.write(["/c"], [3], [30], vectors(1), [None]) == 1
    assert writer.finish()["format"] == shards.FORMAT
    assert [r["path"] for r in shards.iter_rows(out)] == [b"/a", b"/b", b"/c"]


def test_rows_that_failed_are_retried_unless_asked_not_to(tmp_path):
    out = tmp_path / "out"
    write_once(out, ["/a", "/b"], [1, 2], [10, 20], vectors(2), [None, "truncated"])
    with shards.ShardWriter(out, manifest(), retry_errors=False) as writer:
        assert writer.is_done((b"/b", 2, 20))
    writer = shards.ShardWriter(out, manifest())
    assert writer.is_done((b"/a", 1, 10)) and not writer.is_done((b"/b", 2, 20))
    assert writer.write(["/a", "/b"], [1, 2], [10, 20], vectors(2, 50), [None, None]) == 1
    assert writer.write(["/b"], [2], [20], vectors(1, 60), ["twice in one run"]) == 0    # tried once per run
    finished = writer.finish()
    assert (finished["count"], finished["errors"]) == (2, 0)
    embeddings, paths, _ = shards.read_embeddings(out)
    assert paths.tolist() == ["/a", "/b"]
    np.testing.assert_array_equal(embeddings, np.stack([vectors(2)[0], vectors(2, 50)[1]]))


def flip_a_byte_in_the_embeddings(shard):
    """Damage a shard as a bad disk would: one byte in the embedding column's data pages."""
    meta = pq.ParquetFile(shard).metadata
    column = meta.row_group(0).column(meta.schema.names.index("embedding") if "embedding" in meta.schema.names
                                      else 1)
    data = bytearray(shard.read_bytes())
    data[column.data_page_offset + column.total_compressed_size - 8] ^= 0x40
    shard.write_bytes(bytes(data))


def test_a_damaged_shard_is_refused_on_read_and_redone_on_resume(tmp_path):
    out = tmp_path / "out"
    write_once(out, ["/a"], [1], [10], vectors(1), [None])
    write_once(out, ["/b", "/c"], [2, 3], [20, 30], vectors(2, 8), [None, None])
    first, second = shards.shard_files(out)
    flip_a_byte_in_the_embeddings(second)
    with pytest.raises(shards.OutputFolderError, match=f"{second}: the shard is damaged .*CRC.*run the same embed"):
        shards.read_embeddings(out)
    with pytest.warns(shards.DamagedShardWarning, match="set aside"):
        writer = shards.ShardWriter(out, manifest())
    assert writer.is_done((b"/a", 1, 10)) and not writer.is_done((b"/b", 2, 20)) and not writer.is_done((b"/c", 3, 30))
    assert writer.write(["/b", "/c"], [2, 3], [20, 30], vectors(2, 8), [None, None]) == 2
    writer.finish()
    assert (out / f"{shards.DAMAGED_PREFIX}{second.name}").exists()
    embeddings, paths, _ = shards.read_embeddings(out)
    assert paths.tolist() == ["/a", "/b", "/c"]
    np.testing.assert_array_equal(embeddings, np.concatenate([vectors(1), vectors(2, 8)]))


HOLD_THE_FOLDER = """
import sys, time
from tinyclip import shards
shards.ShardWriter(sys.argv[1], shards.manifest_for({"fingerprint": "a" * 32}, "float32", 4, False))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_FOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(shards.OutputFolderError) as refused:
            shards.ShardWriter(out, manifest())
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "\n" not in message
        assert str(out / shards.LOCK) in message
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the holder died without releasing the lock: its pid is gone on this host, so the lock is stale
    assert json.loads((out / shards.LOCK).read_text())["pid"] == holder.pid
    with shards.ShardWriter(out, manifest()) as writer:
        assert json.loads((out / shards.LOCK).read_text())["pid"] == os.getpid()
        writer.write(["/a"], [1], [10], vectors(1), [None])
    assert not (out / shards.LOCK).exists()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / shards.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 0}))
    with pytest.raises(shards.OutputFolderError, match="pid 1 on host elsewhere.example"):
        shards.ShardWriter(out, manifest())


def test_a_writer_that_never_wrote_leaves_no_folder_behind(tmp_path):
    with shards.ShardWriter(tmp_path / "new", manifest()):
        pass
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("model", ["x", {"hub_id": "a"}, 3])
def test_a_manifest_with_a_bad_model_is_one_line(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    shards.write_json(out / shards.MANIFEST, manifest(model=model))
    with pytest.raises(shards.OutputFolderError, match=r"manifest.json: model is .*, not an object with a fingerprint"):
        shards.ShardWriter(out, manifest())
    with pytest.raises(shards.OutputFolderError, match="model is"):
        shards.read_embeddings(out)


@pytest.mark.parametrize("column, kind", [([1, 2], "int64"), ([["a.png"], ["b.png"]], "list<.*>")])
def test_a_parquet_path_column_of_other_types_is_refused(tmp_path, column, kind):
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": column}), src)
    with pytest.raises(UsageError, match=f"the 'path' column holds {kind}, not file paths"):
        list(sources.image_paths(src))


def test_a_parquet_list_of_byte_paths_keeps_names_that_are_not_utf8(tmp_path):
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": pa.array([b"/x/caf\xe9.png", b"rel.png"], pa.binary())}), src)
    assert list(sources.image_paths(src)) == [os.fsdecode(b"/x/caf\xe9.png"), str(tmp_path / "rel.png")]


def test_a_csv_list_that_is_not_utf8_is_one_line(tmp_path):
    src = tmp_path / "t.csv"
    src.write_bytes("path\ncaf\u00e9.png\n".encode("latin-1"))
    with pytest.raises(UsageError, match="t.csv: not a UTF-8 CSV"):
        list(sources.image_paths(src))
