"""Distribution statistics against hand-computed values."""
import torch

from algorithms.distributional import crps, cvar_lower, cvar_upper, interval_coverage, tail_curvature


def test_cvar_of_a_known_sample_set():
    z = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.0, 7.0, 6.0, 8.0]])  # sorted 0,1,2,...,8,10
    assert cvar_lower(z, 0.1).item() == 0.0  # ceil(1.0) = 1 sample
    assert cvar_lower(z, 0.25).item() == 1.0  # ceil(2.5) = 3 samples: (0+1+2)/3
    assert cvar_upper(z, 0.2).item() == 9.0  # (8+10)/2


def test_tail_curvature_counts_only_tail_second_differences():
    z = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0, 9.0])  # second differences at 1..4: 0, 1, 2, -3
    # alpha = 0.34 -> k = 3: tail indices 1, 2 (< 3) and 3, 4 (>= 6-3): all four
    assert tail_curvature(z, 0.34).item() == 0 + 1 + 4 + 9
    # alpha = 0.2 -> k = 2: indices 1 (< 2) and 4 (>= 4)
    assert tail_curvature(z, 0.2).item() == 0 + 9


def test_crps_hand_computed_and_zero_for_a_point_mass_at_the_target():
    s = torch.tensor([0.0, 2.0])
    # E|X - 1| = 1; E|X - X'| over 4 pairs = (0 + 2 + 2 + 0)/4 = 1 -> 1 - 0.5 = 0.5
    assert crps(s, torch.tensor(1.0)).item() == 0.5
    assert crps(torch.full((8,), 3.0), torch.tensor(3.0)).item() == 0.0


def test_interval_coverage():
    s = torch.arange(11.0)  # quantiles 0.1 -> 1.0, 0.9 -> 9.0
    assert interval_coverage(s, torch.tensor(5.0)).item() == 1.0
    assert interval_coverage(s, torch.tensor(9.5)).item() == 0.0
    batch = torch.stack([s, s + 100])
    assert interval_coverage(batch, torch.tensor([1.0, 50.0])).tolist() == [1.0, 0.0]
