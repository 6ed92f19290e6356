"""Triton kernels over concept-ID sequences (installed as ``recbase.kernels``).

One file per op: the Triton kernel, its autograd Function and one public function.
Importing this package never requires Triton; each op module checks for it.
"""
