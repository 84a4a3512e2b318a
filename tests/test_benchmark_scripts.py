"""Every benchmark runs as a script from any working directory: `python benchmarks/NAME.py --help`.

The benchmarks are scripts, not tests (their figures are recorded in benchmarks/results/); this
only checks that each one starts, imports the package from the checkout and parses its arguments,
as the README's commands run them.
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")
SCRIPTS = sorted(
    name
    for name in os.listdir(BENCHMARKS)
    if name.endswith(".py") and not name.startswith("_") and name != "common.py"
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts_from_another_directory(script, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), "--help"],
        cwd=tmp_path,  # not the repository root: the script must find the package itself
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_dispatcher_lists_every_benchmark():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    listed = result.stdout.rsplit("available:", 1)[-1]
    for script in SCRIPTS:
        assert script[:-3] in listed
