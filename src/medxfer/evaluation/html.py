"""One kit for medxfer's self-contained HTML pages (report, comparison, leaderboard): escaping, tables,
figures as base64 PNG data URIs, and the page around them. No external CSS, JS or fonts: a page
opens offline and can be mailed as one file.

Usage::

    from medxfer.evaluation import html

    fig_html = html.figure(png_bytes, "ROC on the test split")
    page = html.page("medxfer report: breast", intro_html, [("roc", "ROC", fig_html)])
"""

from __future__ import annotations

import base64
import html as _html
import re

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em 2em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d8dee8;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1em}th,td{border:1px solid #d8dee8;padding:.25em .7em;text-align:left}
th{background:#f1f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}figure{margin:.8em 0;display:table}
figure img{max-width:100%;border:1px solid #e4e8ee}figcaption{display:table-caption;caption-side:bottom;
font-size:.85em;color:#4a5568;padding-top:.3em}.note{background:#fff8e1;border-left:4px solid #f0b400;
padding:.5em .8em;margin:.8em 0}.muted{color:#6b7585;font-size:.9em}code{background:#f1f4f8;padding:0 .25em}
.flag{color:#b42318;font-weight:600}
"""
# the page marks itself when every figure decoded (the browser test of the report reads it)
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) { if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { bad++; } }
  document.body.setAttribute('data-figures', bad ? 'broken ' + bad : 'ok ' + imgs.length);
});
"""


def esc(x) -> str:
    return _html.escape(str(x), quote=True)


def num(v, digits: int = 3) -> str:
    """A number for a table cell ('–' for None)."""
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else esc(v)


def with_ci(m: dict, key: str) -> str:
    """``value (lo–hi)`` from a metrics dict holding ``key`` and ``key_ci``."""
    v, ci = m.get(key), m.get(f"{key}_ci")
    return num(v) + (f" <span class='muted'>({ci[0]:.3f}–{ci[1]:.3f})</span>" if ci else "")


def table(header: list[str] | None, rows: list[list], num_from: int = 1) -> str:
    """Cells are HTML (escape text with :func:`esc`); columns from ``num_from`` on are right-aligned."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td{' class=num' if j >= num_from else ''}>{c}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, caption: str) -> str:
    """A <figure> with the PNG inline and ``caption`` (HTML) below it."""
    alt = re.sub(r"<[^>]+>", "", caption)
    return f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(alt)}\"><figcaption>{caption}</figcaption></figure>"


def page(title: str, intro: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: ``sections`` are (id, heading, HTML); a table of contents links them."""
    nav = " · ".join(f"<a href='#{sid}'>{esc(head)}</a>" for sid, head, _ in sections)
    body = "\n".join(f"<section id='{sid}'><h2>{esc(head)}</h2>\n{content}</section>" for sid, head, content in sections)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body data-figures='pending'>\n"
            f"<h1>{esc(title)}</h1>\n{intro}\n<p class='muted'>{nav}</p>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")
