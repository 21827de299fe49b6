"""tinyclip.ray on a real local Ray (a new 2-CPU cluster in this process), against single-process embed.

The oracle is tinyclip's own single-process `tinyclip embed` (itself checked against transformers in
test_cli/test_tasks): the Ray pipeline must give the same embeddings row for row, matched by path,
and, after a driver or an actor is killed part-way, hold every image exactly once.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")     # before Ray is imported: nothing leaves the machine

import numpy as np
import pytest
import ray
from PIL import Image

from tests.conftest import ROOT
from tests.test_shards import flip_a_byte_in_the_embeddings
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
    # address="local": a new cluster, never one that happens to run on the machine already
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
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
    """{path (str): newest row} of an output folder, asserting that no file was embedded twice (a path
    appears again only where an earlier row of it failed and was retried)."""
    rows, embedded = {}, set()
    for r in shards.iter_rows(out):
        key = (r["path"], r["size"], r["mtime"])
        assert r["error"] is not None or key not in embedded, f"{key} embedded more than once"
        if r["error"] is None:
            embedded.add(key)
        rows[os.fsdecode(r["path"])] = r
    return rows


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
        if not killed and 0 < done < total:
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
    embedded = sum(r["error"] is None for r in first_run.values())
    assert not shards.read_manifest(out)["complete"]
    # a shard the killed driver was writing: under its temporary name, it must not count
    (out / f"{shards.TMP_PREFIX}part-half-written.parquet").write_bytes(b"PAR1 and then nothing")

    redone = []
    tinyclip_ray.embed_to_folder(sources.image_paths(images), out, str(tiny_quick.folder),
                                 on_progress=lambda done, total: redone.append(total))
    assert redone[-1] == N_IMAGES + len(BAD_FILES) - embedded        # the files that failed are tried again
    assert_matches_reference(out, images, reference)
    assert not list(out.glob(shards.TMP_PREFIX + "*"))
    assert shards.read_manifest(out)["complete"]


def test_another_model_or_dtype_in_the_folder_is_refused(images, tiny_quick, tmp_path, capsys):
    model = str(tiny_quick.folder)
    other = shards.manifest_for({"hub_id": "someone/other-clip", "revision": None, "folder": "/elsewhere",
                                 "fingerprint": "0" * 32}, "float32", tiny_quick.config.projection_dim, False)
    shards.ShardWriter(tmp_path / "other-model", other).finish()
    assert cli.main(["embed", str(images), "--out", str(tmp_path / "other-model"), "--engine", "ray",
                     "--model", model]) == 1
    err = capsys.readouterr().err
    assert "someone/other-clip" in err and "another --out" in err and len(err.strip().splitlines()) == 1

    same_model_half = shards.ShardWriter(tmp_path / "half", other).finish()
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


def test_more_workers_than_the_cluster_holds_is_refused_in_one_line(ray_address, images, tiny_quick, tmp_path,
                                                                    capsys):
    # two CPUs: two encoding actors would leave none for decoding, and Ray would wait forever
    assert cli.main(["embed", str(images), "--out", str(tmp_path / "out"), "--engine", "ray", "--workers", "2",
                     "--address", ray_address, "--model", str(tiny_quick.folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers 2: each worker takes a CPU and decoding needs 1 more, the Ray cluster has " \
                             "2 CPUs; use --workers 1" in err[0], err
    assert not (tmp_path / "out").exists()       # a run that fails before it writes leaves nothing behind
    # the error names the file that holds Ray's output (and the error's traceback)
    log = err[0].rsplit("(Ray's log: ", 1)[1].rstrip(")")
    assert "UsageError" in pathlib.Path(log).read_text() and pathlib.Path(log).parent.name == "ray-logs"


@pytest.fixture
def few_images(images, tmp_path):
    """Four files: two good images, one under a name that is not UTF-8 (the bytes of img001.png), and
    one that cannot be read yet (garbage of the same size as a good PNG it turns into later)."""
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("set1/img001.png", "set2/img002.jpg"):
        (folder / os.path.basename(name)).write_bytes((images / name).read_bytes())
    odd = os.path.join(os.fsencode(folder), b"caf\xe9-\xff.png")       # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as f:
        f.write((images / "set1" / "img001.png").read_bytes())
    (folder / "flaky.png").write_bytes(b"not yet" * 1000)
    return folder, os.fsdecode(odd)


@pytest.mark.slow
def test_a_rerun_retries_failed_files_and_redoes_a_damaged_shard(ray_address, few_images, images, reference,
                                                                 tiny_quick, tmp_path):
    folder, odd = few_images
    out, model = tmp_path / "out", str(tiny_quick.folder)
    img001, img002, flaky = folder / "img001.png", folder / "img002.jpg", folder / "flaky.png"
    expected = {str(img001): reference[str(images / "set1" / "img001.png")], odd: reference[str(images / "set1" /
                "img001.png")], str(flaky): reference[str(images / "set1" / "img001.png")],
                str(img002): reference[str(images / "set2" / "img002.jpg")]}
    # An earlier run's folder: img001 embedded; flaky.png could not be read (it is garbage now); img002
    # embedded in a shard that a bad sector then damaged. The name that is not UTF-8 is new.
    manifest = shards.manifest_for(identity.of_checkpoint(tiny_quick.folder), "float32",
                                   tiny_quick.config.projection_dim, False)
    writer = shards.ShardWriter(out, manifest)
    keys = [shards.file_key(p) for p in (img001, flaky, img002)]
    dim = tiny_quick.config.projection_dim
    writer.write([k[0] for k in keys[:2]], [k[1] for k in keys[:2]], [k[2] for k in keys[:2]],
                 np.stack([expected[str(img001)], np.zeros(dim)]), [None, "not an image Pillow can read"])
    writer.write([keys[2][0]], [keys[2][1]], [keys[2][2]], expected[str(img002)][None], [None])
    writer.finish()
    flip_a_byte_in_the_embeddings(shards.shard_files(out)[-1])
    # flaky.png becomes readable with the same size and mtime (a network mount that was down): only a
    # retry embeds it
    st = flaky.stat()
    good = (images / "set1" / "img001.png").read_bytes()
    assert len(good) < st.st_size
    flaky.write_bytes(good + b"\0" * (st.st_size - len(good)))
    os.utime(flaky, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shards.file_key(flaky) == keys[1]

    totals = []
    with pytest.warns(shards.DamagedShardWarning):
        tinyclip_ray.embed_to_folder(sources.image_paths(folder), out, model,
                                     on_progress=lambda done, total: totals.append(total))
    assert totals[-1] == 3      # the new name, the file that failed, the damaged shard's image
    assert os.fsencode(odd) in {r["path"] for r in shards.iter_rows(out)}        # the exact bytes of the name
    embeddings, paths, manifest = shards.read_embeddings(out)
    assert (manifest["count"], manifest["errors"]) == (4, 0)
    assert sorted(paths.tolist()) == sorted(expected)
    for path, embedding in zip(paths.tolist(), embeddings):
        np.testing.assert_allclose(embedding, expected[path], atol=EMBED_TOLERANCE, rtol=0, err_msg=path)


HOLD_THE_FOLDER = """
import sys, time
from tinyclip import shards
shards.ShardWriter(sys.argv[1], shards.manifest_for({"fingerprint": "a" * 32}, "float32", 4, False))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_folder_is_refused_in_one_line(images, tiny_quick, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_FOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["embed", str(images), "--out", str(out), "--engine", "ray",
                         "--model", str(tiny_quick.folder)]) == 1
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another run is writing to this folder: pid {holder.pid} on host " \
                             f"{socket.gethostname()}" in err[0], err


