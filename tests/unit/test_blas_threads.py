"""Importing the agent keeps OpenBLAS to the calling thread: its spinning workers would take CPU
from the data path after every PBA fit (dwcp_agent/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

THREADS_AFTER_IMPORT = """
import dwcp_agent, numpy
from dwcp_agent.pba.predictor import *  # noqa: F403  (the module that fits)
import os
print(os.environ["OPENBLAS_NUM_THREADS"], open("/proc/self/status").read().split("Threads:")[1].split()[0])
"""


def _run(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", THREADS_AFTER_IMPORT], capture_output=True, text=True, env=env,
                         timeout=60, check=True)
    return out.stdout.split()


def test_the_agent_runs_numpy_without_blas_worker_threads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    setting, threads = _run(env)
    assert setting == "1"
    assert threads == "1", f"{threads} threads after importing the agent and numpy"


def test_an_operator_setting_wins() -> None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    setting, _ = _run(env)
    assert setting == "2"
