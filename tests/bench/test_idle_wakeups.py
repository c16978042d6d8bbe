import subprocess
import sys

import pytest

from bench.idle_wakeups import main, wakeups


def test_wakeups_counts_a_process_that_sleeps_10_ms_at_a_time():
    # Each 10 ms sleep is one wake-up: at most 100 a second, fewer when the box is busy.
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        rows = wakeups(1.0)
    finally:
        child.kill()
        child.wait()
    row = next(r for r in rows if r["pid"] == child.pid)
    assert 20 <= row["per_s"] <= 110
    assert row["threads"][0][1] == pytest.approx(row["per_s"])  # one thread does all of it
    assert [r["per_s"] for r in rows] == sorted((r["per_s"] for r in rows), reverse=True)


@pytest.mark.parametrize("argv, message", [(["--calls", "1"], "--calls must be >= 2"),
                                           (["--sample-s", "0"], "--sample-s must be > 0")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
