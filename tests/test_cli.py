"""`tinyclip classify`, `embed` and `search` end to end, in subprocesses, on the tiny-quick checkpoint.

Every run that loads the model pays tinygrad's start-up, so six runs (module fixtures) serve all
the checks on output; the error cases fail before the model loads and are quick.
"""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor
from transformers.image_utils import load_image

from tests.conftest import ROOT
from tinyclip import identity
from tinyclip.weights import checkpoint_files
from tests.test_tasks import ensembled_probs, image_features, softmax, text_features, token_ids, unit

REL_TOL = 1e-5          # embeddings: max |ours - theirs| / max |theirs|
SCORE_ATOL = 1e-5       # probabilities and cosines
TABLE_ATOL = 5e-5 + SCORE_ATOL   # the table prints percentages with two decimals
SEARCH_TABLE_ATOL = 5e-5 + SCORE_ATOL   # search's table prints cosines with four decimals
UNIT_NORM_ATOL = 1e-6   # |norm - 1| of a normalised float32 row
BATCH = "3"             # one batch shape for every run (tinygrad compiles per shape)
DATA = ROOT / "tests" / "data" / "images"

# gallery/ as the tests lay it out: six good images in embed's order (a folder's files, then its
# subfolders, each sorted) and two bad files.
GOOD = ["gallery/horse.png", "gallery/a/astronaut.png", "gallery/a/chelsea.png", "gallery/a/deep/rocket.jpg",
        "gallery/b/camera.png", "gallery/b/coffee.png"]
BAD = ["gallery/a/broken.png", "gallery/b/notes.jpg"]


def tinyclip(cwd, *args, model=None):
    cmd = [sys.executable, "-m", "tinyclip", *args]
    if model is not None:
        cmd += ["--model", str(model), "--device", "cpu", "--batch-size", BATCH]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def assert_ok(run):
    assert run.returncode == 0, f"exit {run.returncode}\nstdout: {run.stdout}\nstderr: {run.stderr}"


