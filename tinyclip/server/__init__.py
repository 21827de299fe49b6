"""`tinyclip serve`: a local web page and JSON API to search a collection and classify images.

collection.py   what is searched: an index, or embeddings held in memory (exact, as `tinyclip search`)
uploads.py      request bodies read with a size limit, images decoded with a pixel limit
thumbnails.py   thumbnails of collection files only, resolved and checked to lie in the collection
app.py          the Starlette application: routes, errors as JSON, the host check and security headers
static/         the page: plain HTML, JavaScript and CSS, no build step

starlette and uvicorn are imported only here (pip install 'tinyclip[search]').
"""
