"""The examples in the monitor's docstrings run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import monitor.detectors
import monitor.drift
import monitor.estimate
import monitor.labels


@pytest.mark.parametrize("module", [monitor.detectors, monitor.drift, monitor.estimate, monitor.labels],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