def assert_one_line_error(run, fragment):
    assert run.returncode != 0, run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyclip: error: "), run.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with gallery/, texts.txt and templates.txt."""
    root = tmp_path_factory.mktemp("cli")
    for rel in GOOD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / rel.rsplit("/", 1)[1], root / rel)
    (root / BAD[0]).write_bytes((DATA / "coffee.png").read_bytes()[:400])    # truncated
    (root / BAD[1]).write_text("this is not a JPEG\n")
    (root / "gallery" / "b" / "readme.txt").write_text("not an image extension: ignored\n")
    (root / "gallery" / ".thumbs").mkdir()
    shutil.copy(DATA / "chelsea.png", root / "gallery" / ".thumbs" / "chelsea.png")     # hidden: ignored
    (root / "texts.txt").write_text("a photo of a cat\n\na rocket launch\nRÉSUMÉ of 3 horses 🐎\n",
                                    encoding="utf-8")
    (root / "templates.txt").write_text("a photo of a {}.\n\nart of the {}\n", encoding="utf-8")
    (root / "bad-templates.txt").write_text("a photo of a {}.\na photo\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def oracle_images(tiny_quick, work):
    """transformers' image features of GOOD, from its CLIPImageProcessor on its load_image."""
    processor = CLIPImageProcessor.from_pretrained(tiny_quick.folder)
    pixels = processor([load_image(str(work / p)) for p in GOOD], return_tensors="pt").pixel_values
    return pixels, image_features(tiny_quick, pixels)


# ---- embed -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tiny_quick, work):
    run = tinyclip(work, "embed", "gallery", "--out", "gallery.npz", model=tiny_quick.folder)
    assert_ok(run)
    with np.load(work / "gallery.npz", allow_pickle=False) as data:
        return run, {k: data[k] for k in data.files}


def test_embed_walks_folders_recursively_in_order(embedded):
    _, npz = embedded
    assert npz["paths"].tolist() == GOOD


def test_embed_skips_unreadable_files_with_a_warning_and_counts_them(embedded):
    run, npz = embedded
    warnings = [line for line in run.stderr.splitlines() if line.startswith("tinyclip: warning: ")]
    assert [w.split(": ")[2] for w in warnings] == BAD
    assert "skipped 2 unreadable files" in run.stdout and f"wrote {len(GOOD)} images" in run.stdout
    assert "\r" not in run.stderr, "no progress bar when stderr is not a terminal"


def test_embed_npz_equals_transformers_image_features(embedded, oracle_images, tiny_quick):
    _, npz = embedded
    theirs = oracle_images[1]
    assert npz["embeddings"].dtype == np.float32 and npz["embeddings"].shape == theirs.shape
    assert np.abs(npz["embeddings"] - theirs).max() / np.abs(theirs).max() <= REL_TOL
    recorded = json.loads(str(npz["model_identity"]))
    assert recorded["fingerprint"] == identity.fingerprint(tiny_quick.folder, checkpoint_files(tiny_quick.folder))
    assert recorded["folder"] == str(tiny_quick.folder.resolve()) and recorded["hub_id"] is None
    assert str(npz["dtype"]) == "float32" and int(npz["format"]) == 3
    assert int(npz["projection_dim"]) == tiny_quick.config.projection_dim and not npz["normalized"]


def test_embed_texts_normalized(tiny_quick, work):
    run = tinyclip(work, "embed", "--texts", "texts.txt", "--out", "texts.npz", "--normalize", "--json",
                   model=tiny_quick.folder)
    assert_ok(run)
    texts = ["a photo of a cat", "a rocket launch", "RÉSUMÉ of 3 horses 🐎"]     # the blank line is skipped
    assert json.loads(run.stdout) == {"out": "texts.npz", "count": 3, "dim": tiny_quick.config.projection_dim,
                                      "skipped": []}
    with np.load(work / "texts.npz", allow_pickle=False) as npz:
        assert npz["texts"].tolist() == texts and "paths" not in npz.files and bool(npz["normalized"])
        np.testing.assert_allclose(np.linalg.norm(npz["embeddings"], axis=1), 1, atol=UNIT_NORM_ATOL)
        np.testing.assert_allclose(npz["embeddings"], unit(text_features(tiny_quick, texts)), rtol=0, atol=REL_TOL)


# ---- search ------------------------------------------------------------------------------------------

def test_search_text_in_npz_ranks_by_transformers_cosine(tiny_quick, work, embedded, oracle_images):
    run = tinyclip(work, "search", "a photo of a cat", "--images", "gallery.npz", "--top", "4", "--json",
                   model=tiny_quick.folder)
    assert_ok(run)
    cosines = unit(oracle_images[1]) @ unit(text_features(tiny_quick, ["a photo of a cat"]))[0]
    order = np.argsort(-cosines)[:4]
    results = json.loads(run.stdout)
    assert [r["path"] for r in results] == [GOOD[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in results], cosines[order], rtol=0, atol=SCORE_ATOL)


def test_search_image_query_in_folder_prints_a_table(tiny_quick, work, oracle_images):
    run = tinyclip(work, "search", GOOD[1], "--images", "gallery", "--top", "3", model=tiny_quick.folder)
    assert_ok(run)
    feats = unit(oracle_images[1])
    cosines = feats @ feats[1]
    order = np.argsort(-cosines)[:3]
    header, *rows = run.stdout.strip().splitlines()
    assert header.split() == ["rank", "score", "path"]
    parsed = [row.split(maxsplit=2) for row in rows]
    assert [p[0] for p in parsed] == ["1", "2", "3"]
    assert [p[2] for p in parsed] == [GOOD[i] for i in order] and parsed[0][2] == GOOD[1]
    np.testing.assert_allclose([float(p[1]) for p in parsed], cosines[order], rtol=0, atol=SEARCH_TABLE_ATOL)
    assert sum(line.startswith("tinyclip: warning: ") for line in run.stderr.splitlines()) == len(BAD)


# ---- classify ----------------------------------------------------------------------------------------

def test_classify_json_is_softmax_of_logits_per_image(tiny_quick, work, oracle_images):
    labels = ["cat", "rocket", "cup of coffee"]
    run = tinyclip(work, "classify", *GOOD[:3], "--labels", *labels, "--templates", "none", "--top", "2",
                   "--json", model=tiny_quick.folder)
    assert_ok(run)
    with torch.no_grad():
        logits = tiny_quick.torch_model(**token_ids(tiny_quick, labels),
                                        pixel_values=oracle_images[0][:3]).logits_per_image.numpy()
    probs = softmax(logits.astype(np.float64))
    results = json.loads(run.stdout)
    assert [r["image"] for r in results] == GOOD[:3]
    for r, row in zip(results, probs):
        order = np.argsort(-row)[:2]
        assert list(r["scores"]) == [labels[j] for j in order], "best first, --top 2 kept"
        np.testing.assert_allclose(list(r["scores"].values()), row[order], rtol=0, atol=SCORE_ATOL)


def test_classify_table_with_a_templates_file(tiny_quick, work, oracle_images):
    labels = ["cat", "rocket"]
    run = tinyclip(work, "classify", *GOOD[:3], "--labels", *labels, "--templates", "templates.txt",
                   model=tiny_quick.folder)
    assert_ok(run)
    expected = ensembled_probs(tiny_quick, oracle_images[0][:3], labels, ["a photo of a {}.", "art of the {}"])
    lines = run.stdout.strip().splitlines()
    assert lines[0::3] == GOOD[:3]
    for i, row in enumerate(expected):
        got = dict((m.group(2), float(m.group(1)) / 100) for m in
                   (re.fullmatch(r"\s+([\d.]+)%\s+(.+)", line) for line in lines[3 * i + 1:3 * i + 3]))
        assert list(got) == [labels[j] for j in np.argsort(-row)]
        np.testing.assert_allclose([got[label] for label in labels], row, rtol=0, atol=TABLE_ATOL)


# ---- errors: one line, non-zero exit, before the model loads ------------------------------------------

@pytest.fixture(scope="module")
def other_npz(work):
    path = work / "other.npz"
    np.savez(path, embeddings=np.ones((1, 24), np.float32), paths=np.array(["x.png"]),
             model=np.array("someone/another-clip"), projection_dim=np.array(24))
    return path.name


@pytest.mark.parametrize("args, fragment", [
    (["classify", "no-such.png", "--labels", "cat", "dog"], "no-such.png: image file not found"),
    (["classify", GOOD[0]], "no labels"),
    (["classify", GOOD[0], "--labels", "cat", "--templates", "bad-templates.txt"],
     "bad-templates.txt line 2: template 'a photo' has no {}"),
    (["classify", GOOD[0], "--labels", "cat", "dog", "--top", "0"], "--top must be a positive integer, got 0"),
    (["search", "cat", "--images", "OTHER", "--top", "0"], "--top must be a positive integer, got 0"),
    (["search", "cat", "--images", "OTHER"], "written by an older tinyclip (format 1), which recorded the model "
     "as someone/another-clip without a fingerprint"),
    (["embed", "gallery", "--out", "no-such-folder/x.npz"], "the folder no-such-folder does not exist"),
    (["classify", GOOD[0], "--labels", "cat", "--image-size", "40"],
     "image_size 40 is not a multiple of the patch size 6; the nearest sizes that work are 36 or 42"),
])
def test_errors_are_one_line_with_a_nonzero_exit(tiny_quick, work, other_npz, args, fragment):
    args = [other_npz if a == "OTHER" else a for a in args]
    assert_one_line_error(tinyclip(work, *args, model=tiny_quick.folder), fragment)


def test_help_shows_examples(work):
    for command in ("classify", "embed", "search"):
        run = tinyclip(work, command, "--help")
        assert_ok(run)
        assert "examples:" in run.stdout and f"tinyclip {command} " in run.stdout
