"""`tinyclip serve`: a real uvicorn server in a subprocess on a free local port, asked over HTTP, and the
page driven in a real browser (Debian's chromium, headless, through selenium and /usr/bin/chromedriver)."""
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("faiss", reason="tinyclip serve needs the search extra (pip install 'tinyclip[search]')")
pytest.importorskip("starlette", reason="tinyclip serve needs the search extra (pip install 'tinyclip[search]')")
pytest.importorskip("uvicorn", reason="tinyclip serve needs the search extra (pip install 'tinyclip[search]')")

from tests.test_cli import BATCH, DATA, GOOD, assert_ok, tinyclip  # noqa: E402

SCORE_ATOL = 1e-6          # scores are rounded to 6 significant digits on both sides
STARTUP_S = 300            # loading, and compiling the query graphs when the graph cache is cold
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Where to copy the page's screenshot as well: TINYCLIP_SCREENSHOT=docs/serve.png made the README's.
SCREENSHOT = os.environ.get("TINYCLIP_SCREENSHOT")


class Server:
    """`tinyclip serve ARGS --port 0 --json` in a subprocess; its address read from its first line."""

    def __init__(self, cwd, *args, model):
        cmd = [sys.executable, "-m", "tinyclip", "serve", *args, "--port", "0", "--json",
               "--model", str(model), "--device", "cpu", "--batch-size", BATCH]
        self.process = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = {}
        reader = threading.Thread(target=lambda: first.setdefault("line", self.process.stdout.readline()))
        reader.start()
        reader.join(STARTUP_S)
        if not first.get("line"):
            self.stop()
            raise AssertionError(f"the server did not start: {self.process.stderr.read()}")
        self.ready = json.loads(first["line"])
        self.url = self.ready["url"].rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        self.host, self.port = parsed.hostname, parsed.port

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body bytes) for a request sent as given: the path is not normalised."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method, path, body=None, headers=None):
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


def multipart(fields):
    """A multipart/form-data body of (name, filename or None, bytes) fields, and its content type."""
    boundary = "tinyclip-test-boundary"
    out = io.BytesIO()
    for name, filename, data in fields:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disposition}\r\n".encode())
        if filename:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels, with no pixel data: what a decompression bomb
    looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_quick):
    """gallery/ (six images), its .npz and an exact index, and outside/ (a file not in the collection)."""
    root = tmp_path_factory.mktemp("serve")
    for rel in GOOD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / rel.rsplit("/", 1)[1], root / rel)
    (root / "outside").mkdir()
    shutil.copy(DATA / "coffee.png", root / "outside" / "secret.png")
    assert_ok(tinyclip(root, "embed", "gallery", "--out", "gallery.npz", model=tiny_quick.folder))
    assert_ok(tinyclip(root, "index", "gallery.npz", "--out", "gallery.index"))
    return root


@pytest.fixture(scope="module")
def server(work, tiny_quick):
    s = Server(work, "gallery.index", model=tiny_quick.folder)
    yield s
    s.stop()


def cli_search(work, tiny_quick, query, top):
    run = tinyclip(work, "search", query, "--images", "gallery.npz", "--top", str(top), "--json",
                   model=tiny_quick.folder)
    assert_ok(run)
    return json.loads(run.stdout)


def assert_same_results(api, cli):
    assert [r["path"] for r in api] == [r["path"] for r in cli]
    np.testing.assert_allclose([r["score"] for r in api], [r["score"] for r in cli], atol=SCORE_ATOL)


# ---- the API ---------------------------------------------------------------------------------------------

def test_binds_loopback_and_answers_only_to_local_names(server):
    assert server.host == "127.0.0.1" and server.ready["count"] == len(GOOD)
    status, _, _ = server.get("/api/info", headers={"Host": "photos.example.com"})
    assert status == 403
    status, info = server.json("GET", "/api/info", headers={"Host": f"localhost:{server.port}"})
    assert status == 200 and info["count"] == len(GOOD) and info["kind"] == "flat"


def test_text_search_equals_cli_search_json(server, work, tiny_quick):
    status, body = server.json("GET", "/api/search?" + urllib.parse.urlencode({"q": "a photo of a cat", "k": 4}))
    assert status == 200
    assert_same_results(body["results"], cli_search(work, tiny_quick, "a photo of a cat", 4))


def test_image_upload_raw_or_multipart_equals_cli_image_query(server, work, tiny_quick):
    data = (work / GOOD[2]).read_bytes()
    want = cli_search(work, tiny_quick, GOOD[2], 5)
    status, raw = server.json("POST", "/api/search?k=5", data, {"Content-Type": "image/png"})
    assert status == 200
    assert_same_results(raw["results"], want)
    body, content_type = multipart([("image", "chelsea.png", data)])
    status, form = server.json("POST", "/api/search?k=5", body, {"Content-Type": content_type})
    assert status == 200
    assert_same_results(form["results"], want)


