"""Trust, identity and output safety (issue 22).

No file another user could have written is read as code (tinygrad's kernel cache, tinyclip's own
caches), no write goes through a link planted in a shared folder, no FIFO hangs a read, no results
of one model are served for another, and nothing printed drives the terminal. Where an attacker is
needed, the file is given to the user `nobody` (uid 65534), which only root can do: those tests skip
otherwise.
"""
import io
import json
import os
import pickle
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tinyclip
from tinyclip import atomic, identity, trust
from tinyclip.cli import npz as cli_npz
from tinyclip.cli import terminal
from tinyclip.errors import CheckpointNotFoundError, ConfigError, TokenizerError, UnsafeFileError, UsageError
from tinyclip.label_store import LabelStore, LabelStoreWarning

DEVICE = "cpu"
NOBODY = 65534
FIFO_TIMEOUT_S = 20        # a read that waits on a FIFO this long is hung
as_root = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                             reason="giving a file to another user (nobody) needs root")


def _cli(*args, env=None, cwd=None):
    """The real `tinyclip` command in a fresh process (python -m tinyclip)."""
    return subprocess.run([sys.executable, "-m", "tinyclip", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


class _Payload:
    """Unpickling it creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- 1. tinygrad's kernel cache ------------------------------------------------------------------------

@as_root
@pytest.mark.slow
def test_a_kernel_cache_of_another_user_never_runs_through_the_cli(tmp_path):
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    db, marker = folder / "cache.db", tmp_path / "payload-ran"
    env = {k: v for k, v in os.environ.items() if k != "CACHELEVEL"}
    env["CACHEDB"] = str(db)
    first = _cli("backends", env=env)      # fills the cache with the kernels a command really asks for
    assert first.returncode == 0, first.stderr
    con = sqlite3.connect(db)
    tables = [name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables, "the command compiled nothing into the cache: the test would prove nothing"
    for table in tables:        # every cached value becomes the payload
        con.execute(f"UPDATE '{table}' SET val = ?", (pickle.dumps(_Payload(marker)),))
    con.commit()
    table, key = tables[0], con.execute(f"SELECT key FROM '{tables[0]}'").fetchone()[0]
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    # The control: read as tinygrad reads it, the poisoned entry runs the payload.
    control = subprocess.run([sys.executable, "-c", "import sys; from tinygrad.helpers import diskcache_get; "
                              "diskcache_get(sys.argv[1].rsplit('_', 1)[0], sys.argv[2])", table, key],
                             env=env, capture_output=True, text=True, timeout=120)
    assert marker.exists(), f"the payload did not run when read directly: {control.stderr[-500:]}"
    marker.unlink()

    for f in folder.iterdir():
        os.chown(f, NOBODY, -1)
    run = _cli("backends", env=env)
    assert not marker.exists(), "tinygrad's kernel cache of another user was unpickled"
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "kernel cache" in line]
    assert len(warnings) == 1 and f"owned by uid {NOBODY}" in warnings[0] and "CACHEDB" in warnings[0], run.stderr
    assert "* the default" in run.stdout      # the backends still run, compiling afresh


@pytest.mark.parametrize("plant", ["folder writable by others", "a FIFO", "a link to a FIFO"])
def test_an_unsafe_kernel_cache_is_switched_off(tmp_path, monkeypatch, plant):
    from tinygrad import helpers
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    db = folder / "cache.db"
    if plant == "folder writable by others":
        db.write_bytes(b"")
        os.chmod(db, 0o600)
        os.chmod(folder, 0o777)
    elif plant == "a FIFO":
        os.mkfifo(db)
    else:
        os.mkfifo(tmp_path / "fifo")
        db.symlink_to(tmp_path / "fifo")
    monkeypatch.setattr(helpers, "CACHEDB", str(db))
    why = trust.kernel_cache_problem()
    assert why is not None and str(db if plant != "folder writable by others" else folder) in why


@as_root
def test_a_kernel_cache_of_another_user_is_refused(tmp_path, monkeypatch):
    from tinygrad import helpers
    db = tmp_path / "cache.db"
    db.write_bytes(b"")
    os.chown(db, NOBODY, -1)
    monkeypatch.setattr(helpers, "CACHEDB", str(db))
    assert f"owned by uid {NOBODY}" in trust.kernel_cache_problem()


def test_the_guard_switches_the_cache_off_before_tinygrad_is_imported(tmp_path):
    """In a fresh process: the guard sets CACHELEVEL=0 in the environment, which tinygrad reads when it
    is imported, and says so in one warning."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    code = ("import warnings, sys; warnings.simplefilter('always')\n"
            "from tinyclip import trust; trust.guard_kernel_cache(); trust.guard_kernel_cache()\n"
            "assert 'tinygrad' not in sys.modules\n"
            "from tinygrad.helpers import CACHELEVEL; print(CACHELEVEL.value)")
    env = {k: v for k, v in os.environ.items() if k != "CACHELEVEL"}
    run = subprocess.run([sys.executable, "-c", code], env=dict(env, CACHEDB=str(folder / "cache.db")),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "0"
    assert run.stderr.count("kernel cache") == 1 and "writable by group or others" in run.stderr


def test_an_unwritable_home_names_the_cache_folder_not_the_backends(tmp_path):
    """A read-only home (here: a home under a file, which even root cannot write): the command runs,
    with one warning naming the cache folder, CACHEDB and TINYCLIP_CACHE_DIR."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("CACHEDB", "CACHELEVEL", "XDG_CACHE_HOME",
                                                              "TINYCLIP_CACHE_DIR")}
    env["HOME"] = str(blocker / "home")
    run = _cli("backends", env=env)
    assert run.returncode == 0, run.stderr
    assert "no backend is available" not in run.stdout + run.stderr
    warning = [line for line in run.stderr.splitlines() if line.startswith("tinyclip: warning:")]
    assert len(warning) == 1, run.stderr
    assert f"{blocker}/home/.cache/tinygrad" in warning[0] and "CACHEDB" in warning[0]
    assert "TINYCLIP_CACHE_DIR" in warning[0]


# ---- 2. one atomic writer: no write through a planted link ----------------------------------------------

@pytest.fixture
def planted(tmp_path, monkeypatch):
    """plant(target): symbolic links to a victim file at every temporary name a write of `target` may
    use (the random one the writer will draw first, and the pid-based names of older writers).
    Returns the victim, whose content must never change."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    draws = iter(["planted0000", "free00000000"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(draws))

    def plant(target, prefixes=(".",)):
        target = os.fspath(target)
        folder, name = os.path.split(target)
        for prefix in prefixes:
            for tmp in (f"{prefix}{name}.planted0000.tmp", f"{prefix}{name}.{os.getpid()}.tmp",
                        f"{prefix}{name}.{os.getpid()}", f"{prefix}{name}"):
                link = os.path.join(folder, tmp)
                if not os.path.lexists(link):
                    os.symlink(victim, link)
        return victim
    return plant


def test_atomic_write_never_follows_a_planted_link_and_leaves_nothing(tmp_path, planted):
    target = tmp_path / "out.bin"
    victim = planted(target)
    atomic.write_atomic(target, lambda f: f.write(b"data"), private=False)
    assert victim.read_text() == "precious" and target.read_bytes() == b"data"
    assert not any(p.name.startswith(".out.bin.free") for p in tmp_path.iterdir())
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_npz_output_never_follows_a_planted_link(tmp_path, planted):
    out = tmp_path / "gallery.npz"
    victim = planted(out)
    cli_npz.save(out, embeddings=np.ones((1, 4), np.float32))
    assert victim.read_text() == "precious"
    with np.load(out) as data:
        assert data["embeddings"].shape == (1, 4)


def test_the_label_store_never_follows_a_planted_link(tmp_path, planted):
    store = LabelStore(tmp_path / "labels")
    store.folder.mkdir(mode=0o700)
    key = ("f" * 32, "float32", ("a photo of a {}.",))
    victim = planted(store.path(key))
    assert store.save(key, {"cat": np.ones(4, np.float32)}) == store.path(key)
    assert victim.read_text() == "precious"
    assert list(store.load(key)) == ["cat"]


def test_shards_never_follow_a_planted_link(tmp_path, planted):
    pytest.importorskip("pyarrow")
    from tinyclip import shards
    path = tmp_path / "manifest.json"
    victim = planted(path, prefixes=(shards.TMP_PREFIX,))
    shards.write_json(path, {"complete": False})
    assert victim.read_text() == "precious" and json.loads(path.read_text()) == {"complete": False}


def test_caches_are_not_written_into_a_folder_others_may_write(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(UnsafeFileError, match="writable by group or others"):
        atomic.write_atomic(folder / "x", lambda f: f.write(b"x"))
    key = ("f" * 32, "float32", ("{}",))
    with pytest.warns(LabelStoreWarning, match="label embeddings not stored .*writable by group or others"):
        assert LabelStore(folder).save(key, {"cat": np.ones(4, np.float32)}) is None
    assert list(folder.iterdir()) == []


# ---- 17. a full disk leaves no temporary file -----------------------------------------------------------

FULL_DISK = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from tinyclip.kernels.cpu import tuning
from tinyclip.kernels.cpu.isa import ISAS
tuning._write(sys.argv[1], ISAS[0], 2, {"tile_rows": 4, "rows_outer": True, "handoff_us": 1.0, "macs_per_us": 1.0})
from tinyclip.label_store import LabelStore
import numpy as np, warnings
warnings.simplefilter("ignore")
LabelStore(os.path.join(sys.argv[1], "labels")).save(("f" * 32, "float32", ("{}",)), {"cat": np.ones(4, np.float32)})
"""


def test_a_full_disk_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(folder)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    left = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    assert left == [], f"files left behind by writes that failed: {left}"


# ---- 3. a FIFO at a cache file's name -------------------------------------------------------------------

def _finishes(fn, path):
    """Run fn() in a thread; if it is stuck opening the FIFO at `path`, unblock it (open the other end)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(FIFO_TIMEOUT_S)
    hung = thread.is_alive()
    if hung:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join()
    return not hung, result.get("value")


def test_a_fifo_in_the_label_store_is_never_opened(tmp_path):
    store = LabelStore(tmp_path)
    key = ("f" * 32, "float32", ("{}",))
    os.mkfifo(store.path(key))
    with pytest.warns(LabelStoreWarning, match="not a regular file"):
        done, value = _finishes(lambda: store.load(key), store.path(key))
    assert done and value == {}


def test_read_trusted_refuses_what_is_not_a_plain_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"ok")
    os.chmod(tmp_path / "file", 0o600)
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with pytest.raises(UnsafeFileError, match="a FIFO"):
        trust.read_trusted(tmp_path / "fifo")
    with pytest.raises(UnsafeFileError, match="a symbolic link"):
        trust.read_trusted(tmp_path / "link")
    assert trust.read_trusted(tmp_path / "file") == b"ok"
    with pytest.raises(FileNotFoundError):
        trust.read_trusted(tmp_path / "absent")


def test_a_fifo_in_the_graph_cache_is_never_opened(tmp_path):
    from tinyclip.graph_cache import read_graph_header
    os.mkfifo(tmp_path / "x.graph")
    done, value = _finishes(lambda: read_graph_header(tmp_path / "x.graph"), tmp_path / "x.graph")
    assert done and value is None


# ---- 4, 5. identity: every weight byte, the tokenizer and the preprocessing --------------------------------

def _copy(checkpoint, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(checkpoint.folder, folder)
    return folder


def _fingerprint(folder):
    return identity.of_checkpoint(folder)["fingerprint"]


def test_a_fine_tune_of_the_projections_alone_is_another_model(tiny_quick, tmp_path):
    folder = _copy(tiny_quick, tmp_path, "projections-tuned")
    weights = load_file(folder / "model.safetensors")
    for key in ("text_projection.weight", "visual_projection.weight"):
        weights[key] = weights[key] * np.float32(1.01)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert _fingerprint(folder) != _fingerprint(tiny_quick.folder)


def test_one_changed_weight_anywhere_is_another_model(tiny_quick, tmp_path):
    """A value between the places a sampled fingerprint would read."""
    folder = _copy(tiny_quick, tmp_path, "one-value")
    weights = load_file(folder / "model.safetensors")
    table = weights["text_model.embeddings.token_embedding.weight"]
    table[len(table) * 3 // 32 + 7, 5] += np.float32(0.5)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert _fingerprint(folder) != _fingerprint(tiny_quick.folder)


@pytest.mark.parametrize("change", ["vocab.json", "merges.txt", "preprocessor_config.json"])
def test_the_tokenizer_and_the_preprocessing_are_part_of_the_identity(tiny_quick, tmp_path, change):
    folder = _copy(tiny_quick, tmp_path, "changed")
    path = folder / change
    if change == "vocab.json":
        vocab = json.loads(path.read_text(encoding="utf-8"))
        vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
        path.write_text(json.dumps(vocab), encoding="utf-8")
    elif change == "merges.txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        lines[5], lines[6] = lines[6], lines[5]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        config = json.loads(path.read_text())
        config["image_mean"] = [0.5, 0.5, 0.5]
        path.write_text(json.dumps(config))
    assert _fingerprint(folder) != _fingerprint(tiny_quick.folder)


def test_a_swapped_vocabulary_misses_the_label_cache(tiny_quick, tmp_path, monkeypatch):
    """classify() of a checkpoint whose tokenizer changed encodes the labels afresh, with the new ids."""
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "cache"))
    from tinyclip import label_store, tasks
    first = tinyclip.load(tiny_quick.folder, device=DEVICE)
    labels = ["cat", "dog"]
    original = tasks.label_embeddings(first, labels, None, store=label_store.default())
    folder = _copy(tiny_quick, tmp_path, "swapped")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    swapped = tinyclip.load(folder, device=DEVICE)
    got = tasks.label_embeddings(swapped, labels, None, store=label_store.default())
    np.testing.assert_allclose(got, original[::-1], rtol=0, atol=1e-6)   # the swap shows: no stale answer


def test_search_refuses_embeddings_of_a_projection_fine_tune(tiny_quick, tmp_path, capsys):
    from tinyclip import cli
    folder = _copy(tiny_quick, tmp_path, "tuned")
    weights = load_file(folder / "model.safetensors")
    weights["visual_projection.weight"] = weights["visual_projection.weight"] * np.float32(1.01)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    gallery = tmp_path / "gallery.npz"
    dim = tiny_quick.config.projection_dim
    cli_npz.save(gallery, embeddings=np.ones((1, dim), np.float32), paths=np.array(["x.png"]),
                 root=np.array(str(tmp_path)), **cli_npz.header(identity.of_checkpoint(tiny_quick.folder),
                                                                "float32", False, dim))
    code = cli.main(["search", "cat", "--images", str(gallery), "--model", str(folder), "--device", DEVICE])
    err = capsys.readouterr().err
    assert code == 1 and "embedded with" in err and "--allow-other-model" in err, err


def test_file_digests_are_cached_and_follow_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3 * identity.CHUNK_BYTES // 2))
    first = identity.files_digests([path])
    cache = tmp_path / "cache" / identity.DIGEST_CACHE
    assert cache.is_file() and (cache.stat().st_mode & 0o777) == 0o600
    calls = []
    monkeypatch.setattr(identity, "file_digest", lambda *a: calls.append(a) or "x")
    assert identity.files_digests([path]) == first and calls == []     # unchanged: not read again
    with open(path, "r+b") as f:
        f.seek(identity.CHUNK_BYTES + 3)
        f.write(b"!")
    monkeypatch.undo()
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "cache"))
    assert identity.files_digests([path]) != first


