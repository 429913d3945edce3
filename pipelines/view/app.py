"""The viewer's web app (Flask): HTML pages over a store and the JSON API they and scripts use.

Read-only by construction: the store is opened with mode "r" (zarr's read-only store), nothing here
calls a writer, and the only files read outside the store are the shards it names (by index, never
by a path from the URL). Every URL value is validated (keys, layers, heads, neurons, texts ≤ 200
characters, k ≤ 50); bad input answers 400, unknown things 404, each with one line — as an HTML page, or
``{"error": …}`` under ``/api/`` — and never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, redirect, render_template, request, url_for
from markupsafe import escape
from werkzeug.exceptions import HTTPException

from clipscope.errors import ClipscopeError, DataError, ParameterError, StoreError
from clipscope.pipelines.view import extras
from clipscope.pipelines.view.data import MAX_K, NotFound, StoreView, check_int, check_key, check_text
from clipscope.pipelines.view.images import ImageSource

logger = logging.getLogger(__name__)

NAV = (("run", "Run"), ("heads", "Heads"), ("neurons", "Neurons"), ("images_page", "Images"),
       ("segmentation", "Segmentation"), ("rosetta", "Rosetta"))


def status_of(exc: BaseException) -> int:
    if isinstance(exc, HTTPException):
        return int(exc.code or 500)
    if isinstance(exc, ParameterError):
        return 400
    if isinstance(exc, (NotFound, StoreError, DataError)):
        return 404
    if isinstance(exc, ClipscopeError):
        return 400
    return 500


def _arg_int(name: str, default: int | None, low: int, high: int) -> int | None:
    value = request.args.get(name)
    if value is None or value == "":
        return default
    return check_int(value, name, low, high)


def _score() -> str:
    score = request.args.get("score") or "dot"
    if score not in ("dot", "cosine"):
        raise ParameterError("score", f"must be dot or cosine, got {score[:40]!r}")
    return score


def create_app(view: StoreView, images: ImageSource | None = None) -> Flask:
    """The app over one store (`view`); `images` reads the samples' images from their shards."""
    app = Flask(__name__)
    app.config["JSON_SORT_KEYS"] = False
    app.config["MAX_CONTENT_LENGTH"] = 1024  # no page takes a body
    images = images or ImageSource(view)

    @app.context_processor
    def common() -> dict[str, Any]:
        return {"nav": NAV, "store_url": view.url, "model_name": view.info.model.name}

    # --- errors: pages (or JSON under /api/), one line, no traceback -----------------------------------

    @app.errorhandler(Exception)
    def error(exc: Exception):
        status = status_of(exc)
        if isinstance(exc, HTTPException):
            message = exc.description or exc.name
        elif isinstance(exc, ClipscopeError):
            message = str(exc)
        else:
            logger.exception("viewer: unexpected error on %s", request.path)
            message = f"internal error ({type(exc).__name__}); the server log has the details"
        if request.path.startswith("/api/"):
            return jsonify({"error": message, "status": status}), status
        try:
            return render_template("error.html", status=status, message=message, title=f"Error {status}"), status
        except Exception:  # the error page itself failed: a plain page, still no traceback
            logger.exception("viewer: the error page failed on %s", request.path)
            return Response(f"Error {status}: {escape(message)}", status=status, mimetype="text/html")

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self'; script-src 'self'")
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    # --- pages ------------------------------------------------------------------------------------

    @app.get("/")
    def run():
        return render_template("run.html", run=view.run(), title="Run", active="run")

    @app.get("/heads")
    def heads():
        layers = view.textspan_layers()
        layer = _arg_int("layer", layers[-1] if layers else None, 0, 10_000)
        span = view.textspan(layer) if layer is not None else None
        return render_template("heads.html", layers=layers, layer=layer, span=span, title="Heads", active="heads",
                               command=f"clipscope textspan {view.url}", roles=extras.head_roles(view, layer))

    @app.get("/heads/go")
    def head_search():
        layer = _arg_int("layer", None, 0, 10_000)
        head = _arg_int("head", None, 0, 10_000)
        if layer is None or head is None:
            raise ParameterError("layer", "and head must both be given")
        view.check_layer_head(layer, head)
        text = check_text(request.args.get("text"), required=False)
        return redirect(url_for("head", layer=layer, head=head, text=text or None))

    @app.get("/heads/<int:layer>/<int:head>")
    def head(layer: int, head: int):
        view.check_layer_head(layer, head)
        text = check_text(request.args.get("text"), required=False)
        k = _arg_int("k", 10, 1, MAX_K)
        span = view.textspan(layer)["heads"][head] if layer in view.textspan_layers() else None
        top = view.top_images_for_text(layer, head, text, k) if text else None
        return render_template("head.html", layer=layer, head=head, text=text, k=k, span=span, top=top,
                               title=f"Layer {layer} head {head}", active="heads",
                               command=f"clipscope textspan {view.url} --layers {layer}")

    @app.get("/neurons")
    def neurons():
        layers = view.second_order_layers()
        layer = _arg_int("layer", layers[0] if layers else None, 0, 10_000)
        page = _arg_int("page", 0, 0, 1_000_000)
        listing = view.neurons(layer, page) if layer is not None else None
        return render_template("neurons.html", layers=layers, layer=layer, listing=listing, title="Neurons",
                               active="neurons", stored=sorted(view.info.second_order_layers),
                               command=f"clipscope second-order {view.url} --layer L")

    @app.get("/neurons/<int:layer>/<int:neuron>")
    def neuron(layer: int, neuron: int):
        m = _arg_int("m", None, 1, 100_000)
        data = view.neuron(layer, neuron, m)
        return render_template("neuron.html", n=data, title=f"Layer {layer} neuron {neuron}", active="neurons")

    @app.get("/images")
    def images_page():
        page = _arg_int("page", 0, 0, 10_000_000)
        per_page = 48
        table = view.samples()
        pages = max(1, -(-table.num_rows // per_page))
        if page >= pages:
            raise ParameterError("page", f"must be in 0..{pages - 1}, got {page}")
        rows = table.slice(page * per_page, per_page).to_pylist()
        return render_template("images.html", rows=rows, page=page, pages=pages, title="Images", active="images_page")

    @app.get("/image/<path:key>")
    def image(key: str):
        data = view.image(key)
        text = check_text(request.args.get("text"), required=False)
        contrast = check_text(request.args.get("contrast"), required=False, name="contrast")
        which = request.args.get("map") or (data["maps"][0][0] if data["maps"] else "")
        heads_layers = list(view.info.heads_layers)
        # Neighbours rank every row (a streamed scan of one head's terms): only when asked for (?layer=…).
        asked = request.args.get("layer") is not None
        layer = _arg_int("layer", heads_layers[-1], 0, 10_000)
        head = _arg_int("head", 0, 0, 10_000)
        score = _score()
        neighbours = view.neighbours(key, layer, head, 8, score) if asked and data["sample"]["valid"] else None
        return render_template("image.html", d=data, key=key, text=text, contrast=contrast, which=which, layer=layer,
                               head=head, score=score, heads_layers=heads_layers, n_heads=view.n_heads(),
                               neighbours=neighbours, segmentation=extras.segmentation_of_row(view, data["sample"]["row"]),
                               title=f"Image {key}", active="images_page")

    @app.get("/find")
    def find():
        key = check_key(request.args.get("key", "").strip())
        view.row_of(key)
        return redirect(url_for("image", key=key))

    @app.get("/segmentation")
    def segmentation():
        return render_template("extra.html", section=extras.segmentation(view), title="Segmentation",
                               active="segmentation")

    @app.get("/rosetta")
    def rosetta():
        section = extras.rosetta(view, request.args.get("name") or None, _arg_int("page", 0, 0, 1_000_000))
        return render_template("rosetta.html", section=section, title="Rosetta", active="rosetta")

    # --- images -----------------------------------------------------------------------------------

    @app.get("/thumb")
    def thumb():
        key = check_key(request.args.get("key", ""))
        size = _arg_int("size", 128, 1, 4096)
        response = Response(images.thumbnail(key, size), mimetype="image/png")
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.get("/map.png")
    def map_png():
        key = check_key(request.args.get("key", ""))
        found = view.topic_map(key, request.args.get("text", ""), request.args.get("contrast", ""),
                               request.args.get("map") or None)
        return Response(images.map_overlay(key, np.asarray(found["values"])), mimetype="image/png")

    # --- JSON API ---------------------------------------------------------------------------------

    @app.get("/api/run")
    def api_run():
        return jsonify(view.run())

    @app.get("/api/heads/<int:layer>")
    def api_textspan(layer: int):
        return jsonify(view.textspan(layer))

    @app.get("/api/heads/<int:layer>/<int:head>/top")
    def api_top(layer: int, head: int):
        k = _arg_int("k", 10, 1, MAX_K)
        return jsonify({"layer": layer, "head": head, "text": check_text(request.args.get("text")),
                        "top": view.top_images_for_text(layer, head, request.args.get("text", ""), k)})

    @app.get("/api/neurons/<int:layer>")
    def api_neurons(layer: int):
        return jsonify(view.neurons(layer, _arg_int("page", 0, 0, 1_000_000)))

    @app.get("/api/neurons/<int:layer>/<int:neuron>")
    def api_neuron(layer: int, neuron: int):
        return jsonify(view.neuron(layer, neuron, _arg_int("m", None, 1, 100_000)))

    @app.get("/api/image/<path:key>")
    def api_image(key: str):
        return jsonify(view.image(key))

    @app.get("/api/map")
    def api_map():
        key = check_key(request.args.get("key", ""))
        return jsonify(view.topic_map(key, request.args.get("text", ""), request.args.get("contrast", ""),
                                      request.args.get("map") or None))

    @app.get("/api/neighbours")
    def api_neighbours():
        key = check_key(request.args.get("key", ""))
        layer = _arg_int("layer", None, 0, 10_000)
        head = _arg_int("head", None, 0, 10_000)
        if layer is None or head is None:
            raise ParameterError("layer", "and head must be given (a head of a layer with head terms)")
        k = _arg_int("k", 8, 1, MAX_K)
        score = _score()
        return jsonify({"key": key, "layer": layer, "head": head, "score": score,
                        "neighbours": view.neighbours(key, layer, head, k, score)})

    @app.get("/api/segmentation")
    def api_segmentation():
        return jsonify(extras.segmentation(view))

    @app.get("/api/rosetta")
    def api_rosetta():
        return jsonify(extras.rosetta(view, request.args.get("name") or None, _arg_int("page", 0, 0, 1_000_000)))

    app.jinja_env.filters["zip"] = zip
    app.jinja_env.globals["thumb_url"] = lambda key, size=96: url_for("thumb", key=key, size=size)
    return app
