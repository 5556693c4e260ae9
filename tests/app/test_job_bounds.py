"""No submission can ask for unbounded work: every size, count and step a job takes has an
upper bound, and a request past one is a 422 naming the field, with no job stored."""

import pytest

PROBLEM = "https://qforge.dev/problems/"
MODEL = "bundled:smollm2-135m"


def recipe_job(**overrides) -> dict:
    return {"model": MODEL, "recipe": "w4a16-rtn-g64", **overrides}


def rtn(**weights) -> dict:
    return {"stages": [{"algorithm": "rtn", "weights": {"bits": 4, "granularity": "group", "group_size": 64, **weights}}]}


CASES = {
    "stages": (recipe_job(recipe={"stages": rtn()["stages"] * 9}), "recipe.stages"),
    "group_size": (recipe_job(recipe=rtn(group_size=1 << 20)), "recipe.stages.0.weights.group_size"),
    "bits": (recipe_job(recipe=rtn(bits=64)), "recipe.stages.0.weights"),
    "exponential ignore regex": (
        recipe_job(recipe={"stages": [{**rtn()["stages"][0], "ignore": ["re:(.*)+x"]}]}), "recipe.stages.0.ignore"),
    "gptq block_size": (
        recipe_job(recipe={"stages": [{**rtn()["stages"][0], "algorithm": "gptq", "options": {"block_size": 1 << 20}}]}),
        "options.block_size"),
    "calibration samples": (recipe_job(calibration={"num_samples": 4097}), "calibration.num_samples"),
    "calibration seq_len": (recipe_job(calibration={"seq_len": 8193}), "calibration.seq_len"),
    "evaluation tokens": (recipe_job(evaluation={"perplexity_tokens": 2**21}), "evaluation.perplexity_tokens"),
    "evaluation window": (recipe_job(evaluation={"window": 8193}), "evaluation.window"),
    "model ref": (recipe_job(model="org/" + "m" * 5000), "model"),
    "ptq iterations": ({"kind": "ptq", "ptq": {"iterations": 100_001}}, "ptq.iterations"),
    "ptq calibration samples": ({"kind": "ptq", "data": {"calibration_samples": 100_001}}, "data.calibration_samples"),
    "qat epochs": ({"kind": "qat", "qat": {"epochs": 1001}}, "qat.epochs"),
    "qat batch_size": ({"kind": "qat", "qat": {"batch_size": 65_537}}, "qat.batch_size"),
    "finetune epochs": ({"kind": "finetune", "finetune": {"epochs": 1001}}, "finetune.epochs"),
}


@pytest.mark.parametrize("body, field", CASES.values(), ids=CASES.keys())
def test_a_request_for_unbounded_work_is_422_naming_the_field(submit, job_count, body, field):
    response = submit(body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == PROBLEM + "validation-error"
    assert field in problem["detail"], problem["detail"]
    assert job_count() == 0
