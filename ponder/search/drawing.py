"""A picture of a search tree (``Result.details["tree"]`` of beam, dvts, particles, astar) that a person can read.

The tree is drawn left to right, one column per step: each node is a box with the start of its step, its value and
its tokens; the box's colour is the value (red 0, yellow 0.5, green 1; grey when unscored). Pruned nodes are faded
with a dashed border, cut ones dotted, finished solutions have a thick border and show their answer, and the chosen
path is drawn in blue. Hovering a box shows the whole step and its record (an SVG ``<title>``: no script needed).
Leaves take one row each, in the order the search created them, and a parent sits level with the middle of its
children, so a tree of a hundred nodes stays readable.

``write(path, tree, caption)`` writes ``.svg`` (the drawing alone) or ``.html`` (the drawing, a legend, and the chosen
path's steps in full), both self-contained.
"""

from __future__ import annotations

import colorsys
from html import escape
from pathlib import Path

from ..engine.base import PonderError

COLUMN, ROW = 250, 46  # pixels per depth and per leaf
BOX_WIDTH, BOX_HEIGHT = 220, 38
MARGIN = 12
LABEL_CHARS = 34
CHOSEN = "#1f5fbf"
STROKES = {"pruned": "stroke-dasharray='5 3' opacity='0.55'", "cut": "stroke-dasharray='2 2' opacity='0.7'"}


def colour(value: float | None) -> str:
    """Red (0) through yellow (0.5) to green (1), light enough to read text on; grey for no value."""
    if value is None:
        return "#dddddd"
    red, green, blue = colorsys.hls_to_rgb(max(0.0, min(1.0, value)) / 3, 0.78, 0.7)  # hue 0 (red) .. 1/3 (green)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def _label(node: dict) -> str:
    if node["parent"] is None:
        return "question"
    text = " ".join(node["step"].split()) or "(end)"
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"


def _facts(node: dict) -> str:
    value = "" if node["value"] is None else f"{node['value']:.2f} · "
    answer = f" · → {node['answer']}" if node["answer"] is not None else ""
    return f"{value}{node['tokens']} tok · {node['status']}{answer}"


def layout(tree: dict) -> dict[int, tuple[float, float]]:
    """The (x, y) of each node's box: x by depth; leaves one row each in creation order (depth first), parents level
    with the middle of their children."""
    children: dict[int | None, list[int]] = {}
    for node in tree["nodes"]:
        children.setdefault(node["parent"], []).append(node["id"])
    depth = {node["id"]: node["depth"] for node in tree["nodes"]}
    places: dict[int, tuple[float, float]] = {}
    next_row = 0

    def place(node_id: int) -> float:
        nonlocal next_row
        below = children.get(node_id, [])
        if below:
            rows = [place(child) for child in below]
            row = (rows[0] + rows[-1]) / 2
        else:
            row, next_row = next_row, next_row + 1
        places[node_id] = (MARGIN + depth[node_id] * COLUMN, MARGIN + row * ROW)
        return row

    for root in children.get(None, []):
        place(root)
    return places


def to_svg(tree: dict) -> str:
    places = layout(tree)
    chosen = set(tree.get("chosen", []))
    width = max((x for x, _ in places.values()), default=0) + BOX_WIDTH + MARGIN
    height = max((y for _, y in places.values()), default=0) + BOX_HEIGHT + MARGIN
    edges, boxes = [], []
    for node in tree["nodes"]:
        x, y = places[node["id"]]
        if node["parent"] is not None:
            px, py = places[node["parent"]]
            on_path = node["id"] in chosen and node["parent"] in chosen
            start, end, bend = (px + BOX_WIDTH, py + BOX_HEIGHT / 2), (x, y + BOX_HEIGHT / 2), (COLUMN - BOX_WIDTH) / 2
            stroke = f"stroke='{CHOSEN}' stroke-width='3'" if on_path else "stroke='#999' stroke-width='1'"
            edges.append(f"<path d='M{start[0]},{start[1]} C{start[0] + bend},{start[1]} {end[0] - bend},{end[1]} "
                         f"{end[0]},{end[1]}' fill='none' {stroke}/>")
        border = CHOSEN if node["id"] in chosen else "#555"
        thickness = 3 if node["status"] == "finished" or node["id"] in chosen else 1
        details = (f"node {node['id']}, depth {node['depth']}: {_facts(node)}\n"
                   f"score {node['score']}, value {node['value']}\n\n{node['step']}")
        boxes.append(
            f"<g><title>{escape(details)}</title>"
            f"<rect x='{x}' y='{y}' width='{BOX_WIDTH}' height='{BOX_HEIGHT}' rx='5' fill='{colour(node['value'])}' "
            f"stroke='{border}' stroke-width='{thickness}' {STROKES.get(node['status'], '')}/>"
            f"<text x='{x + 6}' y='{y + 15}' font-size='12'>{escape(_label(node))}</text>"
            f"<text x='{x + 6}' y='{y + 31}' font-size='11' fill='#333'>{escape(_facts(node))}</text></g>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' font-family='sans-serif'>\n"
            + "\n".join(edges + boxes) + "\n</svg>\n")


def to_html(tree: dict, caption: str = "") -> str:
    by_id = {node["id"]: node for node in tree["nodes"]}
    path_steps = "".join(f"<li><pre>{escape(by_id[i]['step'])}</pre><small>{escape(_facts(by_id[i]))}</small></li>"
                         for i in tree.get("chosen", []) if by_id[i]["parent"] is not None)
    legend = " ".join(f"<span style='background:{colour(v)};padding:2px 8px'>{v:g}</span>"
                      for v in (0, 0.25, 0.5, 0.75, 1))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ponder search tree</title>
<style>body{{font-family:sans-serif;margin:1.5em}} pre{{white-space:pre-wrap;margin:0.2em 0}}
.tree{{overflow:auto;border:1px solid #ccc}}</style></head><body>
<h1>Search tree</h1>
<p>{escape(caption)}</p>
<p>{len(tree['nodes'])} nodes. Colour = value: {legend}. Blue = the chosen path; thick border = a finished solution;
dashed = pruned; dotted = cut (budget or step limit). Hover a box for its whole step.</p>
<div class="tree">{to_svg(tree)}</div>
<h2>The chosen path</h2>
<ol>{path_steps or "<li>(no solution was chosen)</li>"}</ol>
</body></html>
"""


def check_path(path: Path) -> Path:
    """``path`` if it names a file this module writes (``.html`` or ``.svg``); else a ``PonderError``."""
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".html"):
        raise PonderError(f"a tree is written as .html or .svg, not {path.name!r}")
    return path


def write(path: Path, tree: dict, caption: str = "") -> None:
    """Write ``tree`` to ``path``: an ``.svg`` drawing or an ``.html`` page."""
    path = check_path(path)
    text = to_svg(tree) if path.suffix.lower() == ".svg" else to_html(tree, caption)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise PonderError(f"{path}: {e.strerror}") from None
