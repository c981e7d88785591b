"""The engine loads its model on a thread that ends (engine_service.__main__.on_passing_thread), so that the only
OpenMP team left alive is the step loop's: libgomp keeps a team of workers for every living thread that ran a
parallel region, and with more of them than CPUs it stops spinning at barriers."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from engine_service.__main__ import on_passing_thread

ROOT = Path(__file__).resolve().parents[2]


def test_it_returns_what_build_returns_from_a_thread_that_has_ended():
    ran_on: list[threading.Thread] = []

    def build() -> int:
        ran_on.append(threading.current_thread())
        return 42

    assert on_passing_thread(build) == 42
    assert ran_on[0] is not threading.current_thread()
    assert not ran_on[0].is_alive()


def test_it_raises_what_build_raised_on_the_callers_thread():
    def build() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        on_passing_thread(build)


def test_the_openmp_team_of_the_loading_thread_goes_with_it():
    # In a process of its own (pytest's threads have teams of their own). An elementwise op over 2^22 floats is
    # one OpenMP parallel region with 2 threads: a thread that runs it gets a worker, kept while it lives.
    script = textwrap.dedent("""
        import os, threading, time
        import torch
        from engine_service.__main__ import on_passing_thread
        torch.set_num_threads(2)
        def threads():
            return len(os.listdir("/proc/self/task"))
        def work():
            return float((torch.ones(1 << 22) * 2).sum())
        before = threads()
        assert on_passing_thread(work) == 2.0 * (1 << 22)
        deadline = time.monotonic() + 60
        while threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        after_passing = threads()
        hold, done = threading.Event(), threading.Event()
        def stay():
            work()
            done.set()
            hold.wait()
        threading.Thread(target=stay, daemon=True).start()
        done.wait()
        print(before, after_passing, threads())
        hold.set()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after_passing, while_held = map(int, result.stdout.split())
    assert after_passing == before, "the loading thread's OpenMP worker outlived it"
    # The contrast that makes the first figure mean something: a thread that lives keeps its worker.
    assert while_held >= before + 2
