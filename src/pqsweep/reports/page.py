"""A report's plots as one HTML page: its header, each plot's PNG at once, then the same plots to hover, from one
copy of plotly.js.

    page.write(Path("reports/x/report.html"), "mnist_cnn_sparsity_x_precision", header_lines, plots)

Why one page and why this shape: an HTML file per plot, each embedding plotly.js (4.6 MB), made a report of 4 trials
weigh 24 MB, and a browser shows nothing of a plot until it has parsed plotly.js (1.5-2 s each in headless chromium
on the shared 2-core machine). Here plotly.js is embedded once, as inert text (`type="text/plain"`, which the browser
does not parse), and each plot is first its PNG, embedded as a data URI, so the page paints the header and every plot
without running a script. After the first paint a loader runs plotly.js from that text and replaces each PNG by its
interactive figure (hover: method, run id, every metric). Everything stays inside the one file: the MLflow UI shows
an HTML artifact from a blob URL, where a script or image beside the file cannot be found, and the CI machine is
offline, so neither a shared plotly.min.js nor a CDN would draw anything there.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs


@dataclass
class Plot:
    name: str  # the plot's id on the page, and its PNG's stem (e.g. top1_vs_size_mb)
    figure: go.Figure  # the interactive figure
    png: Path | None = None  # its static picture, shown until plotly.js has run; None: a blank box until then


# Runs plotly.js from its inert copy once the page has painted (two animation frames: the first paint is done), then
# draws each figure in place of its PNG. A figure whose drawing fails keeps its PNG.
LOADER = """
(function () {
  function draw() {
    var code = document.getElementById("plotly-js");
    var script = document.createElement("script");
    script.text = code.textContent;
    document.head.appendChild(script);
    document.querySelectorAll("script[data-figure]").forEach(function (data) {
      var figure = JSON.parse(data.textContent);
      var box = document.getElementById(data.dataset.figure);
      try {
        Plotly.newPlot(box, figure.data, figure.layout).then(function () {
          box.classList.add("drawn");
        });
      } catch (error) {
        console.error(error);
      }
    });
  }
  requestAnimationFrame(function () { requestAnimationFrame(function () { setTimeout(draw, 0); }); });
})();
"""

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
pre.header { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; }
.plot { width: 100%; max-width: 960px; min-height: 480px; }  /* plotly takes its box's height */
.plot img { width: 100%; height: auto; display: block; }
.plot.drawn img { display: none; }
"""


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figure_json(figure: go.Figure) -> str:
    """The figure as JSON safe inside a <script> element: "</" cannot close it."""
    return figure.to_json().replace("</", "<\\/")


def write(path: Path, title: str, header: list[str], plots: list[Plot]) -> Path:
    """Write the page (UTF-8) and return its path."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<pre class=\"header\">{html.escape(chr(10).join(header))}</pre>"]
    for plot in plots:
        picture = f"<img alt=\"{html.escape(plot.name)}\" src=\"{png_uri(plot.png)}\">" if plot.png else ""
        parts += [f"<h2>{html.escape(plot.name)}</h2>", f"<div class=\"plot\" id=\"{html.escape(plot.name)}\">"
                  f"{picture}</div>",
                  f"<script type=\"application/json\" data-figure=\"{html.escape(plot.name)}\">"
                  f"{figure_json(plot.figure)}</script>"]
    if plots:
        parts += ["<script type=\"text/plain\" id=\"plotly-js\">" + get_plotlyjs() + "</script>",
                  f"<script>{LOADER}</script>"]
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def figures(path: Path) -> dict[str, dict]:
    """The figures a page holds, by name: {"data": traces, "layout": ...} (what tests and tools read back)."""
    text = path.read_text(encoding="utf-8")
    found, marker = {}, "<script type=\"application/json\" data-figure=\""
    at = text.find(marker)
    while at >= 0:
        name_end = text.index("\">", at + len(marker))
        name = html.unescape(text[at + len(marker):name_end])
        found[name] = json.JSONDecoder().raw_decode(text, name_end + 2)[0]
        at = text.find(marker, name_end)
    return found
