"""Progress outside a terminal (nohup, a sweep agent's log): a line every 30 s with the phase, how
far, img/s and the time left; a bar in a terminal; nothing on ranks that do not print."""

from __future__ import annotations

import io

from tqdm import tqdm

from data.progress import LogProgress, batch_size_of, progress


class FakeClock:
    """Each reading is `step` seconds after the one before (no sleeping)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_log_gets_a_line_every_30_seconds_with_rate_and_time_left():
    stream = io.StringIO()
    items = list(progress(range(10), "epoch 3 train", 10, per_item=64, stream=stream, clock=FakeClock(10.0)))
    assert items == list(range(10))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # 100 s of work: at 30, 60 and 90 s
    assert lines[0].startswith("epoch 3 train: 3/10 (") and "img/s" in lines[0] and "left)" in lines[0]
    # 3 batches of 64 in the first 30 s of work
    assert "6.4 img/s" in lines[0] and "0:70 left" not in lines[0] and "1:10 left" in lines[0]


def test_a_short_phase_prints_nothing_and_a_silent_rank_nothing_at_all():
    stream = io.StringIO()
    list(progress(range(5), "test", 5, stream=stream, clock=FakeClock(1.0)))
    list(progress(range(5), "test", 5, stream=stream, clock=FakeClock(100.0), show=False))
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_bar_and_manual_updates_work_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(range(3), "x", 3, stream=Terminal()), tqdm)
    stream = io.StringIO()
    with progress(desc="decoding train once (37x37)", total=4, unit="img", stream=stream, clock=FakeClock(31.0)) as bar:
        assert isinstance(bar, LogProgress)
        for _ in range(4):
            bar.update(1)
    assert stream.getvalue().count("decoding train once") == 4


def test_batch_size_of_every_loader_kind(tiny_data):
    import torch

    from data import NatureData, build_eval_transform
    from data.loaders import FeatureBatches, make_loader

    loader = make_loader(NatureData(tiny_data, "test", build_eval_transform(32)), 5, False, torch.device("cpu"), 0, 0)
    assert batch_size_of(loader) == 5
    assert batch_size_of(FeatureBatches(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long), 4, True, 0)) == 4
    assert batch_size_of(range(3)) == 1
