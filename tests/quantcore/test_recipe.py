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


def _stage(**overrides) -> dict:
    return {"algorithm": "rtn", "weights": {"bits": 4, "granularity": "group", "group_size": 64}, **overrides}


@pytest.mark.parametrize(
    "recipe, field",
    [
        ({"stages": [_stage()] * 9}, "stages"),
        ({"name": "n" * 129, "stages": [_stage()]}, "name"),
        ({"stages": [_stage(weights={"bits": 4, "granularity": "group", "group_size": 8193})]}, "group_size"),
        ({"stages": [_stage(ignore=[f"layer{i}" for i in range(257)])]}, "ignore"),
        ({"stages": [_stage(ignore=["x" * 257])]}, "ignore"),
        ({"stages": [_stage(algorithm="a" * 65)]}, "algorithm"),
        ({"stages": [_stage(algorithm="adaround", options={"iterations": 100_001})]}, "options.iterations"),
        ({"stages": [_stage(algorithm="adaround", options={"batch_rows": 2**21})]}, "options.batch_rows"),
        ({"stages": [_stage(algorithm="awq", options={"clip_exclude": ["*"] * 65})]}, "options.clip_exclude"),
    ],
    ids=["9 stages", "long name", "group 8193", "257 ignores", "long pattern", "long algorithm", "iterations",
         "batch_rows", "clip_exclude"],
)
def test_a_recipe_asking_for_unbounded_work_is_refused_naming_the_field(recipe, field):
    with pytest.raises(ValidationError) as refusal:
        Recipe.model_validate(recipe)
    assert field in str(refusal.value)


def test_the_largest_recipe_within_bounds_is_accepted():
    recipe = Recipe.model_validate({"name": "n" * 128, "stages": [_stage(ignore=["x" * 256] * 256)] * 8})
    assert len(recipe.stages) == 8
    assert Recipe.model_validate({"stages": [_stage(weights={"bits": 4, "granularity": "group", "group_size": 8192})]})


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("re:(a+)+$", "inside a repetition"),
        ("re:(.*a)*b", "inside a repetition"),
        ("re:(q|qq)+$", "alternation inside"),
        ("re:" + ".*" * 4 + "x", "more than 3"),
        ("re:(a)\\1", "backreferences"),
        ("re:(unclosed", "not a regular expression"),
    ],
)
def test_an_ignore_regex_that_could_take_exponential_time_is_refused(pattern, words):
    with pytest.raises(ValidationError, match=r"ignore\[1\]") as refusal:
        Recipe.model_validate({"stages": [_stage(ignore=["lm_head", pattern])]})
    assert words in str(refusal.value)


def test_ordinary_ignore_regexes_are_accepted_and_match():
    from quantcore.targets import is_ignored

    patterns = ["re:layers\\.(0|1)\\..*_proj$", "re:.*self_attn\\.[qk]_proj", "re:^model\\.layers\\.\\d+\\.mlp\\.down_proj$"]
    stage = Recipe.model_validate({"stages": [_stage(ignore=patterns)]}).stages[0]
    assert is_ignored("model.layers.1.self_attn.v_proj", stage.ignore)
    assert is_ignored("model.layers.7.mlp.down_proj", stage.ignore)
    assert not is_ignored("model.layers.7.mlp.up_proj", stage.ignore)
