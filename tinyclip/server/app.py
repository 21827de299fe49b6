"""The Starlette application of `tinyclip serve`: the page, the JSON API, its limits.

    GET  /                        the page (static/index.html; static/app.js, static/style.css)
    GET  /api/info                the collection's size and the model
    GET  /api/search?q=TEXT&k=K   the K best images for a text
    GET  /api/search?like=ID&k=K  the K best images for image ID of the collection ("more like this")
    POST /api/search?k=K          the K best for an uploaded image: the raw bytes as the body, or a
                                  multipart form with the file in the field `image`
    POST /api/classify            zero-shot: an uploaded image (raw body, or the multipart field `image`)
                                  over `labels` (repeated query or form fields; each may hold several
                                  labels, one per line), with OpenAI's 80 prompt templates
    GET  /api/thumbnail/ID        a JPEG thumbnail of image ID

Errors are JSON, {"error": MESSAGE}, with status 400 (bad input), 403, 404, 413 (too large).
Every model call, image decode, search and thumbnail runs in a worker thread, never on the event
loop; the model serialises its own device work with a lock (tinyclip.runner), so requests that
arrive together share it safely.
"""
from __future__ import annotations

import importlib.resources
import ipaddress

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import identity, label_store, tasks
from ..cli import rounded
from ..cli.npz import stored_path
from .thumbnails import NotServed, Thumbnails
from .uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, UploadError, decode_image, read_body

