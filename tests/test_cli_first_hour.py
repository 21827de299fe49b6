"""A new user's first hour (issue 15): one-line errors with the right exit code, labels that
travel (--labels-file, after --, cached on disk), embedding files that travel, status lines.

Errors that come before the model loads run in this process through `cli.main`; the rest run
`python -m tinyclip` in subprocesses on the tiny-quick checkpoint, as tests/test_cli.py does.
"""
import io
import json
import shutil

import numpy as np
import pytest

import tinyclip
from tests.test_cli import GOOD, assert_ok, assert_one_line_error, work  # noqa: F401  (work: a fixture)
from tests.test_cli import tinyclip as run_cli
from tests.test_hub import REPO, make_cache
from tinyclip import api, cli, label_store, progress, registry, tasks
from tinyclip.errors import TruncationWarning, UsageError

DEVICE = "cpu"
JSON_DIGITS = 6          # classify/search --json: significant digits of each score
LONG_LABEL_WORDS = 90    # words in a label longer than the 77-token context with any template


def main_error(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr) of `tinyclip ARGS` run in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:     # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code, err, fragment, exit_code=1):
    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("tinyclip: error: "), (code, err)
    assert fragment in lines[0], lines[0]


# ---- devices ---------------------------------------------------------------------------------------

def test_unknown_device_is_one_line_naming_the_option_and_the_names_that_run(capsys, work):
    code, err = main_error(capsys, "classify", work / GOOD[0], "--labels", "cat", "--device", "tpu")
    assert_one_line(code, err, "--device tpu: unknown device 'tpu'")
    assert "backends that run here: " in err and "device=..." not in err
    assert all(b.name in err for b in registry.registered() if b.available)


def test_device_gpu_is_the_best_available_accelerator_or_a_one_line_error(capsys, work):
    accelerators = sorted((b for b in registry.registered() if b.available and b.priority >= registry.ACCELERATOR_PRIORITY),
                          key=lambda b: -b.priority)
    if accelerators:
        assert registry.select("gpu") is accelerators[0]
    else:
        code, err = main_error(capsys, "classify", work / GOOD[0], "--labels", "cat", "--device", "gpu")
        assert_one_line(code, err, "--device gpu: no GPU backend is available here")


def test_cpu_backends_show_their_compiler():
    shown = {b.name: registry.shown_device(b) for b in registry.registered()}
    assert shown["cpu"] == "CPU:CLANG" and shown["cpu-llvm"] == "CPU:LLVM"


# ---- argparse's errors keep argparse's convention: the subcommand's usage, exit 2 -----------------

def test_an_unknown_option_shows_the_subcommands_usage_and_exits_2(capsys):
    code, err = main_error(capsys, "tune", "--bogus")
    assert code == 2
    assert err.startswith("usage: tinyclip tune ") and "tinyclip tune: error: unrecognized arguments: --bogus" in err


# ---- labels ----------------------------------------------------------------------------------------

def test_an_image_swallowed_by_labels_is_named(capsys, work):
    code, err = main_error(capsys, "classify", "--labels", "cat", "dog", work / GOOD[0])
    assert_one_line(code, err, f"--labels took {work / GOOD[0]}, an image file: put the images before --labels")


def test_labels_after_double_dash_may_start_with_dashes():
    argv, labels = cli.classify.labels_after_dashes(["classify", "a.png", "--labels", "cat", "--", "--odd", "-x"])
    assert argv == ["classify", "a.png", "--labels", "cat"] and labels == ["--odd", "-x"]
    # without --labels before it, -- keeps argparse's meaning (image files named like options)
    assert cli.classify.labels_after_dashes(["classify", "--", "-a.png"]) == (["classify", "--", "-a.png"], [])


def test_empty_labels_file_is_an_error(capsys, work, tmp_path):
    empty = tmp_path / "labels.txt"
    empty.write_text("\n  \n")
    code, err = main_error(capsys, "classify", work / GOOD[0], "--labels-file", empty)
    assert_one_line(code, err, f"--labels-file {empty}: the file has no non-blank lines")


# ---- search ----------------------------------------------------------------------------------------

