"""tinyclip.ray on a real local Ray (ray.init(num_cpus=2) in this process), against single-process embed.

The oracle is tinyclip's own single-process `tinyclip embed` (itself checked against transformers in
test_cli/test_tasks): the Ray pipeline must give the same embeddings row for row, matched by path,
and, after a driver or an actor is killed part-way, hold every image exactly once.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")     # before Ray is imported: nothing leaves the machine

import numpy as np
import pytest
import ray
from PIL import Image

from tests.conftest import ROOT
from tinyclip import cli, identity, shards, sources
from tinyclip import ray as tinyclip_ray

# max |ray - single process| per embedding value (values are O(1)): Ray's decoding tasks send float32
# pixel values, single-process embed sends uint8 crops that the graph normalises, which differ by
# float32 rounding (under 1e-6 per pixel, tests/test_host_path.py); same pixels gave 1e-6 at most
EMBED_TOLERANCE = 1e-5
N_IMAGES = 240               # generated good images
BAD_FILES = {"empty.jpg": "empty", "not-an-image.png": "not an image", "truncated.jpg": "truncated"}
STARTUP_TIMEOUT_S = 180      # a subprocess driver starting, connecting and writing its first shards
ACTOR_EXIT_TIMEOUT_S = 60    # actors gone after a run


@pytest.fixture(scope="module")
def ray_address():
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """N_IMAGES images (tests/data images resized and re-encoded as PNG and JPEG in nested folders)
    plus one file of each bad kind."""
    folder = tmp_path_factory.mktemp("ray-images")
    sources_ = sorted((ROOT / "tests" / "data" / "images").glob("*.[jp][pn]g"))
    originals = [Image.open(p).convert("RGB") for p in sources_]
    for i in range(N_IMAGES):
        sub = folder / f"set{i % 4}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        image = originals[i % len(originals)].resize((24 + i % 53, 20 + (7 * i) % 61))
        image.save(sub / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not-an-image.png").write_text("this is text, not a PNG")
    (folder / "truncated.jpg").write_bytes((folder / "set0" / "deep" / "img000.jpg").read_bytes()[:300])
    return folder


@pytest.fixture(scope="module")
def reference(images, tiny_quick, tmp_path_factory):
    """Single-process `tinyclip embed` of the same folder: {absolute path: embedding}."""
    out = tmp_path_factory.mktemp("ray-reference") / "ref.npz"
    assert cli.main(["embed", str(images), "--out", str(out), "--model", str(tiny_quick.folder)]) == 0
    with np.load(out) as data:
        return {os.path.abspath(p): e for p, e in zip(data["paths"], data["embeddings"])}


def rows_by_path(out) -> dict:
    """{path: row} of an output folder, asserting that no path appears twice."""
    rows = list(shards.iter_rows(out))
    paths = [r["path"] for r in rows]
    duplicated = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicated, f"{len(duplicated)} images written more than once, e.g. {duplicated[:3]}"
    return {r["path"]: r for r in rows}


def assert_matches_reference(out, images, reference):
    rows = rows_by_path(out)
    bad = {str(images / name) for name in BAD_FILES}
    assert set(rows) == set(reference) | bad
    for path, expected in reference.items():
        assert rows[path]["error"] is None, path
        np.testing.assert_allclose(np.array(rows[path]["embedding"], np.float32), expected,
                                   atol=EMBED_TOLERANCE, rtol=0, err_msg=path)
    for path in bad:
        assert rows[path]["embedding"] is None and rows[path]["error"], path


def test_cli_matches_single_process_embed(ray_address, images, reference, tiny_quick, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["embed", str(images), "--out", str(out), "--engine", "ray", "--address", ray_address,
                     "--model", str(tiny_quick.folder), "--batch-size", "16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["count"], summary["errors"]) == (N_IMAGES, len(BAD_FILES))
    assert_matches_reference(out, images, reference)
    manifest = shards.read_manifest(out)
    assert manifest["complete"] and manifest["count"] == N_IMAGES and manifest["dtype"] == "float32"


def test_image_embedder_takes_bytes_and_records_bad_files(ray_address, images, reference, tiny_quick):
    good = [images / "set1" / "img001.png", images / "set2" / "img002.jpg"]
    files = [images / name for name in BAD_FILES] + good
    ds = ray.data.from_items([{"path": str(f), "bytes": f.read_bytes()} for f in files])
    ds = ds.map_batches(tinyclip_ray.ImageEmbedder, fn_constructor_kwargs={"model": str(tiny_quick.folder)},
                        batch_size=8, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
    rows = {r["path"]: r for r in ds.take_all()}
    assert set(rows) == {str(f) for f in files} and all("bytes" not in r for r in rows.values())
    for name, words in BAD_FILES.items():
        row = rows[str(images / name)]
        assert words in row["error"].lower() and np.isnan(row["embedding"]).all(), row
    for f in good:
        assert rows[str(f)]["error"] == ""
        np.testing.assert_allclose(rows[str(f)]["embedding"], reference[str(f)], atol=EMBED_TOLERANCE, rtol=0)


def test_search_reads_the_output_folder_as_it_reads_an_npz(ray_address, images, tiny_quick, tmp_path, capsys):
    out, npz = tmp_path / "out", tmp_path / "ref.npz"
    model = str(tiny_quick.folder)
    tinyclip_ray.embed_to_folder(sources.image_paths(images / "set2"), out, model)
    assert cli.main(["embed", str(images / "set2"), "--out", str(npz), "--model", model]) == 0
    capsys.readouterr()
    results = []
    for where in (out, npz):
        assert cli.main(["search", "a photo of a cat", "--images", str(where), "--model", model, "--json",
                         "--top", "5"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    from_folder, from_npz = results
    assert [os.path.abspath(r["path"]) for r in from_npz] == [r["path"] for r in from_folder]
    np.testing.assert_allclose([r["score"] for r in from_folder], [r["score"] for r in from_npz],
                               atol=EMBED_TOLERANCE)


def _embedder_pids() -> list[int]:
    """PIDs of Ray worker processes running an ImageEmbedder actor (Ray names them after the class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ImageEmbedder" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_killed_actor_is_restarted_and_nothing_is_lost_or_doubled(ray_address, images, reference, tiny_quick,
                                                                   tmp_path):
    out = tmp_path / "out"
    killed, seen_after = [], set()

    def kill_an_actor(done, total):
        if not killed and done < total:
            pids = _embedder_pids()
            assert pids, "no ImageEmbedder actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        elif killed:
            seen_after.update(_embedder_pids())

    tinyclip_ray.embed_to_folder(sources.image_paths(images), out, str(tiny_quick.folder), batch_size=4,
                                 shard_rows=8, on_progress=kill_an_actor)
    assert killed, "the run ended before an actor could be killed"
    assert seen_after - set(killed), "no new ImageEmbedder process took over after the kill"
    assert_matches_reference(out, images, reference)
    # The actors end with the run, leaving no processes behind (a compile pool inside an actor once
    # hung its exit and outlived the killed one).
    deadline = time.monotonic() + ACTOR_EXIT_TIMEOUT_S
    while _embedder_pids() or _orphans_of_this_python():
        assert time.monotonic() < deadline, f"left running: {_embedder_pids()} {_orphans_of_this_python()}"
        time.sleep(0.2)


