"""Settle oneMKL VML's kernel choice before any multi-threaded call.

PyTorch's CPU builds compute elementwise exp, log, sin, cos, tanh, erf, ... of
float32/float64 tensors with oneMKL's VML, which picks its kernel lazily on the
first call of each function; when that first call comes from several intra-op
threads at once, one thread's chunk can run the low-accuracy kernel
(pytorch/pytorch#188792: errors of ~1e-9 in float64). It showed up here as rare float64 mismatches of the dense reference
in fresh processes on a busy machine (the kernel agreed with numpy to 1e-15).
Importing longreach makes one-element, single-threaded calls of the functions
the package (its reference, RoPE tables, ALiBi, the model code) relies on, which
settles each choice; it costs a few microseconds.
"""

import torch

_FUNCTIONS = (torch.exp, torch.expm1, torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.sin, torch.cos,
              torch.tanh, torch.sigmoid, torch.erf)


def resolve_vml_dispatch() -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for fn in _FUNCTIONS:
            fn(x)


resolve_vml_dispatch()
