"""Backends of the losses: Triton kernels with their launchers, and the chunked PyTorch equivalents.

Each backend module exposes the same two functions per loss (`forward`, `backward`); the
autograd functions one layer up pick a module by name and import it lazily.
"""