DEFAULT_K, MAX_K = 20, 500
MAX_QUERY_CHARS = 1000
MAX_LABELS, MAX_LABEL_CHARS = 200, 200
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                                 b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(model, collection, *, cwd: str, loopback_only: bool, batch_size: int = 32,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_upload_pixels: int = MAX_UPLOAD_PIXELS) -> Starlette:
    """The application serving `collection` (tinyclip.server.collection) with `model` (a tinyclip.CLIP).
    Paths are shown relative to `cwd` where they lie inside it, as `tinyclip search` shows them.
    loopback_only: answer only requests whose Host is a loopback name (a page of another site that
    resolves its name to 127.0.0.1, DNS rebinding, then gets nothing)."""
    files = importlib.resources.files(__package__) / "static"
    page = (files / "index.html").read_bytes()
    assets = {name: (files / name).read_bytes() for name in STATIC}
    thumbnails = Thumbnails(collection.paths, collection.root)
    shown = [stored_path(p, cwd) for p in collection.paths]
    store = label_store.default()

    def results(found):
        return [{"id": i, "path": shown[i], "score": rounded(s), "thumbnail": f"/api/thumbnail/{i}"}
                for i, s in found]

    def top(request: Request) -> int:
        raw = request.query_params.get("k", str(DEFAULT_K))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_K:
            raise Refused(400, f"k must be a whole number from 1 to {MAX_K}, got {raw[:20]!r}")
        return int(raw)

    async def index_page(request):
        return Response(page, media_type="text/html; charset=utf-8")

    async def static(request):
        name = request.path_params["name"]
        if name not in assets:
            raise Refused(404, "not found")
        return Response(assets[name], media_type=STATIC[name])

    async def info(request):
        return JSONResponse({"count": len(collection), "kind": collection.kind, "model": identity.describe(model.identity),
                             "dim": collection.dim, "max_k": MAX_K, "max_upload_bytes": max_upload_bytes,
                             "max_upload_pixels": max_upload_pixels})

    async def search_get(request):
        k = top(request)
        text, like = request.query_params.get("q"), request.query_params.get("like")
        if (text is None) == (like is None):
            raise Refused(400, "give either q (a text) or like (the id of an image in the collection)")
        if like is not None:
            if not like.isdigit() or int(like) >= len(collection):
                raise Refused(404, f"no image {like[:20]!r} in the collection")
            found = await run_in_threadpool(collection.search, collection.vector(int(like)), k)
            return JSONResponse({"query": {"like": int(like), "path": shown[int(like)]}, "results": results(found)})
        text = text.strip()
        if not text:
            raise Refused(400, "the query is empty: type what you are looking for")
        if len(text) > MAX_QUERY_CHARS:
            raise Refused(400, f"the query is {len(text)} characters long; at most {MAX_QUERY_CHARS}")

        def run():
            vector = model.encode_text([text], normalize=True, batch_size=1)[0]
            return collection.search(vector, k)
        return JSONResponse({"query": {"text": text}, "results": results(await run_in_threadpool(run))})

    async def search_post(request):
        k = top(request)
        image, _ = await upload(request)

        def run():
            vector = model.encode_image([image], normalize=True, batch_size=1)[0]
            return collection.search(vector, k)
        return JSONResponse({"query": {"image": True}, "results": results(await run_in_threadpool(run))})

    async def classify(request):
        image, form_labels = await upload(request)
        labels = [line.strip() for value in [*request.query_params.getlist("labels"), *form_labels]
                  for line in value.splitlines() if line.strip()]
        labels = list(dict.fromkeys(labels))
        if not labels:
            raise Refused(400, "no labels: give the class names to choose from, e.g. cat, dog, car")
        if len(labels) > MAX_LABELS or max(len(label) for label in labels) > MAX_LABEL_CHARS:
            raise Refused(400, f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each")

        def run():
            tasks.label_embeddings(model, labels, "imagenet", batch_size=batch_size, store=store)
            return model.classify([image], labels, "imagenet", top=len(labels), batch_size=batch_size)[0]
        best = await run_in_threadpool(run)
        return JSONResponse({"labels": [{"label": label, "probability": rounded(p)} for label, p in best],
                             "templates": len(tasks.resolve_templates("imagenet"))})

    async def upload(request):
        """(the uploaded image, the form's `labels` values): the raw body, or multipart field `image`."""
        body = await read_body(request, max_upload_bytes)
        labels: list[str] = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            replay = Request(request.scope, receive=_replay(body))
            try:
                async with replay.form(max_files=1, max_fields=MAX_LABELS + 10,
                                       max_part_size=MAX_LABELS * (MAX_LABEL_CHARS + 2)) as form:
                    field = form.get("image")
                    if field is None or isinstance(field, str):
                        raise Refused(400, "the form has no file in its `image` field")
                    data = await field.read()
                    labels = [v for v in form.getlist("labels") if isinstance(v, str)]
            except Refused:
                raise
            except Exception as e:     # starlette's MultiPartException, or a malformed body
                raise Refused(400, f"a malformed multipart form ({e})") from None
        else:
            data = body
        image = await run_in_threadpool(decode_image, data, max_upload_pixels)
        return image, labels

    async def thumbnail(request):
        raw = request.path_params["id"]
        if not raw.isdigit():
            raise Refused(404, "no such image")
        try:
            data = await run_in_threadpool(thumbnails.jpeg, int(raw))
        except NotServed as e:
            raise Refused(e.status, str(e)) from None
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    async def refused(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def not_found(request, exc):
        return JSONResponse({"error": "not found"}, status_code=getattr(exc, "status_code", 404))

    routes = [
        Route("/", index_page),
        Route("/static/{name}", static),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/api/info", info),
        Route("/api/search", search_get, methods=["GET"]),
        Route("/api/search", search_post, methods=["POST"]),
        Route("/api/classify", classify, methods=["POST"]),
        Route("/api/thumbnail/{id}", thumbnail),
    ]
    app = Starlette(routes=routes, exception_handlers={Refused: refused, UploadError: refused,
                                                       404: not_found, 405: not_found})
    return Guard(app, loopback_only)


def _replay(body: bytes):
    """An ASGI receive that gives `body` once (the body was read already, with its size limit)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


class Guard:
    """ASGI middleware: refuses a Host that is not a loopback name (when loopback_only), and adds the
    security headers (a content security policy that allows no inline script) to every response."""

    def __init__(self, app, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.loopback_only and not is_loopback_host(dict(scope["headers"]).get(b"host", b"").decode("latin-1")):
            response = JSONResponse({"error": "this server answers only to localhost, 127.0.0.1 or [::1]"},
                                    status_code=403)
            return await response(scope, receive, self._with_headers(send))
        return await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send):
        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)
        return sending


def is_loopback_host(host: str) -> bool:
    """Whether a Host header ("localhost:8000", "127.0.0.1", "[::1]:8000") names this machine's loopback."""
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    if name.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
