from quantcore.recipe import PRESETS


def test_presets_lists_every_named_recipe(client):
    response = client.get("/v1/recipes/presets")
    assert response.status_code == 200
    presets = {p["name"]: p for p in response.json()}
    assert set(presets) == set(PRESETS)
    g64 = presets["w4a16-rtn-g64"]
    assert g64["description"]
    assert g64["recipe"]["stages"][0]["weights"]["group_size"] == 64
