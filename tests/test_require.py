"""`require`: a missing test prerequisite skips outside CI and fails in CI."""

import pytest
from conftest import require, require_module


def test_a_missing_prerequisite_skips_with_its_reason_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    require(True, "never raised")
    with pytest.raises(pytest.skip.Exception, match="needs Chromium"):
        require(False, "needs Chromium")


def test_a_missing_prerequisite_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    require(True, "never raised")
    with pytest.raises(pytest.fail.Exception, match="prerequisite is missing: needs netns"):
        require(False, "needs netns")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_here"):
        require_module("no_such_module_here", "needs a package")
    assert require_module("json", "stdlib").dumps([1]) == "[1]"
