import os
from pathlib import Path

import pytest

# One BLAS thread: small QR/SVD calls are much faster without OpenBLAS threads fighting XLA's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# A persistent XLA compilation cache for the whole run and the CLI subprocesses it starts (they
# inherit the environment). It lives outside the clone, so CI's fresh clone reuses it; keys are
# computed without source locations, so another checkout's compiles hit it too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "fedlora_jax" / "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Two CPU devices for the in-process tests, as `federation.cpu_devices: auto` gives a user on a
# 2-core machine: the engine's default runs shard the cohort over a `clients` mesh. Tests compare
# one device with two by `federation.devices` (1 takes the first device); tests of other counts
# (XLA_FLAGS, auto's choice) run in subprocesses.
jax.config.update("jax_num_cpu_devices", 2)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data folder beside the repository (``../shared/data``); its absence fails the
    test with one line saying so (CI provides it: nothing that CI provides is skipped)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"offline data folder {SHARED_DATA} is absent (see shared/data/README.md)", pytrace=False)
    return SHARED_DATA


def fail_skips_under_ci(report) -> None:
    """Under CI=true a skip is a failure: everything .ci/run installs or provides is there."""
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be skipped: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_skips_under_ci((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    fail_skips_under_ci((yield).get_result())
