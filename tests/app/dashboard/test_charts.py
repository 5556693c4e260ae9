"""The per-layer error chart: one bar per layer, its height the layer's relative weight
error 10^(-SQNR/20) on a linear axis; valid SVG whatever the layer names hold."""

import math
import xml.etree.ElementTree as ET

import pytest

from app.dashboard.charts import PLOT_H, layer_error_svg, layer_errors, nice_ceiling

SVG = "{http://www.w3.org/2000/svg}"


def bars(svg: str) -> list[ET.Element]:
    return [e for e in ET.fromstring(svg).iter(f"{SVG}rect") if e.get("class") == "bar"]


def test_bar_heights_are_in_proportion_to_the_layers_errors(known_report):
    # 20 dB, 40 dB and 26.02 dB are relative errors of 10 %, 1 % and 5 %
    svg = str(layer_error_svg(layer_errors(known_report["layers"]), "c"))
    heights = [float(b.get("height")) for b in bars(svg)]
    assert len(heights) == 3
    assert heights[0] == pytest.approx(PLOT_H)  # 10 % is the top of the axis
    assert heights[1] / heights[0] == pytest.approx(0.1, rel=1e-4)
    assert heights[2] / heights[0] == pytest.approx(0.5, rel=1e-4)
    bottoms = {round(float(b.get("y")) + float(b.get("height")), 3) for b in bars(svg)}
    assert len(bottoms) == 1  # all bars stand on the same axis
    names = [b.get("data-layer") for b in bars(svg)]
    assert names == [layer["name"] for layer in known_report["layers"]]
    assert "SQNR 26.02 dB, relative error 5 %" in svg


def test_charts_on_a_shared_scale_keep_the_same_proportion_to_it(known_report):
    errors = layer_errors(known_report["layers"])
    heights = [float(b.get("height")) for b in bars(str(layer_error_svg(errors, "c", y_max=0.2)))]
    assert heights[0] == pytest.approx(PLOT_H / 2)  # 10 % of a 20 % axis
    labels = [t.text for t in ET.fromstring(str(layer_error_svg(errors, "c", y_max=0.2))).iter(f"{SVG}text")]
    assert "20 %" in labels and "10 %" in labels


def test_a_lossless_layer_has_no_bar_height():
    errors = layer_errors([{"name": "a", "sqnr_db": math.inf}, {"name": "b", "sqnr_db": 20.0}])
    assert [e.error for e in errors] == [0.0, pytest.approx(0.1)]
    assert float(bars(str(layer_error_svg(errors, "c")))[0].get("height")) == 0


@pytest.mark.parametrize("value, top", [(0.1, 0.1), (0.13, 0.2), (0.07, 0.1), (0.021, 0.025), (3.0, 5.0), (0.0, 1.0)])
def test_the_axis_top_is_a_round_number_at_or_above_the_largest_error(value, top):
    assert nice_ceiling(value) == pytest.approx(top)


def test_reports_without_sqnr_draw_nothing():
    # a classic CNN report describes each layer's bits, not its error
    assert layer_errors([{"name": "conv1", "weight": {"bits": 4}}]) == []
    assert str(layer_error_svg([], "c")) == ""


def test_layer_names_are_escaped():
    svg = str(layer_error_svg(layer_errors([{"name": 'x"><script>alert(1)</script>', "sqnr_db": 10.0}]), "c"))
    bar = bars(svg)[0]  # still parses as XML
    assert bar.get("data-layer") == 'x"><script>alert(1)</script>'
    assert "<script>" not in svg
