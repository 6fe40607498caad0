"""The strategy registry: every strategy has a description and the shared signature."""

from __future__ import annotations

import inspect

import pytest

from ponder.engine.base import PonderError
from ponder.strategies import DESCRIPTIONS, STRATEGIES, get_strategy


def test_every_strategy_is_described():
    assert set(DESCRIPTIONS) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_takes_the_shared_keywords(name):
    parameters = inspect.signature(STRATEGIES[name]).parameters
    assert list(parameters)[:2] == ["engine", "question"]
    for keyword in ("n", "params", "seed", "budget"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[keyword].default is not inspect.Parameter.empty
    assert parameters["budget"].default is None


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(PonderError, match="adaptive, deepconf"):
        get_strategy("beam-of-light")