# ---- 6. vocab_size smaller than the tokenizer's ids -------------------------------------------------------

def test_a_vocabulary_larger_than_the_embedding_table_is_refused_before_any_text_runs(tiny_quick, tmp_path):
    folder = _copy(tiny_quick, tmp_path, "small-vocab")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    key = "text_model.embeddings.token_embedding.weight"
    weights[key] = np.ascontiguousarray(weights[key][:1000])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = tinyclip.load(folder, device=DEVICE)    # the tokenizer is read, and checked, on first use
    with pytest.raises(TokenizerError) as e:
        model.encode_text(["a photo"])
    message = str(e.value)
    assert "\n" not in message and "vocab_size 1000" in message and "49407" in message
    assert str(folder / "config.json") in message and str(folder / "vocab.json") in message


# ---- 12, 14. embeddings files, configs, revisions ------------------------------------------------------

def _gallery(tmp_path, embeddings, paths=("a.png", "b.png", "c.png")):
    path = tmp_path / "gallery.npz"
    np.savez(path, embeddings=embeddings, paths=np.array(list(paths)), root=np.array(str(tmp_path)),
             model_identity=np.array(json.dumps({"fingerprint": "0" * 32})), dtype=np.array("float32"),
             normalized=np.array(False), projection_dim=np.array(4), format=np.array(2))
    return path