def test_more_like_this_starts_with_the_image_itself(server):
    status, body = server.json("GET", "/api/search?like=3&k=6")
    assert status == 200 and body["query"]["path"] == GOOD[3]
    assert body["results"][0]["id"] == 3 and abs(body["results"][0]["score"] - 1) < 1e-5
    assert sorted(r["id"] for r in body["results"]) == list(range(len(GOOD)))


def test_classify_equals_cli_classify(server, work, tiny_quick):     # before the browser test: fills the label cache
    labels = ["cat", "rocket", "cup of coffee"]
    run = tinyclip(work, "classify", GOOD[2], "--labels", *labels, "--json", model=tiny_quick.folder)
    assert_ok(run)
    want = json.loads(run.stdout)[0]["scores"]
    body, content_type = multipart([("image", "x.png", (work / GOOD[2]).read_bytes()),
                                    ("labels", None, b"cat\nrocket"), ("labels", None, b"cup of coffee")])
    status, got = server.json("POST", "/api/classify", body, {"Content-Type": content_type})
    assert status == 200 and got["templates"] == 80
    assert [c["label"] for c in got["labels"]] == list(want)
    np.testing.assert_allclose([c["probability"] for c in got["labels"]], list(want.values()), atol=SCORE_ATOL)


def test_thumbnails_only_of_collection_files(server, work):
    status, headers, data = server.get("/api/thumbnail/0")
    assert status == 200 and headers["content-type"] == "image/jpeg" and data[:2] == b"\xff\xd8"
    for path in ["/api/thumbnail/6", "/api/thumbnail/-1", "/api/thumbnail/../../etc/passwd",
                 "/api/thumbnail/..%2f..%2f..%2fetc%2fpasswd", "/api/thumbnail/%2e%2e/%2e%2e/etc/passwd",
                 "/api/thumbnail/0/../../../outside/secret.png", "/api/thumbnail/%252e%252e%252fsecret.png",
                 "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f__init__.py",
                 "/static/index.html/../../app.py", "/../../../etc/passwd", "/outside/secret.png",
                 "/gallery/horse.png", "/api/thumbnail/1e1", "/api/thumbnail/%00"]:
        status, _, data = server.get(path)
        assert status in (403, 404), (path, status)
        assert b"root:" not in data and b"import" not in data


def test_a_collection_file_swapped_for_a_link_out_is_refused(server, work):
    victim = work / GOOD[5]                      # gallery/b/coffee.png, row 5
    kept = victim.with_name("kept.bin")
    os.rename(victim, kept)
    try:
        os.symlink(work / "outside" / "secret.png", victim)
        status, _, body = server.get("/api/thumbnail/5")
        assert status == 403 and b"outside the collection" in body
    finally:
        victim.unlink()
        os.rename(kept, victim)
    assert server.get("/api/thumbnail/5")[0] == 200


@pytest.mark.parametrize("body, content_type, status, fragment", [
    (b"", "image/png", 400, "the upload is empty"),
    (b"this is not an image", "image/jpeg", 400, "not an image this server can read"),
    ((DATA / "coffee.png").read_bytes()[:400], "image/png", 400, "truncated or corrupt"),
    (png_header_only(7000, 7000), "image/png", 413, "7000x7000 = 49,000,000 pixels, over the limit"),
    (png_header_only(100_000, 100_000), "image/png", 413, "pixels, the limit"),
    (b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nnot closed", "multipart/form-data; boundary=x",
     400, "no file in its `image` field"),
    (b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n", "multipart/form-data",
     400, "malformed multipart"),
    (multipart([("other", "a.png", b"x")])[0], multipart([])[1], 400, "no file in its `image` field"),
])
def test_bad_uploads_get_a_clear_error_and_the_server_keeps_answering(server, body, content_type, status, fragment):
    got, answer = server.json("POST", "/api/search", body, {"Content-Type": content_type})
    assert got == status and fragment in answer["error"], answer
    assert server.json("GET", "/api/search?q=a%20horse&k=2")[0] == 200


def test_uploads_over_the_size_limit_get_413(server):
    status, answer = server.json("POST", "/api/search", b"\0" * (20 * 1024 * 1024 + 1),
                                 {"Content-Type": "image/png"})
    assert status == 413 and "over the limit" in answer["error"]
    assert server.json("GET", "/api/search?q=a%20horse&k=2")[0] == 200


@pytest.mark.parametrize("query, status", [("/api/search?q=%20&k=3", 400), ("/api/search?q=cat&k=0", 400),
                                           ("/api/search?q=cat&k=abc", 400), ("/api/search?like=99", 404),
                                           ("/api/search?k=3", 400), ("/api/search?q=cat&like=1", 400)])
def test_bad_queries_get_json_errors(server, query, status):
    got, answer = server.json("GET", query)
    assert got == status and answer["error"]


