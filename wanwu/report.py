"""Small, dependency-light HTML reports: one self-contained page of sections, tables and saved figures.

The quality stage writes its report with these helpers and the pipeline run report reuses them, so the API stays
small: :func:`render_page` (title + sections → HTML string), :func:`write_page` (atomically to a file),
:func:`save_figure` (a matplotlib figure → PNG, closed), :func:`table_html`, :func:`figure_html`, :func:`badge`
and :func:`setup_plotting` (the CJK font, so Chinese class names render as glyphs, not empty boxes).
Pages embed no scripts and load nothing from the network: they open from a file, offline.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",system-ui,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;line-height:1.45;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.sub{color:#666;margin-top:0}.note{color:#555;font-size:.92rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#11772d;font-weight:600}.bad{color:#b3261e;font-weight:600}.warn{color:#8a5a00;font-weight:600}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.6rem;color:#fff;font-weight:600}
.badge.ok{background:#11772d}.badge.bad{background:#b3261e}.badge.warn{background:#b07a00}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
figure img{max-width:520px;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
nav a{margin-right:1rem}code{background:#f6f6f6;padding:0 .2rem}
"""


@dataclass
class Section:
    """One titled part of a page. ``body`` is trusted HTML (build it with the helpers here, which escape)."""

    title: str
    body: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png path, caption)
    note: str = ""  # plain text, escaped


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for people: floats to a few significant digits, None as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def badge(ok: bool | None, text: str | None = None) -> str:
    kind = "warn" if ok is None else ("ok" if ok else "bad")
    label = text if text is not None else {"ok": "passed", "bad": "failed", "warn": "n/a"}[kind]
    return f'<span class="badge {kind}">{esc(label)}</span>'


def table_html(
    rows: Iterable[Mapping[str, Any]] | Any,
    columns: Sequence[str] | None = None,
    *,
    raw_columns: Sequence[str] = (),
    max_rows: int | None = None,
) -> str:
    """Rows (dicts or a pandas DataFrame) → an HTML table; values escaped unless their column is in raw_columns."""
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    shown = rows if max_rows is None else rows[:max_rows]
    out = ["<table><thead><tr>", *(f"<th>{esc(c)}</th>" for c in columns), "</tr></thead><tbody>"]
    for r in shown:
        out.append("<tr>")
        for c in columns:
            v = r.get(c)
            num = isinstance(v, int | float) and not isinstance(v, bool)
            cell = str(v) if c in raw_columns else esc(fmt(v))
            out.append(f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if max_rows is not None and len(rows) > max_rows:
        out.append(f'<p class="note">… {len(rows) - max_rows} more rows not shown.</p>')
    return "".join(out)


def kv_table(items: Mapping[str, Any]) -> str:
    """A two-column key/value table."""
    return table_html([{"": k, "value": v} for k, v in items.items()], ["", "value"])


def figure_html(path: Path, base: Path, caption: str = "") -> str:
    """An <img> for a saved figure, linked relative to the page's folder ``base``."""
    rel = os.path.relpath(Path(path), Path(base)).replace(os.sep, "/")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><a href="{esc(rel)}"><img src="{esc(rel)}" alt="{esc(caption)}"></a>{cap}</figure>'


def setup_plotting(root: Path) -> None:
    """Agg backend and the project's CJK font, once per process, before the first figure."""
    from wanwu.offline import cjk_font, register_matplotlib_font

    register_matplotlib_font(cjk_font(Path(root)))


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG (parents created) and close it, so long runs do not pile up figures."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def render_page(
    title: str,
    sections: Sequence[Section],
    *,
    subtitle: str = "",
    base: Path | None = None,
    links: Mapping[str, str] | None = None,
) -> str:
    """A whole HTML page. Figures are linked relative to ``base`` (the folder the page is written to)."""
    base = Path(base) if base is not None else Path(".")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html lang='zh-CN'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p class='sub'>{esc(subtitle) + ' · ' if subtitle else ''}written {stamp}</p>",
    ]
    if links:
        parts.append("<nav>" + "".join(f'<a href="{esc(href)}">{esc(text)}</a>' for text, href in links.items()))
        parts.append("</nav>")
    for s in sections:
        parts.append(f"<section><h2>{esc(s.title)}</h2>")
        if s.note:
            parts.append(f"<p class='note'>{esc(s.note)}</p>")
        if s.body:
            parts.append(s.body)
        for fig_path, caption in s.figures:
            parts.append(figure_html(fig_path, base, caption))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: Path, title: str, sections: Sequence[Section], **kwargs: Any) -> Path:
    """Render and write a page atomically (a half-written report never looks complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_page(title, sections, base=path.parent, **kwargs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
