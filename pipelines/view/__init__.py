"""`clipscope view`: a read-only web viewer over a run store (Flask app, waitress server, Jinja templates, one
small script; no front-end build step). `create_app(StoreView(url))` is the WSGI app."""

from clipscope.pipelines.view.app import create_app
from clipscope.pipelines.view.data import StoreView

__all__ = ["StoreView", "create_app"]
