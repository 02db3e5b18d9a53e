"""The explorer page: one self-contained HTML file (Plotly's JavaScript, the page's own script and
style, and the payload of `explorer.data.assemble`), nothing fetched from a network, so it opens
from disk and inside the MLflow UI's artifact view (an iframe with sandbox="allow-scripts" whose
document is a blob: URL: no storage, no network, no pop-ups are used)."""
from __future__ import annotations

import base64
import functools
import json
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plotly_js() -> str:
    """plotly.min.js from the `plotly` package (the offline bundle it ships)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@functools.lru_cache(maxsize=1)
def packed_plotly_js() -> str:
    """plotly.min.js zlib-compressed and base64-encoded (1.9 MB instead of 4.8 MB); the page
    inflates it with DecompressionStream and runs it before its own script."""
    return base64.b64encode(zlib.compress(plotly_js().encode("utf-8"), 9)).decode("ascii")


def _inline_script(text: str) -> str:
    # A script element ends at the first "</script"; a payload or library must not contain it.
    return text.replace("</script", "<\\/script")


def render(payload: dict) -> str:
    """The page for `payload` (from `explorer.data.assemble`) as one HTML string."""
    # Every "<" escaped (it stands only inside JSON strings): no "</script", "<!--" or "<script" from a
    # run name, dataset or tag can end the data element or switch the parser into another state.
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    assert "<" not in data
    page = (HERE / "page.html").read_text()
    title = payload["title"].replace("&", "&amp;").replace("<", "&lt;")
    # Substitute the small parts first: the large ones must not be searched for placeholders.
    head, rest = page.split("__PLOTLY__")
    head = head.replace("__TITLE__", title).replace("__CSS__", (HERE / "page.css").read_text())
    before_data, after_data = rest.split("__DATA__")
    after_data = after_data.replace("__APP__", _inline_script((HERE / "app.js").read_text()))
    return "".join([head, packed_plotly_js(), before_data, data, after_data])
