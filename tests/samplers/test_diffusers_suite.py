"""diffusers' own scheduler tests against our classes (scripts/diffusers_scheduler_suite.py).

Runs only when ``DIFFALIGN_DIFFUSERS_SRC`` names a diffusers source tree (nothing is downloaded); green when every
failure is one of the documented differences (``KNOWN_DIFFERENCES``, docs/samplers.md).
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SRC = os.environ.get("DIFFALIGN_DIFFUSERS_SRC", "")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "diffusers_scheduler_suite.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SRC, reason="set DIFFALIGN_DIFFUSERS_SRC to a diffusers checkout to run its tests"),
]


def load_script():
    spec = importlib.util.spec_from_file_location("diffusers_scheduler_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["dpm_solver_pp", "dpm_solver", "dc_solver", "dpm_solver_v3", "adjoint_dpm"])
def test_diffusers_scheduler_tests_pass_but_the_documented_differences(name):
    suite = load_script()
    config = suite.SuiteConfig(diffusers_src=SRC, schedulers=[name], deselect_known=True)
    assert suite.run_suite(config, ["-W", "ignore"]) == 0
