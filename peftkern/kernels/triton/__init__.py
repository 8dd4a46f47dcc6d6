"""Triton kernels and their launchers, one file per method. No autograd here."""
