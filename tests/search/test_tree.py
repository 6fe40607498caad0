"""The picture of a search tree: one box per node coloured by value, the chosen path highlighted, as SVG or HTML; and
``ponder ask --tree`` (on the fake engine)."""

from __future__ import annotations

import asyncio
import math
import xml.etree.ElementTree as ET

import pytest

from ponder import cli
from ponder.engine.base import PonderError, SamplingParams
from ponder.engine.fake import FakeEngine, FakeModel
from ponder.search.scorers import JUDGE_TURN
from ponder.strategies import beam
from ponder.search.drawing import BOX_HEIGHT, CHOSEN, colour, layout, to_html, to_svg, write

SVG = "{http://www.w3.org/2000/svg}"
SCRIPTS = [f"first {k}\n\nthen {k} & <{k}>\n\nso \\boxed{{{k}}}" for k in range(4)]


def judge(context: str, reply: str) -> float:
    """P(Yes) grows with the digit in the last step, so the searches prefer higher digits."""
    judged = context[:-len(JUDGE_TURN)]
    digit = int(next(c for c in reversed(judged) if c.isdigit()))
    value = 0.2 + 0.2 * digit
    return math.log(value if reply == "Yes" else 1 - value)


def engine() -> FakeEngine:
    return FakeEngine(SCRIPTS, name="qwen2.5-0.5b", models={"qwen2.5-1.5b": FakeModel(["unused"], score_fn=judge)})


@pytest.fixture(scope="module")
def tree() -> dict:
    result = asyncio.run(beam.run(engine(), "q", n=4, m=2, params=SamplingParams(), seed=0))
    return result.details["tree"]


def test_the_svg_has_a_box_per_node_and_the_chosen_path_in_blue(tree):
    svg = ET.fromstring(to_svg(tree))
    boxes = svg.findall(f"{SVG}g/{SVG}rect")
    assert len(boxes) == len(tree["nodes"])
    chosen_edges = [p for p in svg.findall(f"{SVG}path") if p.get("stroke") == CHOSEN]
    assert len(chosen_edges) == len(tree["chosen"]) - 1 >= 3  # question -> three steps
    titles = [g.find(f"{SVG}title").text for g in svg.findall(f"{SVG}g")]
    assert any("then 3 & <3>" in title for title in titles)  # the whole step, escaped and read back
    by_id = {node["id"]: node for node in tree["nodes"]}
    assert [by_id[i]["status"] for i in tree["chosen"]][-1] == "finished"
    for box, node in zip(boxes, tree["nodes"]):
        assert box.get("fill") == colour(node["value"])


def test_colour_runs_from_red_through_yellow_to_green():
    def rgb(value):
        hex_colour = colour(value)
        return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))

    red, yellow, green = rgb(0.0), rgb(0.5), rgb(1.0)
    assert red[0] > red[1] == red[2] and green[1] > green[0] == green[2] and yellow[0] == yellow[1] > yellow[2]
    assert colour(None) == "#dddddd"


def test_parents_sit_level_with_the_middle_of_their_children_and_leaves_do_not_overlap(tree):
    places = layout(tree)
    for node in tree["nodes"]:
        children = [child["id"] for child in tree["nodes"] if child["parent"] == node["id"]]
        if children:
            rows = [places[child][1] for child in children]
            assert places[node["id"]][1] == pytest.approx((rows[0] + rows[-1]) / 2)
            assert all(places[child][0] > places[node["id"]][0] for child in children)
    leaves = sorted(places[n["id"]][1] for n in tree["nodes"] if not any(c["parent"] == n["id"] for c in tree["nodes"]))
    assert all(b - a >= BOX_HEIGHT for a, b in zip(leaves, leaves[1:]))


def test_the_html_page_lists_the_chosen_path_in_full(tree, tmp_path):
    path = tmp_path / "tree.html"
    write(path, tree, "beam · answer: 3 · q")
    page = path.read_text()
    assert page == to_html(tree, "beam · answer: 3 · q")
    assert "<svg" in page and "beam · answer: 3 · q" in page
    assert page.count("<li><pre>") == len(tree["chosen"]) - 1
    assert "then 3 &amp; &lt;3&gt;" in page
    svg_path = tmp_path / "tree.svg"
    write(svg_path, tree)
    assert svg_path.read_text().startswith("<svg")


def test_only_html_and_svg_are_written(tree, tmp_path):
    with pytest.raises(PonderError, match="as .html or .svg"):
        write(tmp_path / "tree.png", tree)


def test_ask_writes_the_tree_of_a_search(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "engine_from_args", lambda args: engine())
    path = tmp_path / "tree.svg"
    assert cli.main(["ask", "q", "--strategy", "beam", "--n", "4", "--option", "m=2", "--tree", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "3"
    assert len(ET.parse(path).getroot().findall(f"{SVG}g")) > 4


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "sc", "--tree", "t.html"], "strategy 'sc' has none; use one of: beam, dvts, particles, astar"),
    (["--strategy", "beam", "--tree", "t.png"], "a tree is written as .html or .svg"),
])
def test_a_tree_it_cannot_write_is_refused_before_the_model_loads(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(cli, "engine_from_args", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["ask", "q", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
