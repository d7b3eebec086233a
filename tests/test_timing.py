"""The speed statistics the benchmarks report (no timing assertions: pure arithmetic)."""
from tokenopt.timing import per_round_speedup


def test_per_round_speedup_cancels_drift():
    # the machine slows down 3x after two rounds; within each round the model is 2x faster
    times = {"original": [1.0, 1.0, 3.0, 3.0, 3.0], "fast": [0.5, 0.5, 1.5, 1.5, 1.5]}
    assert per_round_speedup(times, "original") == {"original": 1.0, "fast": 2.0}


def test_per_round_speedup_is_a_median_of_ratios():
    times = {"original": [2.0, 2.0, 2.0], "m": [1.0, 4.0, 0.5]}   # ratios 2, 0.5, 4
    assert per_round_speedup(times, "original")["m"] == 2.0
