"""Every docstring example in freshet runs and prints what it says.

Modules are found by their source holding a `>>>` prompt, so an example added to any
module is run without this file changing; each must run at least one example.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"freshet": ROOT / "freshet", "freshet.stream": ROOT / "stream", "freshet.serving": ROOT / "serving",
           "freshet.monitor": ROOT / "monitor", "freshet.training": ROOT / "training"}


def _modules_with_examples() -> list[str]:
    names = []
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            if ">>>" in path.read_text():
                parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
                names.append(".".join([package, *parts]))
    return names


def test_examples_are_found_in_the_mapped_folders():
    found = _modules_with_examples()
    assert {"freshet.stream.events", "freshet.monitor.detectors", "freshet.training.retrain"} <= set(found)


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has a '>>>' but no example ran"
    assert result.failed == 0