NO_MODEL = "/no/such/model-folder"     # any error about it would mean the model was being loaded


@pytest.mark.parametrize("args, fragment", [
    (["hrose.png", "--images", "gallery"], "hrose.png: no such image file (QUERY ending in .png names an image); "
                                           "to search for these words as text, add --text"),
    (["", "--images", "gallery"], "QUERY is empty"),
    (["   ", "--images", "gallery"], "QUERY is empty"),
    (["cat", "--images", "EMPTY"], "no image files (.bmp .gif .jpeg .jpg .png .tif .tiff .webp) in the folder"),
])
def test_search_errors_come_before_loading(capsys, work, tmp_path, monkeypatch, args, fragment):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(work)
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    code, err = main_error(capsys, "search", *args, "--model", NO_MODEL)
    assert_one_line(code, err, fragment)


def test_search_refuses_embeddings_of_other_weights_before_loading(capsys, tiny_quick, work, tmp_path):
    npz = tmp_path / "other.npz"
    np.savez(npz, embeddings=np.ones((1, 24), np.float32), paths=np.array(["x.png"]), root=np.array(str(tmp_path)),
             model_identity=np.array(json.dumps({"hub_id": "someone/else", "revision": None, "folder": "/x",
                                                 "fingerprint": "0" * 32})),
             dtype=np.array("float32"), normalized=np.array(False), projection_dim=np.array(24), format=np.array(2))
    code, err = main_error(capsys, "search", "cat", "--images", npz, "--model", tiny_quick.folder, "--device", DEVICE)
    assert_one_line(code, err, f"--images {npz}: embedded with someone/else (fingerprint 000000000000), not with "
                               f"{tiny_quick.folder}")
    assert "--allow-other-model" in err


def test_search_refuses_embeddings_of_another_dtype(capsys, tiny_quick, work, embedded_float16):
    code, err = main_error(capsys, "search", "cat", "--images", embedded_float16, "--model", tiny_quick.folder,
                           "--device", DEVICE)
    assert_one_line(code, err, "embedded in float16, but this search runs in float32 (--dtype float16 matches it)")


