"""Every test model is tiny: one thread is faster than two fighting over 2 busy cores, and it makes in-process
runs do the same arithmetic as the OMP_NUM_THREADS=1 subprocesses they are compared with."""

import torch

torch.set_num_threads(1)