def test_a_nan_row_in_an_embeddings_file_is_refused_naming_it(tmp_path):
    rows = np.ones((3, 4), np.float32)
    rows[1, 2] = np.nan
    with pytest.raises(UsageError, match=r"row 1 \(b\.png\) holds NaN or infinity"):
        cli_npz.read_image_embeddings(str(_gallery(tmp_path, rows)))


def test_string_embeddings_are_refused(tmp_path):
    with pytest.raises(UsageError, match="its embeddings are <U1 values, not numbers"):
        cli_npz.read_image_embeddings(str(_gallery(tmp_path, np.array([["a"] * 4] * 3))))


def test_a_label_file_of_another_width_is_encoded_again(tmp_path):
    store = LabelStore(tmp_path)
    key = ("f" * 32, "float32", ("{}",))
    store.save(key, {"cat": np.ones(8, np.float32)})
    with pytest.warns(LabelStoreWarning, match="its embeddings are 8 wide, this model's are 4"):
        assert store.load(key, dim=4) == {}


@pytest.mark.parametrize("settings, fragment", [
    ({"crop_size": {"height": 20, "width": 20}}, r"gives 20x20 images \(crop_size\), but the model takes 30x30"),
    ({"crop_size": {"height": 10**6, "width": 10**6}}, "gives 1000000x1000000 images"),
    ({"crop_size": {"height": 10**6, "width": 10**6}, "do_pad": True, "pad_size": {"height": 30, "width": 30}},
     "crop_size 1000000x1000000 is larger than the 30x30 images"),
])
def test_a_crop_of_another_size_than_the_model_is_one_line_at_load(tiny_quick, tmp_path, settings, fragment):
    folder = _copy(tiny_quick, tmp_path, "crop")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update(settings)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=fragment) as e:
        tinyclip.load(folder, device=DEVICE)
    assert "\n" not in str(e.value)


