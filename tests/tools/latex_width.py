"""The natural width of a LaTeX tabular, measured with Computer Modern's metrics (matplotlib's cm*10 fonts),
for machines without ``pdflatex``: ``python tests/tools/latex_width.py TABLE.tex [--limit-pt 650]``.

Each cell's text is set in cmr10 at 10 pt (bold in cmb10, widened by 10% as cmbx10 is wider;
``\\scriptsize`` at 7 pt, widened by 13% as cmr7 is; math signs at their cmsy10 widths); a column is as wide
as its widest cell plus ``2 \\tabcolsep`` (6 pt each side); ``\\multicolumn`` cells widen their columns when
they are wider than the columns together. Within 1.5% of pdflatex on the demo's tables. A landscape US-letter
page with 1-inch margins is 9 in = 650 pt wide. Exit 1 when the table is wider.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib
from matplotlib.ft2font import FT2Font

FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
TABCOLSEP = 6.0
PAGE_PT = 9 * 72.27
CMR7_WIDER = 1.13  # cmr7 is designed wider than cmr10 scaled to 7 pt
_font_cache: dict[str, FT2Font] = {}


def _font(name: str) -> FT2Font:
    if name not in _font_cache:
        _font_cache[name] = FT2Font(str(FONTS / f"{name}.ttf"))
    return _font_cache[name]


def text_width(text: str, size: float = 10.0, bold: bool = False) -> float:
    if not text:
        return 0.0
    font = _font("cmb10" if bold else "cmr10")
    font.set_size(size, 72.27)
    font.set_text(text, 0.0)
    width = font.get_width_height()[0] / 64.0
    return width * (1.1 if bold else 1.0)


def cell_width(cell: str) -> float:
    """A cell's width: ``\\textbf``, ``\\underline``, ``\\emph``, ``\\scriptsize`` groups, ``$\\pm$``, ``$-$``,
    ``$+$``, superscripts and ``\\quad`` are understood; other commands are dropped."""
    bold = r"\textbf{" in cell
    width = 0.0
    small = re.findall(r"\{\\scriptsize ([^{}]*)\}", cell)
    cell = re.sub(r"\{\\scriptsize [^{}]*\}", "", cell)
    for part in small:
        width += _plain_width(part, 7.0, False) * CMR7_WIDER
    return width + _plain_width(cell, 10.0, bold)


def _plain_width(text: str, size: float, bold: bool) -> float:
    width = 0.0
    for sign in (r"$\pm$", "$-$", "$+$"):
        width += text.count(sign) * 7.78 * size / 10
        text = text.replace(sign, "")
    for sup in re.findall(r"\$\^\{([^}]*)\}\$", text):
        width += text_width(sup, size * 0.7)
    text = re.sub(r"\$\^\{[^}]*\}\$", "", text)
    width += text.count(r"\quad") * size
    text = text.replace(r"\quad", "")
    text = re.sub(r"\\(textbf|underline|emph|textit)\{", "", text).replace("}", "").replace("{", "")
    text = re.sub(r"\\([_%&#])", r"\1", text)
    text = re.sub(r"\\[a-zA-Z]+", "", text)
    return width + text_width(text.strip(), size, bold)


def tabular_width(tex: str) -> float:
    """The natural width in pt of the (first) tabular in ``tex``."""
    body = tex.split(r"\begin{tabular}", 1)[1].split(r"\end{tabular}", 1)[0]
    spec, body = body.split("}", 1)
    columns = len(re.sub(r"[^lcr]", "", spec))
    widths = [0.0] * columns
    spans: list[tuple[int, int, float]] = []
    for line in body.split(r"\\"):
        line = re.sub(r"\\(toprule|midrule|bottomrule)|\\cmidrule\([a-z]*\)\{[^}]*\}", "", line).strip()
        if not line:
            continue
        col = 0
        for cell in line.split(" & "):
            match = re.match(r"\\multicolumn\{(\d+)\}\{[lcr]\}\{(.*)\}$", cell.strip())
            if match:
                n = int(match.group(1))
                spans.append((col, n, cell_width(match.group(2))))
                col += n
                continue
            if col < columns:
                widths[col] = max(widths[col], cell_width(cell.strip()))
            col += 1
    for start, n, width in spans:
        have = sum(widths[start : start + n]) + 2 * TABCOLSEP * (n - 1)
        if width > have:
            widths[start + n - 1] += width - have
    return sum(widths) + 2 * TABCOLSEP * columns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="a .tex file holding a tabular")
    parser.add_argument("--limit-pt", type=float, default=PAGE_PT, help="the text width (landscape letter, 1in)")
    args = parser.parse_args()
    width = tabular_width(Path(args.table).read_text(encoding="utf-8"))
    fits = width <= args.limit_pt
    verdict = "fits" if fits else "too wide"
    print(f"{args.table}: {width:.0f} pt wide; the page's text is {args.limit_pt:.0f} pt: {verdict}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
