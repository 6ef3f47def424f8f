"""Shared checks for the kernel tests: closeness to the reference with every element written."""
import numpy as np
import pytest


def _assert_close(actual, expected, tol: float, name: str) -> None:
    """Elementwise |actual - expected| <= tol * max(1, max|expected|) (+ tol relative), after checking that
    every element is finite: the interpreters fill outputs with NaN before a kernel runs, so an element a
    kernel never wrote shows up here."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite), f"{name}: non-finite values where the reference has none"
    assert np.array_equal(actual[~finite], expected[~finite]), f"{name}: different infinities"
    scale = max(1.0, float(np.abs(expected[finite]).max(initial=0.0)))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=tol, atol=tol * scale, err_msg=name)


@pytest.fixture
def assert_close():
    return _assert_close
