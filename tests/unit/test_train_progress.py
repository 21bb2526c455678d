"""The training progress bar and log line (pure functions; no ComfyUI)."""

import io
import logging

from dreamcache_core.train.loop import ProgressLog, format_duration, progress_bar_line


def test_bar_line_fills_with_steps():
    line = progress_bar_line(120, 200, 0.102314, 3.2, 25.0, width=10)
    assert line == "[######----] 120/200 loss 0.10231 3.20 samples/s ETA 0:00:25"


def test_bar_line_full_and_empty():
    assert progress_bar_line(0, 200, 1.0, 0.0, 0.0, width=4).startswith("[----] 0/200")
    assert progress_bar_line(200, 200, 1.0, 0.0, 0.0, width=4).startswith("[####] 200/200")


def test_format_duration_hours():
    assert format_duration(3 * 3600 + 5 * 60 + 7.9) == "3:05:07"


def test_progress_draws_bar_every_step(caplog):
    stream = io.StringIO()
    progress = ProgressLog(start_step=0, max_steps=4, global_batch=2, every=2, bar_stream=stream)
    with caplog.at_level(logging.INFO, logger="dreamcache_core.train.loop"):
        for step, loss in enumerate([4.0, 2.0, 1.0, 3.0], start=1):
            progress.update(step, loss)

    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 4
    assert frames[0].startswith("[" + "#" * 7 + "-" * 23 + "] 1/4 loss 4.00000")
    assert frames[1].startswith("[" + "#" * 15 + "-" * 15 + "] 2/4 loss 3.00000")
    assert frames[-1].startswith("[" + "#" * 30 + "] 4/4 loss 2.00000")
    assert frames[-1].endswith("\n")

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("step 2/4  loss 3.00000")
    assert lines[1].startswith("step 4/4  loss 2.00000")


def test_progress_without_stream_only_logs(caplog):
    progress = ProgressLog(start_step=0, max_steps=2, global_batch=1, every=1)
    with caplog.at_level(logging.INFO, logger="dreamcache_core.train.loop"):
        progress.update(1, 0.5)
        progress.update(2, 0.25)
    assert [record.getMessage().split("  ")[0] for record in caplog.records] == ["step 1/2", "step 2/2"]
