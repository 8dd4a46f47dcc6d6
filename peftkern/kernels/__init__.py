"""Backends below the autograd layer: kernels.triton (one file per method) and kernels.cuda (peftkern._C)."""
