"""Under CI=true a skip is a failure (a missing data set, model or package is a broken install
step, not a reason to run fewer tests), unless the test is marked ``allow_skip_in_ci``."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = """
import pytest

def test_needs_data():
    pytest.skip("no data set")

@pytest.fixture
def model():
    pytest.importorskip("no_such_model_package")

def test_needs_a_model(model):
    pass

@pytest.mark.allow_skip_in_ci
def test_gpu_only():
    pytest.skip("no GPU")

def test_runs():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_skips_fail_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_rules=TESTS)
    pytester.makepyfile(test_module_skip='import pytest\npytest.importorskip("no_such_module")\n')
    pytester.makeini("[pytest]\nmarkers =\n    allow_skip_in_ci: may skip in CI\n")
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    if ci:
        result.assert_outcomes(passed=1, skipped=1, failed=1, errors=2)  # errors: the fixture's and the module's
    else:
        result.assert_outcomes(passed=1, skipped=4)
