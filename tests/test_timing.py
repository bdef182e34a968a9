"""Frame timing on hand-made timestamps: the slots a file's frames fill."""

from fractions import Fraction

import pytest

from tokenflow.timing import MAX_GAP, plan


def fill(timeline, times):
    return [(slot, frame) for slot, _, frame in timeline.fill((t, i) for i, t in enumerate(times))]


def test_constant_rate_gives_one_frame_per_slot_at_the_header_rate():
    times = [5 + i * 0.033 + (0.001 if i % 3 == 2 else 0) for i in range(30)]  # ms clock at 29.97 fps
    t = plan(times, 0.033, Fraction(30000, 1001))
    assert t.rate == Fraction(30000, 1001) and t.even and t.slots == 30 and t.start == 5
    assert fill(t, times) == [(i, i) for i in range(30)]


def test_variable_rate_is_resampled_to_its_average_rate_by_nearest_frame():
    times = [i / 30 for i in range(6)] + [0.2 + i / 10 for i in range(6)]  # 30 fps, then 10 fps
    t = plan(times, 0.1, Fraction(30))  # the header's nominal 30 fps is not what plays
    assert not t.even and t.slots == 12 and t.duration == pytest.approx(0.8)
    assert float(t.rate) == pytest.approx(12 / 0.8, rel=1e-3)
    got = fill(t, times)
    assert [slot for slot, _ in got] == list(range(12))
    for slot, frame in got:  # each slot shows the frame nearest to its time
        assert abs(times[frame] - t.time(slot)) == min(abs(x - t.time(slot)) for x in times)


def test_missing_frames_are_stood_in_for_inside_and_left_out_at_the_ends():
    times = [i / 10 for i in range(10)]
    t = plan(times, 0.1, Fraction(10))
    decoded = [0.1, 0.2, 0.3, 0.5, 0.6]  # 0 did not decode, nor 4 (middle), nor 7..9 (the tail)
    got = [(slot, round(frame, 1)) for slot, _, frame in t.fill((x, x) for x in decoded)]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # no frozen head or tail
    assert dict(got)[4] in (0.3, 0.5)  # a neighbour stands in for the lost middle frame


def test_untrustworthy_timestamps_give_no_timeline():
    assert plan([0.0, 0.1, 0.1, 0.2], 0.1, Fraction(10)) is None  # two frames at one time
    assert plan([0.0, 0.1, 0.2 + MAX_GAP + 1], 0.1, Fraction(10)) is None  # the clock jumps
    assert plan([], 0.0, Fraction(10)) is None
    one = plan([3.0], 0.0, Fraction(25))
    assert one.slots == 1 and one.rate == 25
