"""The training run: `setup` -> `fit` -> `finish`, one `train_step`, and the parts the loop leans on.

loop     the run in named steps
optim    optimiser, learning-rate schedule, explicit L2 penalty
guard    the NaN/inf guard
stop     SIGTERM, SIGUSR1 and Ctrl-C: a checkpoint, then exit
rescale  the global batch held when a run resumes on another process count
"""