@ray.remote(num_cpus=1)
class CPUHolder:
    """Another job's actor, holding one of the cluster's CPUs."""

    def ready(self):
        return True


def test_a_busy_cluster_is_waited_for_then_refused_in_one_line(ray_address, images, tiny_quick, tmp_path, capsys):
    holder = CPUHolder.remote()
    try:
        ray.get(holder.ready.remote())
        assert cli.main(["embed", str(images / "set1"), "--out", str(tmp_path / "out"), "--engine", "ray",
                         "--address", ray_address, "--model", str(tiny_quick.folder), "--wait", "1"]) == 1
    finally:
        ray.kill(holder)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("tinyclip: warning: the Ray cluster is busy (1 of 2 CPUs free, 2 needed); waiting up "
                             "to 1 s"), err
    assert err[-1].startswith("tinyclip: error: the Ray cluster is busy: 1 of 2 CPUs free, 2 needed after waiting "
                              "1 s"), err
    assert not (tmp_path / "out").exists()


def test_a_busy_cluster_is_waited_for_until_it_frees(ray_address):
    holder = CPUHolder.remote()
    ray.get(holder.ready.remote())
    timer = threading.Timer(1.0, ray.kill, (holder,))
    timer.start()
    try:
        with pytest.warns(UserWarning, match=r"the Ray cluster is busy \(1 of 2 CPUs free, 2 needed\); waiting up to"):
            tinyclip_ray._check_room(1, 0, wait_s=STARTUP_TIMEOUT_S)     # returns once the holder is gone
    finally:
        timer.join()
    assert ray.available_resources().get("CPU", 0) >= 2