def _orphans_of_this_python() -> list[int]:
    """Processes adopted by init (their parent died) running this test's Python: what a killed
    actor's own children would become."""
    orphans = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == 1 and sys.prefix.encode() in cmdline and b"multiprocessing" in cmdline:
                orphans.append(int(entry))
    return orphans


DRIVER = """
import sys, time
import ray, tinyclip.ray
from tinyclip import sources
ray.init(address=sys.argv[1], logging_level="WARNING")
tinyclip.ray.embed_to_folder(sources.image_paths(sys.argv[2]), sys.argv[3], sys.argv[4], batch_size=8,
                             shard_rows=8, on_progress=lambda done, total: time.sleep(0.3))
"""


def test_rerun_after_the_driver_is_killed_embeds_only_what_is_missing(ray_address, images, reference, tiny_quick,
                                                                       tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER), ray_address, str(images), str(out),
                               str(tiny_quick.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(list(out.glob("part-*.parquet"))) < 3:
        assert driver.poll() is None, f"the driver ended early: {driver.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the driver wrote no shards in time"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stderr.close()
    first_run = rows_by_path(out)
    assert 0 < len(first_run) < N_IMAGES + len(BAD_FILES)
    assert not shards.read_manifest(out)["complete"]
    # a shard the killed driver was writing: under its temporary name, it must not count
    (out / f"{shards.TMP_PREFIX}part-half-written.parquet").write_bytes(b"PAR1 and then nothing")

    redone = []
    tinyclip_ray.embed_to_folder(sources.image_paths(images), out, str(tiny_quick.folder),
                                 on_progress=lambda done, total: redone.append(total))
    assert redone[-1] == N_IMAGES + len(BAD_FILES) - len(first_run)
    assert_matches_reference(out, images, reference)
    assert not list(out.glob(shards.TMP_PREFIX + "*"))
    assert shards.read_manifest(out)["complete"]


def test_another_model_or_dtype_in_the_folder_is_refused(images, tiny_quick, tmp_path, capsys):
    model = str(tiny_quick.folder)
    other = shards.manifest_for({"hub_id": "someone/other-clip", "revision": None, "folder": "/elsewhere",
                                 "fingerprint": "0" * 32}, "float32", tiny_quick.config.projection_dim, False)
    shards.ShardWriter(tmp_path / "other-model", other)
    assert cli.main(["embed", str(images), "--out", str(tmp_path / "other-model"), "--engine", "ray",
                     "--model", model]) == 1
    err = capsys.readouterr().err
    assert "someone/other-clip" in err and "another --out" in err and len(err.strip().splitlines()) == 1

    same_model_half = shards.ShardWriter(tmp_path / "half", other).manifest
    same_model_half["model"] = identity.of_checkpoint(tiny_quick.folder)
    same_model_half["dtype"] = "float16"
    shards.write_json(tmp_path / "half" / shards.MANIFEST, same_model_half)
    with pytest.raises(shards.OutputFolderError, match="dtype 'float16'.*'float32'"):
        tinyclip_ray.embed_to_folder([str(images / "set1" / "img001.png")], tmp_path / "half", model)


def test_without_ray_the_engine_says_how_to_install_it(images, tmp_path):
    script = ("import sys; sys.modules['ray'] = None\n"      # as if Ray were not installed
              "from tinyclip import cli\n"
              f"sys.exit(cli.main(['embed', {str(images)!r}, '--out', {str(tmp_path / 'out')!r}, '--engine', 'ray']))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["tinyclip: error: Ray is not installed; for --engine ray and "
                                               "tinyclip.ray run: pip install 'tinyclip[ray]'"]


def test_ray_options_need_the_ray_engine(images, tmp_path, capsys):
    assert cli.main(["embed", str(images), "--out", str(tmp_path / "x.npz"), "--workers", "2"]) == 1
    assert "--workers works with --engine ray only" in capsys.readouterr().err


def test_more_workers_than_the_cluster_holds_is_refused(ray_address, images, tiny_quick, tmp_path, capsys):
    # two CPUs: two encoding actors would leave none for decoding, and Ray would wait forever
    assert cli.main(["embed", str(images), "--out", str(tmp_path / "out"), "--engine", "ray", "--workers", "2",
                     "--address", ray_address, "--model", str(tiny_quick.folder)]) == 1
    assert "--workers 2: each worker takes a CPU and decoding needs 1 more, the Ray cluster has 2 CPUs; use " \
           "--workers 1" in capsys.readouterr().err
