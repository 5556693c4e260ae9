"""Recipe parsing: presets, YAML, JSON, and the errors a user sees."""

import json

import pytest
from pydantic import ValidationError

from quantcore.recipe import PRESETS, Recipe, list_presets

YAML = """
name: mine
stages:
  - algorithm: rtn
    ignore: [lm_head, "re:layers\\\\.0\\\\."]
    weights: {type: int, bits: 4, symmetric: true, granularity: group, group_size: 128}
"""


def test_every_preset_parses_and_round_trips():
    for entry in list_presets():
        recipe = Recipe.parse(entry["name"])
        assert Recipe.parse(recipe.to_yaml()) == recipe
        assert Recipe.parse(json.dumps(recipe.model_dump(mode="json"))) == recipe
    assert {"w4a16-rtn-g64", "w8a8-rtn"} <= set(PRESETS)


def test_yaml_recipe():
    recipe = Recipe.parse(YAML)
    stage = recipe.stages[0]
    assert stage.weights.group_size == 128 and stage.ignore[1] == "re:layers\\.0\\."


@pytest.mark.parametrize(
    "text,message",
    [
        ("w4a16-nope", "unknown preset 'w4a16-nope'"),
        ("stages: [", "neither a preset name nor valid YAML"),
        ("- 1", "must be a mapping"),
        ('{"stages": []}', "at least 1"),
        ('{"stages": [{"algorithm": "rtn", "weights": {"bits": 12}}]}', "bits must be between 2 and 8"),
        ('{"stages": [{"algorithm": "rtn", "weights": {"bits": 4, "granularity": "group"}}]}', "group_size"),
        ('{"stages": [{"algorithm": "rtn", "weights": {"bits": 4, "granularity": "token", "dynamic": false}}]}', "token"),
        ('{"stages": [{"algorithm": "rtn", "weights": {"type": "fp8_e4m3", "bits": 4}}]}', "bits must be 8"),
        ('{"stages": [{"algorithm": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}}]}', "dynamic"),
        ('{"stages": [{"algorithm": "rtn", "weights": {"bits": 4, "observer": "magic"}}]}', "observer"),
    ],
)
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises((ValueError, ValidationError), match=message):
        Recipe.parse(text)
