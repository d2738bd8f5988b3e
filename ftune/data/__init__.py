"""Data: reading sources into rows (sources.py, conll.py) and padded, sharded batches (loader.py). How a row of a
task becomes an example lives with the task (ftune/tasks/)."""
