"""A new user's second hour (issue 25): the command line does what they meant, checks before it
works, and never shows a library's internals.

Every check runs the real command in a subprocess (`python -m tinyclip`, validate.py, `python -m
tinyclip` from the folder above a clone). Most fail before the model loads and take a second or
two; the rest share the tiny-quick checkpoint, the module's folder of images and the session's
graph cache with tests/test_cli.py.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.terminal import run_on_a_terminal
from tests.test_cli import BAD, GOOD, assert_ok, assert_one_line_error, work  # noqa: F401  (work: a fixture)
from tests.test_cli import tinyclip as run_cli
from tinyclip import identity, label_store

NO_MODEL = "/no/such/model-folder"     # an error about it would mean the model was being loaded
LONG_WORDS = 90                        # words in a text longer than the 77-token context


def warnings_of(run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("tinyclip: warning: ")]


# ---- fail early, or skip and go on ------------------------------------------------------------------

def test_classify_skips_an_unreadable_image_with_a_warning_and_goes_on(tiny_quick, work):
    run = run_cli(work, "classify", GOOD[0], BAD[0], GOOD[1], "--labels", "cat", "dog", "--templates", "none",
                  "--json", model=tiny_quick.folder)
    assert_ok(run)
    assert [r["image"] for r in json.loads(run.stdout)] == [GOOD[0], GOOD[1]]
    (warning,) = warnings_of(run)
    assert warning.startswith(f"tinyclip: warning: {BAD[0]}: ") and warning.endswith("; skipped")


def test_classify_fails_only_when_no_image_could_be_read_and_shows_pillows_warning_once(tiny_quick, work, tmp_path):
    # chelsea.png has 451 x 300 = 135,300 pixels: over 100,000, under twice that, where Pillow warns and tinyclip refuses
    for name in ("a.png", "b.png"):
        shutil.copy(work / GOOD[2], tmp_path / name)
    run = run_cli(tmp_path, "classify", "a.png", "b.png", "--labels", "cat", "dog", "--templates", "none",
                  "--max-pixels", "100000", model=tiny_quick.folder)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == \
        "tinyclip: error: none of the 2 images could be read (see the warnings); nothing classified"
    pillow = [w for w in warnings_of(run) if "decompression bomb DOS attack" in w]
    ours = [w for w in warnings_of(run) if "over Pillow's decompression-bomb limit" in w]
    assert len(pillow) == 1 and len(ours) == 2 and "--max-pixels 135300" in ours[0], run.stderr


@pytest.mark.parametrize("out, fragment", [
    ("taken.npz", "--out taken.npz: the file exists; pass --overwrite to replace it"),
    ("folder.npz", "--out folder.npz: is a folder; give the name of an .npz file"),
    ("no-such-folder/e.npz", "--out no-such-folder/e.npz: the folder no-such-folder does not exist"),
    ("/proc/e.npz", "--out /proc/e.npz: cannot create files in /proc"),
])
def test_embed_checks_out_before_loading_the_model(tmp_path, out, fragment):
    shutil.copy(ROOT / "tests" / "data" / "images" / "horse.png", tmp_path / "horse.png")
    (tmp_path / "taken.npz").write_bytes(b"earlier work")
    (tmp_path / "folder.npz").mkdir()
    run = run_cli(tmp_path, "embed", "horse.png", "--out", out, "--model", NO_MODEL)
    assert_one_line_error(run, fragment)
    assert (tmp_path / "taken.npz").read_bytes() == b"earlier work"


@pytest.fixture(scope="module")
def moved(tiny_quick, work, tmp_path_factory):
    """embed (one file named three ways) into album/album.npz, then album/ moved elsewhere: (run, new folder)."""
    album = tmp_path_factory.mktemp("album") / "album"
    shutil.copytree(work / "gallery", album)
    (album / "album.npz").write_bytes(b"an older file")
    run = run_cli(album.parent, "embed", "album/a/chelsea.png", "album", "./album/a", "--out", "album/album.npz",
                  "--overwrite", model=tiny_quick.folder)
    assert_ok(run)
    moved_to = tmp_path_factory.mktemp("moved") / "pictures"
    shutil.move(album, moved_to)
    return run, moved_to


def test_embed_embeds_a_file_reached_twice_once(moved):
    run, folder = moved
    with np.load(folder / "album.npz", allow_pickle=False) as data:
        paths = list(data["paths"])
    assert len(paths) == len(set(paths)) == len(GOOD), paths
    assert paths[0] == "a/chelsea.png" and all(not os.path.isabs(p) for p in paths), "relative to the .npz's folder"
    assert f"wrote {len(GOOD)} images" in run.stdout


def test_search_without_model_uses_the_recorded_one_and_finds_moved_files(tiny_quick, moved):
    _, folder = moved
    run = run_cli(folder.parent, "search", "a cat", "--images", "pictures/album.npz", "--json", "--top", "3",
                  "--device", "cpu", "--batch-size", "3")
    assert_ok(run)
    assert f"tinyclip: using {tiny_quick.folder}, the model pictures/album.npz was embedded with" in run.stderr
    results = json.loads(run.stdout)
    assert len(results) == 3 and all((folder.parent / r["path"]).is_file() for r in results), results
    assert warnings_of(run) == []


def test_search_warns_when_the_files_are_gone(tiny_quick, moved, tmp_path):
    _, folder = moved
    shutil.copy(folder / "album.npz", tmp_path / "alone.npz")     # the .npz without its images
    run = run_cli(tmp_path, "search", "a cat", "--images", "alone.npz", "--top", "2", model=tiny_quick.folder)
    assert_ok(run)
    (warning,) = warnings_of(run)
    assert "2 of the 2 results are no longer where the embeddings say" in warning


def test_search_refuses_when_the_recorded_model_is_not_here(work, tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, embeddings=np.ones((1, 24), np.float32), paths=np.array(["x.png"]), root=np.array(str(tmp_path)),
             model_identity=np.array(json.dumps({"hub_id": None, "revision": None, "folder": NO_MODEL,
                                                 "fingerprint": "0" * 32})),
             dtype=np.array("float32"), normalized=np.array(False), projection_dim=np.array(24), format=np.array(3))
    run = run_cli(work, "search", "a cat", "--images", path, "--device", "cpu")
    assert_one_line_error(run, f"--images {path}: the model it was embedded with is not here ({NO_MODEL}: no such "
                               "folder")
    assert run.stderr.rstrip().endswith("pass --model")


# ---- say what is meant, not what was typed ----------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["search", "gallery/horsee", "--images", "gallery"], "QUERY gallery/horsee contains / like a path (no such file), "
                                                          "so it looks like an image path, not a text; to search for "
                                                          "these words as text, add --text"),
    (["search", "gallery", "--images", "gallery"], "QUERY gallery is a folder, so it looks like an image path"),
    (["classify", GOOD[0], "--labels", "cat", "gallery/chelsa.png"],
     "--labels took gallery/chelsa.png, which contains / like a path (no such file): put the images before --labels"),
    (["classify", GOOD[0], "--labels", "cat", " "], "label 2 of 2 is empty"),
])
def test_words_that_look_like_paths_are_not_taken_as_texts(work, args, fragment):
    run = run_cli(work, *args, "--model", NO_MODEL)
    assert_one_line_error(run, fragment)


def test_labels_file_with_a_bom_and_one_label(tiny_quick, work, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\ufeffcat\r\n".encode("utf-8"))     # as Notepad saves it
    run = run_cli(work, "classify", GOOD[0], "--labels-file", labels, "--templates", "none", "--json",
                  model=tiny_quick.folder)
    assert_ok(run)
    assert json.loads(run.stdout) == [{"image": GOOD[0], "scores": {"cat": 1.0}}]
    (warning,) = warnings_of(run)
    assert "one label ('cat'): probabilities are over the labels given, so every image gets 100%" in warning


def test_a_cut_label_warns_when_it_comes_from_the_label_cache(tiny_quick, work, tmp_path):
    """A run served from the disk cache encodes no text and still says the label was cut; a file written
    before the lengths were stored is read, its lengths counted. (A template of this test's own keys the
    stored file, which holds made-up embeddings: no other test reads it.)"""
    long_label = " ".join(["cat"] * LONG_WORDS)
    template = "a label-cache test photo of {}"
    (tmp_path / "templates.txt").write_text(template + "\n")
    store = label_store.default()
    key = (identity.of_checkpoint(tiny_quick.folder)["fingerprint"], "float32", (template,))
    unit = np.ones(24, np.float32) / np.sqrt(24)
    for lengths in ({}, {"cat": 9, long_label: LONG_WORDS + 9}):
        store.save(key, {"cat": unit, long_label: -unit}, lengths)
        run = run_cli(work, "classify", GOOD[0], "--labels", "cat", long_label, "--templates",
                      tmp_path / "templates.txt", "--json", model=tiny_quick.folder)
        assert_ok(run)
        assert len(warnings_of(run)) == 1, run.stderr
        warning = warnings_of(run)[0]
        assert f"label {long_label[:60]!r}... is cut to fit the model's 77-token context (a prompt of it has more " \
               "than 75 tokens besides start and end)" in warning
    store.path(key).unlink()


@pytest.mark.slow     # compiles the text encoder at the full context for embed's batch: ~20 s on a busy machine
def test_cut_texts_warn_in_search_and_embed_and_a_local_folder_ignores_revision(tiny_quick, work, tmp_path):
    long_text = " ".join(["dog"] * LONG_WORDS)
    search = run_cli(work, "search", long_text, "--images", "gallery", "--top", "1", model=tiny_quick.folder)
    assert_ok(search)
    assert [w for w in warnings_of(search) if "cut" in w] == [
        "tinyclip: warning: QUERY is cut to fit the model's 77-token context (more than 75 tokens besides start and "
        "end): only its start counts"]
    texts = tmp_path / "texts.txt"
    texts.write_text(f"a cat\n{long_text}\n")
    embed = run_cli(work, "embed", "--texts", texts, "--out", tmp_path / "t.npz", "--revision", "v2",
                    model=tiny_quick.folder)
    assert_ok(embed)
    assert warnings_of(embed) == [
        f"tinyclip: warning: {tiny_quick.folder} is a local folder: revision 'v2' ignored (they select a hub "
        "model's snapshot)",
        f"tinyclip: warning: {texts}: 1 of the 2 texts (line 2) is cut to fit the model's 77-token context: only "
        "its start counts"]


# ---- show progress, hide internals -------------------------------------------------------------------

def test_tinyclip_progress_0_stops_the_progress_bars_too(tiny_quick, work):
    env = {**os.environ, "TINYCLIP_PROGRESS": "0"}
    code, out, shown = run_on_a_terminal([sys.executable, "-m", "tinyclip", "search", "a cat", "--images", "gallery",
                                          "--model", str(tiny_quick.folder), "--device", "cpu", "--batch-size", "3"],
                                         cwd=work, env=env)
    assert code == 0, shown
    assert "\r" not in shown.replace("\r\n", "\n") and "images [" not in shown, repr(shown)


def test_float16_on_the_cpu_says_once_that_it_is_slow(tiny_quick, moved):
    # checked twice before loading (the device options, the .npz's dtype), said once; the float32 .npz is then
    # refused, so nothing compiles
    _, folder = moved
    run = run_cli(folder, "search", "a cat", "--images", "album.npz", "--dtype", "float16", model=tiny_quick.folder)
    assert run.returncode == 1 and "embedded in float32, but this search runs in float16" in run.stderr
    slow = [w for w in warnings_of(run) if "float16 on the cpu backend runs several times slower than float32" in w]
    assert len(slow) == 1 and "use float32" in slow[0], run.stderr


def test_backends_exits_1_when_none_is_available(work):
    # each built-in backend switched off the way a machine without it would be
    env = {**os.environ, "TINYCLIP_CPU_ISA": "none-such", "OCL_ICD_VENDORS": "/nonexistent", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "tinyclip", "backends", "--json"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    available = [b["name"] for b in json.loads(run.stdout) if b["available"]]
    assert run.returncode == (0 if available else 1), (available, run.stderr)
    assert "cpu" not in available and "opencl" not in available


def test_opencl_builds_do_not_print_clangs_warning_count(capfd):
    from tinyclip import _tinygrad, registry
    backend = next(b for b in registry.registered() if b.name == "opencl")
    if not backend.available:
        pytest.skip(f"opencl does not run here: {backend.unavailable}")
    with backend.context():
        from tinygrad import Device
        compiler = Device[backend.device].cl_compiler
        compiler.compile("#warning tinyclip's test\n__kernel void k(__global float* a) { a[0] = 1.0f; }")
    assert "warning generated" not in capfd.readouterr().err
    assert type(compiler).__name__ == "QuietCLCompiler" and _tinygrad.opencl.WARNINGS_GENERATED.match(b"1 warning generated.")


@pytest.mark.slow     # compiles every text kernel afresh on OpenCL (tinygrad's and PoCL's caches off): ~30 s
def test_opencl_embedding_prints_no_clang_warning_counts(tiny_quick, work, tmp_path):
    from tinyclip import registry
    backend = next(b for b in registry.registered() if b.name == "opencl")
    if not backend.available:
        pytest.skip(f"opencl does not run here: {backend.unavailable}")
    env = {**os.environ, "POCL_KERNEL_CACHE": "0", "CACHELEVEL": "0", "TINYCLIP_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "tinyclip", "embed", "--texts", "texts.txt", "--out",
                          str(tmp_path / "cl.npz"), "--model", str(tiny_quick.folder), "--device", "opencl"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert_ok(run)
    assert "generated" not in run.stderr, run.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--device", "foo"], "validate.py: error: --device foo: unknown device 'foo'"),
    (["--images", "no-such.png"], "validate.py: error: no-such.png: image file not found"),
    (["--images", "not-an-image.png"], "validate.py: error: not-an-image.png: not an image Pillow can read"),
])
def test_validate_checks_its_arguments_before_the_reference_runs(tiny_quick, tmp_path, args, fragment):
    (tmp_path / "not-an-image.png").write_text("hello")
    run = subprocess.run([sys.executable, str(ROOT / "validate.py"), "--model", str(tiny_quick.folder), *args],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().startswith(fragment) and len(run.stderr.strip().splitlines()) == 1
    assert "reference" not in run.stdout, "transformers ran first"


@pytest.mark.slow     # validate.py runs transformers and tinyclip on the checkpoint: ~20 s
def test_validate_prints_the_tf32_warning_as_one_line(tiny_quick, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "validate.py"), "--model", str(tiny_quick.folder), "--device",
                          "cpu", "--tf32", "--images", str(ROOT / "tests" / "data" / "images" / "horse.png")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "validate.py: warning: allow_tf32 has no effect on backend cpu" in run.stderr
    assert "UserWarning" not in run.stderr and "api.py" not in run.stderr, run.stderr


# ---- the clone's folder hiding the package --------------------------------------------------------------

@pytest.fixture
def above_a_clone(tmp_path):
    """A folder holding `tinyclip`, a link to this clone, as the folder above a clone does."""
    (tmp_path / "tinyclip").symlink_to(ROOT, target_is_directory=True)
    return tmp_path


def test_python_m_tinyclip_from_the_folder_above_the_clone_says_what_happened(above_a_clone):
    run = subprocess.run([sys.executable, "-m", "tinyclip", "backends"], cwd=above_a_clone, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"tinyclip: error: Python took {above_a_clone / 'tinyclip'}, the clone of the "
                                 "repository, for the tinyclip package"), run.stderr


def test_ray_refuses_to_start_where_its_workers_would_import_the_clone(above_a_clone, tiny_quick):
    shutil.copy(ROOT / "tests" / "data" / "images" / "horse.png", above_a_clone / "horse.png")
    console_script = pathlib.Path(sys.executable).parent / "tinyclip"     # imports the package, as the README's does
    run = subprocess.run([str(console_script), "embed", "horse.png", "--out", "shards", "--engine", "ray",
                          "--model", str(tiny_quick.folder), "--device", "cpu"], cwd=above_a_clone,
                         capture_output=True, text=True, timeout=300)
    assert_one_line_error(run, f"Ray's workers would import the folder {above_a_clone / 'tinyclip'} (a clone of the "
                               "repository: its package is the tinyclip/ inside it) as an empty `tinyclip` package")


def test_ci_run_builds_the_open_clip_environment_only_where_it_is_needed(tmp_path):
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    functions = subprocess.run(["sed", "-n", "/^validates_openclip() {/,/^}/p;/^pip_lines() {/,/^}/p",
                                str(ROOT / ".ci" / "run")], capture_output=True, text=True, check=True).stdout

    def bash(line):
        return subprocess.run(["bash", "-c", functions + line], cwd=tmp_path, capture_output=True, text=True)
    assert bash("validates_openclip --model oc").returncode == 0
    assert bash("validates_openclip --device cpu --model=oc").returncode == 0
    assert bash("validates_openclip --model openai/clip-vit-base-patch32").returncode != 0
    assert bash("validates_openclip").returncode != 0
    wheel = tmp_path / "x.whl"
    wheel.write_bytes(b"0" * 5000)
    shown = bash(f"printf 'Processing {wheel}\\nRequirement already satisfied: numpy\\n' | pip_lines").stdout
    assert shown == f"Processing {wheel} (4.9K)\n", shown