def test_images_of_another_size_without_a_crop_are_one_line(tiny_quick, tmp_path):
    from tinyclip.errors import ImageError
    folder = _copy(tiny_quick, tmp_path, "no-crop")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["do_center_crop"] = False
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    model = tinyclip.load(folder, device=DEVICE)
    with pytest.raises(ImageError, match="images are 36x30 after preprocessing; this checkpoint takes 30x30"):
        model.encode_image([np.zeros((50, 60, 3), np.uint8)])


def test_an_overflowing_open_clip_mlp_ratio_is_a_config_error():
    from tinyclip.checkpoints.open_clip import config as openclip
    with pytest.raises(ConfigError, match="mlp_ratio 1e\\+308 makes an MLP"):
        openclip._mlp_width({"mlp_ratio": 1e308}, 48, "open_clip_config.json", "vision_cfg")


@pytest.mark.parametrize("revision", ["../../..", "../snapshots/abc", "/etc", "main\n"])
def test_a_revision_that_is_a_path_is_refused(tiny_quick, tmp_path, revision):
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    shutil.copytree(tiny_quick.folder, repo / "snapshots" / "abc")
    with pytest.raises(CheckpointNotFoundError, match="is not a branch, tag or commit name"):
        tinyclip.load("org/name", revision=revision, cache_dir=tmp_path / "hub", local_files_only=True, device=DEVICE)