@pytest.fixture
def embedded_float16(gallery_npz, tmp_path):
    """gallery.npz as if embedded in float16 (float16 need not run here to check the refusal)."""
    with np.load(gallery_npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["dtype"] = np.array("float16")
    path = tmp_path / "half.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def gallery_npz(tiny_quick, work):
    run = run_cli(work, "embed", "gallery", "--out", "gallery.npz", model=tiny_quick.folder)
    assert_ok(run)
    return work / "gallery.npz"


def test_search_a_copied_checkpoint_from_another_folder(tiny_quick, work, gallery_npz, tmp_path):
    """The same weights in another folder are the same model; stored paths resolve from where search runs."""
    copy = tmp_path / "copy-of-model"
    shutil.copytree(tiny_quick.folder, copy)
    elsewhere = work / "gallery" / "a"
    run = run_cli(elsewhere, "search", "a photo of a cat", "--images", gallery_npz, "--json", "--top", "6",
                  model=copy)
    assert_ok(run)
    results = json.loads(run.stdout)
    assert sorted(r["path"] for r in results) == sorted(
        str(((work / p).relative_to(elsewhere)) if p.startswith("gallery/a/") else (work / p)) for p in GOOD)
    assert all(r["score"] == float(f"{r['score']:.{JSON_DIGITS}g}") for r in results)


def test_allow_other_model_warns_and_searches(tiny_quick, work, gallery_npz):
    with np.load(gallery_npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["model_identity"] = np.array(json.dumps({"hub_id": "someone/else", "fingerprint": "1" * 32}))
    other = gallery_npz.with_name("other.npz")    # beside it: its paths are relative to its folder
    np.savez(other, **arrays)
    refused = run_cli(work, "search", "cat", "--images", other, model=tiny_quick.folder)
    assert refused.returncode == 1 and "--allow-other-model" in refused.stderr
    allowed = run_cli(work, "search", "cat", "--images", other, "--allow-other-model", "--json",
                      model=tiny_quick.folder)
    assert_ok(allowed)
    warnings = [line for line in allowed.stderr.splitlines() if line.startswith("tinyclip: warning: ")]
    assert len(warnings) == 1 and "embedded with someone/else" in warnings[0] and "comparing anyway" in warnings[0]
    assert len(json.loads(allowed.stdout)) == len(GOOD)


def test_tf32_on_the_cpu_is_one_warning_line_and_an_exact_result(tiny_quick, work):
    exact = run_cli(work, "embed", "--texts", "texts.txt", "--out", "exact.npz", model=tiny_quick.folder)
    fast = run_cli(work, "embed", "--texts", "texts.txt", "--out", "tf32.npz", "--tf32", model=tiny_quick.folder)
    assert_ok(exact), assert_ok(fast)
    warnings = [line for line in fast.stderr.splitlines() if line.startswith("tinyclip: warning: ")]
    assert len(warnings) == 1 and "allow_tf32 has no effect on backend cpu" in warnings[0], fast.stderr
    with np.load(work / "exact.npz") as a, np.load(work / "tf32.npz") as b:
        np.testing.assert_array_equal(a["embeddings"], b["embeddings"])


def test_tf32_is_not_passed_to_ray_workers(capsys, work):
    code, err = main_error(capsys, "embed", work / "gallery", "--out", work / "shards", "--engine", "ray", "--tf32")
    assert_one_line(code, err, "--tf32 is not passed to Ray workers")


# ---- classify: labels after --, truncation, rounding --------------------------------------------------

@pytest.mark.slow     # compiles the text encoder at the full 77-token context: ~20 s
def test_classify_labels_after_dashes_warns_once_for_a_long_label_and_rounds(tiny_quick, work):
    long_label = " ".join(["cat"] * LONG_LABEL_WORDS)
    run = run_cli(work, "classify", GOOD[0], "--labels", "cat", long_label, "--templates", "none", "--json",
                  "--model", tiny_quick.folder, "--device", DEVICE, "--", "--odd")
    assert_ok(run)
    (result,) = json.loads(run.stdout)
    assert set(result["scores"]) == {"cat", long_label, "--odd"}
    assert all(p == float(f"{p:.{JSON_DIGITS}g}") for p in result["scores"].values())
    warnings = [line for line in run.stderr.splitlines() if line.startswith("tinyclip: warning: ")]
    assert len(warnings) == 1 and f"label {long_label[:60]!r}... is cut to fit the model's 77-token context" in warnings[0]


# ---- label embeddings on disk ------------------------------------------------------------------------

@pytest.fixture
def encode_calls(monkeypatch):
    """How many times CLIP.encode_text runs (the real method, counted)."""
    calls = []
    real = api.CLIP.encode_text

    def counted(self, texts, **kwargs):
        calls.append(len(texts) if isinstance(texts, list) else 1)
        return real(self, texts, **kwargs)

    monkeypatch.setattr(api.CLIP, "encode_text", counted)
    return calls


@pytest.mark.slow     # two model loads in this process, and the graphs of batch 3 compiled here: 20-30 s
def test_second_classify_with_the_same_labels_encodes_no_text(tiny_quick, work, tmp_path, capsys, encode_calls):
    # the session's cache folder (its compiled graphs save time), with no label files yet
    stored = label_store.default().folder
    shutil.rmtree(stored, ignore_errors=True)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\nrocket\ncup of coffee\n")
    args = ["classify", str(work / GOOD[0]), "--labels-file", str(labels), "--templates", str(work / "templates.txt"),
            "--json",
            "--model", str(tiny_quick.folder), "--device", DEVICE, "--batch-size", "3"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert sum(encode_calls) == 3 * 2, "three labels, two templates each"
    encode_calls.clear()
    assert cli.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert encode_calls == [] and again == first
    files = list(stored.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600


def test_a_label_file_others_may_write_is_not_read(tiny_quick, tmp_path, recwarn):
    store = label_store.LabelStore(tmp_path / "labels")
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    first = tasks.label_embeddings(model, ["cat", "dog"], None, store=store)
    (path,) = (tmp_path / "labels").iterdir()
    path.chmod(0o666)
    model.label_cache.clear()
    with pytest.warns(label_store.LabelStoreWarning, match="writable by group or others"):
        again = tasks.label_embeddings(model, ["cat", "dog"], None, store=store)
    np.testing.assert_array_equal(again, first)


def test_label_store_keys_by_templates_and_dtype(tmp_path):
    store = label_store.LabelStore(tmp_path)
    key = ("f" * 32, "float32", ("{}",))
    store.save(key, {"cat": np.ones(4, np.float32)})
    assert list(store.load(key)) == ["cat"]
    assert store.load(("f" * 32, "float16", ("{}",))) == {}
    assert store.load(("f" * 32, "float32", ("a {}",))) == {}
    assert store.load(("e" * 32, "float32", ("{}",))) == {}


def test_a_long_label_warns_in_the_library_too(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    with pytest.warns(TruncationWarning, match="is cut to fit the model's 77-token context"):
        tasks.label_embeddings(model, [" ".join(["dog"] * LONG_LABEL_WORDS)], None)


# ---- bare ValueErrors are TinyClipErrors -----------------------------------------------------------

def test_unknown_dtype_and_zero_batch_size_are_usage_errors(tiny_quick):
    with pytest.raises(UsageError, match="dtype 'float8' is not supported"):
        tinyclip.load(tiny_quick.folder, device=DEVICE, dtype="float8")
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    with pytest.raises(UsageError, match="batch_size must be a positive integer, got 0"):
        model.encode_text(["a cat"], batch_size=0)


# ---- tune and the model options ----------------------------------------------------------------------

def test_every_model_command_takes_the_model_options(capsys):
    for command in ("classify", "embed", "search", "tune"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        for option in ("--model", "--revision", "--cache-dir", "--device", "--dtype", "--batch-size"):
            assert option in out, (command, option)
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    assert "multiples of 8" not in capsys.readouterr().out


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch", "1,64", "--batch-size", "32"], "--batch 1,64: buckets above --batch-size 32 never run"),
    (["--model", "other"], "two models given"),
])
def test_tune_batch_size_and_model(capsys, tiny_quick, args, fragment):
    code, err = main_error(capsys, "tune", tiny_quick.folder, "--device", DEVICE, *args)
    assert_one_line(code, err, fragment)


def test_cache_dir_and_revision_find_a_hub_model(tiny_quick, work, tmp_path):
    cache = tmp_path / "hub"
    make_cache(cache, tiny_quick.folder, ref="v2")
    run = run_cli(work, "embed", "--texts", "texts.txt", "--out", "hub.npz", "--revision", "v2",
                  "--cache-dir", cache, model=REPO)
    assert_ok(run)
    with np.load(work / "hub.npz", allow_pickle=False) as data:
        recorded = json.loads(str(data["model_identity"]))
    assert recorded["hub_id"] == REPO and recorded["revision"] == "v2"
    missing = run_cli(work, "embed", "--texts", "texts.txt", "--out", "hub.npz", "--overwrite", "--revision", "v3",
                      "--cache-dir", cache, model=REPO)
    assert_one_line_error(missing, f"{REPO}@v3")


# ---- status lines --------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_status_lines_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        progress.compiling(("text", 8, 12), stream)
        progress.clear(stream)
    assert tty.getvalue() == "\r\033[Kcompiling the text encoder for 12 tokens (batches of 8), once ...\r\033[K"
    assert pipe.getvalue() == ""
    monkeypatch.setenv(progress.ENV, "0")
    progress.status("loading", tty)
    assert tty.getvalue().endswith("\r\033[K"), "TINYCLIP_PROGRESS=0 silences it"


def test_label_embeddings_report_progress_from_the_start(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    calls = []
    tasks.label_embeddings(model, ["cat", "dog", "bird"], ["a {}", "the {}"], on_progress=lambda *a: calls.append(a))
    assert calls == [(0, 6), (6, 6)], "a bar must exist before the wait, and end full"
    calls.clear()
    tasks.label_embeddings(model, ["cat", "dog"], ["a {}", "the {}"], on_progress=lambda *a: calls.append(a))
    assert calls == [], "nothing to encode, nothing to report"
