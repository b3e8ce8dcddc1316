"""Start-up cost of the monitor stage: the CLI must not pay for River, SciPy or scikit-learn.

`freshet --help` and `--version` register the monitor subcommands; `freshet alerts` only reads
the drift topic. Each check runs in a fresh interpreter so earlier imports cannot hide one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("river", "scipy", "sklearn", "mlflow", "feast")


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import freshet.cli as cli; cli.build_parser()",
    "import freshet.monitor, freshet.monitor.cli, freshet.monitor.service",
    "from freshet.monitor import service; service.format_alert",
])
def test_registering_the_monitor_commands_imports_no_detector_or_training_library(code):
    assert _imported_after(code) == []


def test_a_monitor_export_loads_its_module_on_first_use():
    assert _imported_after("import freshet.monitor as monitor; monitor.LabelJoin") == []
    assert "river" in _imported_after("import freshet.monitor as monitor; monitor.DriftMonitor")
