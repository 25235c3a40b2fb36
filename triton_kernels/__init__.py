"""Triton kernels and their launchers, installed as ``glimpse_ops.triton_kernels``.

Every module here holds one op's ``@triton.jit`` kernels and a ``<op>_triton`` launcher.
Nothing here registers ops: the routers in ``glimpse_ops.ops`` call the launchers. Import
only after deciding to use Triton (``import triton`` is slow and optional).
"""