def run_in_a_terminal(argv, env, timeout) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its stdout and stderr; (exit code, all it printed)."""
    import pty
    import select
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd, env=env)
    os.close(child_fd)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"{argv} still running after {timeout} s: {output.decode()[-2000:]}"
            ready, _, _ = select.select([main_fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:      # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                output += chunk
    finally:
        proc.kill() if proc.poll() is None else None
        os.close(main_fd)
    return proc.wait(), output.decode(errors="replace")


def terminal_lines(printed: str) -> list[str]:
    """What a terminal shows, line by line: redraws (carriage returns) as lines, escape sequences dropped."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", printed).replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_without_address_a_private_ray_starts_even_beside_a_running_cluster(few_images, tiny_quick, tmp_path):
    """`ray start --head` (1 CPU) runs on the machine, findable as the machine's current cluster; embed
    without --address must start its own Ray (2 CPUs), not join it, and show a progress bar, not Ray's logs."""
    # RAY_TMPDIR: the head and its ray_current_cluster file stay in this test (short: Ray's socket paths)
    ray_tmp = pathlib.Path(tempfile.mkdtemp(prefix="tc-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), TINYCLIP_CACHE_DIR=str(tmp_path / "cache"), RAY_USAGE_STATS_ENABLED="0")
    env.pop("TINYCLIP_PROGRESS", None)
    with socket.socket() as s:         # a free port, not Ray's default 6379 that another head may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--num-cpus",
                             "1", "--port", str(port), "--include-dashboard", "false", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "head.log", "wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (ray_tmp / "ray" / "ray_current_cluster").exists():
            assert head.poll() is None and time.monotonic() < deadline, \
                f"ray start --head did not come up: {(tmp_path / 'head.log').read_text()[-2000:]}"
            time.sleep(0.2)
        embed = [sys.executable, "-m", "tinyclip", "embed", str(few_images[0] / "img001.png"),
                 str(few_images[0] / "img002.jpg"), "--model", str(tiny_quick.folder), "--engine", "ray"]
        # on that 1-CPU cluster, --workers 1 would not fit (a worker and decoding need 2)
        code, printed = run_in_a_terminal(embed + ["--out", str(tmp_path / "out")], env, STARTUP_TIMEOUT_S)
        assert code == 0, printed
        lines = terminal_lines(printed)
        assert any(line.startswith("images [") and "2/2" in line for line in lines), printed      # the bar
        assert lines[-1].endswith("2 images x 24 float32 embeddings"), printed
        strays = [line for line in lines if not line.startswith("images")][:-1]
        assert not strays, strays          # no core_worker.cc, no INFO or WARNING lines of Ray's
        assert len(shards.read_embeddings(tmp_path / "out")[1]) == 2
        assert len(list((tmp_path / "cache" / "ray-logs").glob("*.log"))) == 1      # where Ray's lines went
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)     # the head and the processes it started (its session)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
