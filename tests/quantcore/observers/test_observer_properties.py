"""Properties every observer keeps, for any scheme and any (finite) input: S > 0 and the grid
covers 0 (qmin ≤ Z ≤ qmax), so zero is exactly representable."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcore.observers import OBSERVERS, make_observer
from quantcore.qparams import fake_quant
from quantcore.schemes import QuantScheme

floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def schemes(draw):
    kind = draw(st.sampled_from(["int", "fp8_e4m3", "fp8_e5m2"]))
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    group_size = 2 if granularity == "group" else None
    observer = draw(st.sampled_from(sorted(OBSERVERS)))
    if kind == "int":
        bits, symmetric = draw(st.integers(2, 8)), draw(st.booleans())
    else:
        bits, symmetric = 8, True
    return QuantScheme(
        type=kind, bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size, observer=observer
    )


@st.composite
def batches(draw):
    """1..3 updates of the same (rows, cols) shape."""
    rows, cols = draw(st.integers(1, 3)), 2 * draw(st.integers(1, 6))  # even: group_size 2 divides it
    n = draw(st.integers(1, 3))
    values = st.lists(floats, min_size=rows * cols, max_size=rows * cols)
    return [torch.tensor(draw(values), dtype=torch.float32).reshape(rows, cols) for _ in range(n)]


@settings(max_examples=150, deadline=None)
@given(scheme=schemes(), xs=batches())
def test_scale_positive_and_grid_contains_zero(scheme, xs):
    obs = make_observer(scheme)
    for x in xs:
        obs.update(x)
    lo, hi = obs.range()
    assert (lo <= hi).all()
    qp = obs.qparams()
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    assert (qp.zero_point >= qp.qmin).all() and (qp.zero_point <= qp.qmax).all()
    # zero is on the grid: it survives a round trip exactly
    assert (fake_quant(torch.zeros_like(xs[0]), qp) == 0).all()
