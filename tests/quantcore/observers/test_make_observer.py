"""make_observer maps every scheme.observer name to its class and rejects the rest."""

import pytest
import torch

from quantcore.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from quantcore.schemes import QuantScheme


@pytest.mark.parametrize(
    "name,cls",
    [
        ("minmax", MinMaxObserver),
        ("moving_average", MovingAverageMinMaxObserver),
        ("percentile", PercentileObserver),
        ("histogram", HistogramObserver),
        ("mse", MSEObserver),
    ],
)
def test_maps_names_to_classes(name, cls):
    scheme = QuantScheme(bits=4, observer=name)
    obs = make_observer(scheme)
    assert type(obs) is cls and isinstance(obs, Observer) and obs.scheme is scheme


def test_default_is_minmax():
    assert type(make_observer(QuantScheme())) is MinMaxObserver


def test_unknown_name_lists_the_choices():
    bad = QuantScheme().model_copy(update={"observer": "magic"})  # model_copy skips validation
    with pytest.raises(ValueError, match="unknown observer 'magic'") as err:
        make_observer(bad)
    for name in ("minmax", "moving_average", "percentile", "histogram", "mse"):
        assert name in str(err.value)


def test_options_reach_the_constructor():
    obs = make_observer(QuantScheme(observer="histogram"), bins=64)
    assert obs.bins == 64
    with pytest.raises(TypeError):
        make_observer(QuantScheme(observer="minmax"), bins=64)


@pytest.mark.parametrize("name", ["minmax", "moving_average", "percentile", "histogram", "mse"])
def test_lifecycle(name):
    obs = make_observer(QuantScheme(bits=4, granularity="channel", observer=name))
    with pytest.raises(RuntimeError, match="update"):
        obs.qparams()
    obs.update(torch.randn(6, 16))
    with pytest.raises(ValueError, match="one observer per tensor"):
        obs.update(torch.randn(5, 16))
    obs.reset()
    obs.update(torch.ones(5, 3))  # after reset, a new tensor is welcome
    assert obs.qparams().scale.shape == (5, 1)


def test_observer_is_abstract():
    with pytest.raises(TypeError):
        Observer(QuantScheme())  # type: ignore[abstract]


def test_weight_workflow_like_rtn():
    """What quantcore.algorithms.rtn does: one update with a weight, then qparams."""
    w = torch.randn(16, 64)
    for name in ("minmax", "moving_average", "percentile", "histogram", "mse"):
        obs = make_observer(QuantScheme(bits=4, granularity="group", group_size=32, observer=name))
        obs.update(w)
        assert obs.qparams().scale.shape == (16, 2, 1)
