"""Every bad input ends in one line on stderr that names the field, file or row, a clean exit code (2: recipe or
usage, 1: runtime), no traceback, and nothing on disk overwritten.

The catalogue, one file per kind of input: tests/test_bad_inputs_recipe.py (the recipe itself),
tests/test_bad_inputs_data.py (the models and data it points at), tests/test_bad_inputs_runs.py (run directories
under train --resume/--overwrite, eval, predict, merge and export). This file checks the size of the whole catalogue.
"""

from __future__ import annotations

from test_bad_inputs_data import CASES as DATA
from test_bad_inputs_recipe import CASES as RECIPE
from test_bad_inputs_runs import CASES as RUNS

CASES = RECIPE | DATA | RUNS


def test_the_catalogue_is_large():
    assert len(CASES) >= 45
