"""Triton kernels of mlmfast, installed as `mlmfast.kernels`.

Nothing here imports triton at module import time: a missing triton turns into a clear error only when a
kernel is called (see `mlmfast.dispatch`).
"""
