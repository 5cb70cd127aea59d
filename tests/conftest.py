"""Shared fixtures: every API test runs once per backend (C core and pure Python)."""

import os

import pytest
from hypothesis import HealthCheck, settings

import safeckpt
from safeckpt import _backend

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_report_header(config):
    """Which safeckpt this run tests (.ci/wheel checks that it is the installed one)."""
    where = os.path.dirname(safeckpt.__file__)
    return f"safeckpt {safeckpt.__version__} from {where}, backend {safeckpt.backend}"


@pytest.fixture(params=["c", "python"])
def backend(request):
    """Run the test with the named backend; the C core must be built when CI is set.

    SAFECKPT_NO_EXT=1 says the C core is absent on purpose (an install without it, as .ci/wheel
    tests): its runs are skipped then, even under CI.
    """
    if request.param == "c":
        try:
            import safeckpt._native  # noqa: F401
        except ImportError as exc:
            if os.environ.get("CI") and os.environ.get("SAFECKPT_NO_EXT") != "1":
                pytest.fail(f"the C core is not built in CI: {exc}")
            pytest.skip(f"the C core is not built: {exc}")
    previous = _backend.use(request.param)
    yield request.param
    _backend.use(previous)
