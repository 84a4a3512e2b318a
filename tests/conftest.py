"""Test-suite configuration: the `slow` and `heavy` markers and the hypothesis profiles of the
property tests.

Profiles (`HYPOTHESIS_PROFILE` picks one; "ci" when it is unset, locally as in CI):

- "ci": derandomized (every run draws the same examples, so a green CI cannot turn red by
  chance), no example database, no deadline (the first call of an op traces or compiles it).
  Each property test runs its own small number of examples (see `tests/properties.py`).
- "explore": random examples, 20 times as many, remembered in the example database
  (`.hypothesis/`) so that a failure found once is replayed first on the next run:
  `HYPOTHESIS_PROFILE=explore pytest -n 0 tests/ops/test_properties.py`.
"""

import os

from hypothesis import HealthCheck, settings

CI_MAX_EXAMPLES = 10

settings.register_profile(
    "ci",
    max_examples=CI_MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    max_examples=20 * CI_MAX_EXAMPLES,
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a test that takes more than ~20 s on a 2-core machine (deselect with "
        "-m 'not slow'; CI runs everything)",
    )
    config.addinivalue_line(
        "markers",
        "heavy: compiles large graphs (the harness with every argument, quantization, training "
        "to convergence; 6-26 s each on the JAX backend), or checks plumbing that lighter tests "
        "of the same path already run on JAX; CI runs it on the TensorFlow pass and its JAX pass "
        "deselects it (-m 'not heavy')",
    )
