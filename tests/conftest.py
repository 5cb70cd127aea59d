"""Shared fixtures: every API test runs once per backend (C core and pure Python)."""

import importlib
import os

# Four CPU devices for jax (sharding and device tests), set before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pytest
from hypothesis import HealthCheck, settings

import safeckpt
from safeckpt import _backend

import servers

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


def need(*modules):
    """Import the optional packages a remote test needs (issue 14): skip without them, fail in CI.

    CI (the CI variable set) must run the remote tests, so a missing package fails there.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            message = f"{name} is missing ({exc}); pip install -e '.[test]' installs it"
            if os.environ.get("CI"):
                pytest.fail(f"CI runs the remote tests: {message}")
            pytest.skip(message)


def _loopback_only(guard):
    """Fail the test if its code tried a host other than 127.0.0.1 (servers.LoopbackOnly)."""
    if guard.outbound:
        pytest.fail(f"the test reached beyond 127.0.0.1: {sorted(set(guard.outbound))}")


@pytest.fixture
def http_server():
    """A servers.ObjectServer of its own on 127.0.0.1 (put objects in .objects, read .url(name)).

    Stopped at teardown within servers.STOP_TIMEOUT; the test fails if anything it did connected
    to another host. Needs fsspec and aiohttp (fsspec's http client).
    """
    need("fsspec", "aiohttp")
    with servers.LoopbackOnly() as guard:
        with servers.ObjectServer() as server:
            yield server
    _loopback_only(guard)


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server on 127.0.0.1 for the whole session (servers.MotoServer), botocore's
    environment made hermetic (servers.AWS_ENV: dummy keys, no metadata lookups, no proxy)."""
    need("moto", "s3fs", "fsspec")
    with pytest.MonkeyPatch.context() as env:
        for key, value in servers.AWS_ENV.items():
            env.setenv(key, value)
        with servers.LoopbackOnly() as guard:
            with servers.MotoServer() as server:
                yield server
        _loopback_only(guard)


@pytest.fixture
def s3(moto_server):
    """A bucket of the test's own on moto's server: a servers.S3Bucket (.fs, an s3fs filesystem;
    .storage_options for safeckpt's storage_options=; .url(key), s3://<bucket>/<key>; .traffic).

    Every bucket and object is gone after the test (moto's reset); counts start at zero.
    """
    with servers.LoopbackOnly() as guard:
        bucket = servers.S3Bucket(moto_server)
        moto_server.traffic.reset()
        try:
            yield bucket
        finally:
            moto_server.reset()
            bucket.fs.invalidate_cache()
    _loopback_only(guard)
