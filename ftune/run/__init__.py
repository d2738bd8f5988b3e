"""The run: the training loop, checkpoints, the optimizer, evaluation, and the processes they run on."""
