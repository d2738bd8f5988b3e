"""Run directories under attack (issue 22). ftune must never delete a user's files, never train into a folder another
process trains in, refuse a place it cannot write, and read a run someone else handed over as data only: no code
from it runs (remote code, pickles), nothing outside it is read or written (symbolic links), no size it claims is
believed (safetensors headers, run.json), and none of its files can hang a reader (a FIFO, /dev/zero).

Each catalogue case ends in one stderr line holding the named needles, its exit code, no traceback, and every file
involved byte-identical afterwards: the case's own folder (which holds whatever it planted outside the run, and the
marker a payload would write), the shared finished run, the base model and the data. Classes, one file each:
  data-loss    user folders as output_dir, user files beside a run, records that would claim them
               (tests/test_run_dir_data_loss.py)
  lock         a run another process still trains in, the lock held by a stand-in process (tests/test_run_dir_lock.py)
  environment  read-only parents, files in the way, dangling links, `~` (tests/test_run_dir_environment.py)
  hostile      tampered runs under eval, predict, merge, export, plot and train --resume/--overwrite
               (tests/test_run_dir_hostile.py)
`ftune compare` reading its runs: tests/test_run_dir_compare.py. The case environment and building blocks:
tests/run_dir_helpers.py. This file checks that the catalogue, all classes together, covers every class.
"""

from __future__ import annotations

from test_run_dir_data_loss import CASES as DATA_LOSS
from test_run_dir_environment import CASES as ENVIRONMENT
from test_run_dir_hostile import CASES as HOSTILE
from test_run_dir_lock import CASES as LOCK

CASES = DATA_LOSS | LOCK | ENVIRONMENT | HOSTILE


CLASSES = {"data-loss": 10, "lock": 8, "environment": 12, "hostile": 50}
"""The least number of cases each class must have."""


def test_the_catalogue_covers_every_class():
    counts = {cls: sum(case[0] == cls for case in CASES.values()) for cls in CLASSES}
    assert all(counts[cls] >= least for cls, least in CLASSES.items()), counts
