"""The migrate command's progress line and summary say only what is known."""

from __future__ import annotations

import io

from dwcp_agent.progress import ProgressBar, summary


def test_failed_summary_shows_no_throughput_and_each_retry() -> None:
    failed = {"id": "m-1", "state": "failed", "total_bytes": 1 << 30, "wire_bytes": 0, "duration_s": 0.01,
              "attempts": 3, "error": "gave up after 3 attempts", "error_type": "connect",
              "retries": ["attempt 1: refused [connect]", "attempt 2: refused [connect]"]}
    text = summary(failed)
    assert "throughput:      - (logical)" in text and "GB/s" not in text
    assert text.count("retried:") == 2 and "attempt 2: refused [connect]" in text


def test_progress_line_has_no_eta_without_a_rate_and_never_streams_0() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.update({"total_bytes": 100, "done_bytes": 0, "throughput_bytes_per_second": None, "streams": 0})
    bar.update({"total_bytes": 100, "done_bytes": 50, "throughput_bytes_per_second": 10, "streams": 7,
                "mode": "internet"})
    bar.finish()
    first, last = out.getvalue().splitlines()
    assert "ETA unknown" in first and "streams connecting" in first
    assert "ETA 0:05" in last and "streams 7" in last and "internet" in last


def _line(update: dict[str, int]) -> str:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.update({"total_bytes": 100, "throughput_bytes_per_second": 10, **update})
    bar.finish()
    return out.getvalue()


def test_with_no_stream_open_the_line_says_why() -> None:
    assert "streams connecting" in _line({"done_bytes": 0, "streams": 0})
    assert "streams reconnecting" in _line({"done_bytes": 60, "streams": 0})  # all lost mid-way, being replaced
    assert "streams finishing" in _line({"done_bytes": 100, "streams": 0})  # all sent: verifying and committing