# ---- 15. nothing printed drives the terminal -------------------------------------------------------------

def test_search_prints_hostile_paths_escaped_on_a_strict_utf8_stdout(tiny_quick, tmp_path):
    dim = tiny_quick.config.projection_dim
    hostile = ["\x1b]0;owned\x07title.png", "caf\udce9.png", "\u202egnp.exe", "two\nlines.png"]
    gallery = tmp_path / "gallery.npz"
    rows = np.random.default_rng(0).standard_normal((len(hostile), dim)).astype(np.float32)
    cli_npz.save(gallery, embeddings=rows, paths=np.array(hostile), root=np.array(str(tmp_path)),
                 **cli_npz.header(identity.of_checkpoint(tiny_quick.folder), "float32", False, dim))
    run = _cli("search", "cat", "--images", gallery, "--model", tiny_quick.folder, "--device", DEVICE,
               "--top", len(hostile), env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not any(c in run.stdout for c in "\x1b\x07\u202e\r"), run.stdout
    assert "\\x1b]0;owned\\x07title.png" in run.stdout and "caf\\xe9.png" in run.stdout
    assert "\\u202egnp.exe" in run.stdout and "two\\x0alines.png" in run.stdout
    assert len(run.stdout.splitlines()) == 1 + len(hostile)


def test_json_output_escapes_what_would_drive_a_terminal_and_round_trips():
    hostile = ["\x1b]0;owned\x07title.png", "caf\udce9.png", "\u202egnp.exe", "two\nlines.png", "naïve"]
    text = terminal.json_text([{"path": p} for p in hostile])
    assert not any(c in text for c in "\x1b\x07\u202e\udce9") and "naïve" in text
    text.encode("utf-8")      # no lone surrogate left
    assert [r["path"] for r in json.loads(text)] == hostile


def test_say_never_fails_on_a_strict_stream():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    terminal.say("caf\u00e9 \udcff \x1b[2J", file=stream)
    stream.flush()
    assert raw.getvalue() == b"caf\\xe9 \\xff \\x1b[2J\n"
    assert terminal.shown("a\tb\nc") == "a\\x09b\\x0ac"


# ---- 16. a long text costs what its row holds -------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    from tests.bpe import write_clip_vocab
    folder = tmp_path_factory.mktemp("vocab")
    write_clip_vocab(folder)
    return folder


LONG_TEXTS = {
    "sentences": "A photo of a CAT, sitting on a mat. " * 6_000,
    "lines": "Ünïcödé line\twith  TABS\r\n" * 8_000,
    "entities and sigma": "&amp;amp; ΟΔΟΣ ΟΔΟΣ\u0301 <|endoftext|> x" * 5_000,
    "one long word then words": "ab" * 3_000 + " cat" * 50_000,
}
NORMALIZED_CHARS_PER_ROW = 20_000    # characters a row of 77 tokens may need read, with a piece's slack


@pytest.mark.parametrize("name", sorted(LONG_TEXTS))
def test_a_long_text_is_read_only_as_far_as_its_row_and_equals_transformers(vocab_folder, name):
    import transformers
    from tinyclip.tokenizer import CLIPTokenizer
    text = LONG_TEXTS[name]
    ours = CLIPTokenizer.from_pretrained(vocab_folder)
    read = []
    normalize = ours._normalize
    ours._normalize = lambda t: read.append(len(t)) or normalize(t)
    ids = ours(text)
    assert sum(read) <= NORMALIZED_CHARS_PER_ROW, (sum(read), len(text))
    oracle = transformers.CLIPTokenizer(str(vocab_folder / "vocab.json"), str(vocab_folder / "merges.txt"))
    theirs = oracle([text], padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(theirs))
    # encode with a limit still tells that the text is longer than the row
    assert len(ours.encode(text, limit=75)) > 75


def test_pieces_give_the_whole_texts_ids(vocab_folder, monkeypatch):
    """Every cleaning mode (transformers', OpenAI's, open_clip's) gives the same ids read in pieces as
    whole, at every place a cut can fall."""
    from tinyclip import tokenizer as tok
    from tinyclip.checkpoints.open_clip import OpenClipTokenizer
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    texts = ["a < b\n&amp;amp;lt; c\n" * 3, "ΟΔΟΣ\nΣ x\u0301 \u0301y " * 4, "caf\u00c3\u00a9\n  Ã \n" * 5,
             "<|endoftext|> <|ENDOFTEXT|>\t<start_of_text>x\n" * 3]
    made = [tok.CLIPTokenizer.from_pretrained(vocab_folder), tok.CLIPTokenizer.from_pretrained(vocab_folder,
                                                                                              clean="openai"),
            OpenClipTokenizer.from_pretrained(vocab_folder)]
    for t in made:
        whole = {text: t.encode(text) for text in texts}
        for size in (1, 2, 5):
            monkeypatch.setattr(tok, "CHUNK_CHARS", size)
            for text in texts:
                assert t.encode(text) == whole[text], (t.clean, size, text)
        monkeypatch.undo()
