"""GroupReservoir: a uniform sample of everything seen, however it was batched."""

import numpy as np
import torch

from quantcore.observers.reservoir import GroupReservoir


def test_reservoir_is_uniform_across_batches():
    """10k zeros then 30k ones: a uniform sample of all 40k is ~75 % ones, whatever the batching."""
    fractions = []
    for seed in range(5):
        r = GroupReservoir(capacity=4000, seed=seed)
        r.add(torch.zeros(3, 10_000))
        for _ in range(3):
            r.add(torch.ones(3, 10_000))
        assert r.values.shape == (3, 4000)
        fractions.append(r.values.mean().item())
    # hypergeometric sd of one draw ≈ 0.0065
    assert abs(np.mean(fractions) - 0.75) < 0.01
    # a batch larger than the reservoir is subsampled, not truncated
    r = GroupReservoir(capacity=100, seed=0)
    r.add(torch.arange(10_000.0)[None])
    assert r.values.shape == (1, 100) and r.values.max() > 5000