def test_requests_that_arrive_together_share_the_model(server):
    image = (DATA / "horse.png").read_bytes()
    calls = [("GET", "/api/search?q=a%20rocket&k=6", None), ("POST", "/api/search?k=6", image)] * 4
    alone = [server.json(m, p, b, {"Content-Type": "image/png"}) for m, p, b in calls[:2]]
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda c: server.json(c[0], c[1], c[2], {"Content-Type": "image/png"}), calls))
    assert together == alone * 4


def test_the_page_and_its_headers(server):
    status, headers, page = server.get("/")
    assert status == 200 and b'<script src="/static/app.js"' in page
    assert "default-src 'self'" in headers["content-security-policy"]
    assert server.get("/static/app.js")[0] == 200 and b".innerHTML" not in server.get("/static/app.js")[2]


@pytest.mark.slow
def test_serving_a_folder_embeds_it_first(work, tiny_quick):
    s = Server(work, "gallery", model=tiny_quick.folder)
    try:
        status, body = s.json("GET", "/api/search?q=a%20photo%20of%20a%20cat&k=6")
        assert status == 200
        run = tinyclip(work, "search", "a photo of a cat", "--images", "gallery", "--top", "6", "--json",
                       model=tiny_quick.folder)
        assert_ok(run)
        assert_same_results(body["results"], json.loads(run.stdout))
    finally:
        s.stop()


# ---- the page in a real browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no {CHROMIUM} or {CHROMEDRIVER}: apt-get install chromium chromium-driver (bash .ci/run does)")
    os.environ["SE_OFFLINE"] = "true"       # selenium-manager must never download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for_render(driver, before, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("id", "results").get_attribute("data-renders") != before
        or d.find_element("id", "error").is_displayed())
    assert not driver.find_element("id", "error").is_displayed(), driver.find_element("id", "error").text
    return [int(e.get_attribute("data-id")) for e in driver.find_elements("css selector", "#results li")]


def renders(driver):
    return driver.find_element("id", "results").get_attribute("data-renders")


def test_the_page_searches_by_text_and_by_image_in_a_browser(server, browser, work, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "6 images" in d.find_element("id", "info").text)

    Select(browser.find_element("id", "top")).select_by_visible_text("10")
    before = renders(browser)
    browser.find_element("id", "query").send_keys("a photo of a cat")
    browser.find_element("css selector", "#text-form button").click()
    shown = wait_for_render(browser, before)
    _, api = server.json("GET", "/api/search?q=a%20photo%20of%20a%20cat&k=10")
    assert shown == [r["id"] for r in api["results"]]
    assert browser.find_element("id", "results-title").text == "Best matches for “a photo of a cat”"
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(       # every thumbnail decoded
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))

    before = renders(browser)
    browser.find_element("id", "file").send_keys(str(work / GOOD[1]))
    shown = wait_for_render(browser, before)
    _, api = server.json("POST", "/api/search?k=10", (work / GOOD[1]).read_bytes(), {"Content-Type": "image/png"})
    assert shown == [r["id"] for r in api["results"]] and shown[0] == 1

    browser.find_element("id", "labels").send_keys("cat, rocket, cup of coffee")    # 240 prompts, once
    browser.find_element("css selector", "#classify-form button").click()
    WebDriverWait(browser, STARTUP_S).until(lambda d: len(d.find_elements("css selector", "#class-list li")) == 3
                                            or d.find_element("id", "error").is_displayed())
    assert not browser.find_element("id", "error").is_displayed(), browser.find_element("id", "error").text
    assert {e.find_element("class name", "label").text for e in browser.find_elements("css selector", "#class-list li")} \
        == {"cat", "rocket", "cup of coffee"}

    before = renders(browser)
    browser.find_elements("css selector", "#results li button")[2].click()        # more like the third result
    shown_like = wait_for_render(browser, before)
    assert shown_like[0] == shown[2]

    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOT:
        shutil.copy(tmp_path / "page.png", SCREENSHOT)


def test_the_page_shows_queries_and_errors_as_text(server, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server.url + "/")
    hostile = '<img src=x onerror="document.title=1">'
    before = renders(browser)
    browser.find_element("id", "query").send_keys(hostile)
    browser.find_element("css selector", "#text-form button").click()
    wait_for_render(browser, before)
    assert browser.find_element("id", "results-title").text == f"Best matches for “{hostile}”"
    assert browser.title == "tinyclip search"
    assert not browser.find_elements("css selector", "#results-title img")

    browser.execute_script("arguments[0].style.display = 'block'", browser.find_element("id", "file"))
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"<b>not an image</b>")
    browser.find_element("id", "file").send_keys(str(bad))
    WebDriverWait(browser, 60).until(lambda d: d.find_element("id", "error").is_displayed())
    assert "not an image this server can read" in browser.find_element("id", "error").text
    assert server.json("GET", "/api/info")[0] == 200
