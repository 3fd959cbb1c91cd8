"""Autocast for the attention ops, as PyTorch does it for scaled_dot_product_attention.

Inside ``torch.autocast(device_type, dtype)`` SDPA runs in the region's lower-precision dtype
(CPU: bfloat16 by default; CUDA: float16 or bfloat16): its floating-point inputs other than
float64 are cast to that dtype. The attention ops do the same for q, k and v, and only for them:
the ALiBi slopes stay float32 (the kernels take them so), masks and cu_seqlens are not floats.

Not torch.library.register_autocast, which casts every floating tensor argument (the slopes
too) to one dtype fixed at registration, where autocast's dtype is the region's. The kernel is
registered like register_autocast's (a dispatcher kernel and a python-dispatcher one for
tracing), so torch.compile sees the casts, and autograd differentiates through them: the
gradients of float32 leaves come back float32.
"""

from __future__ import annotations

import torch

from .._autograd import _LIB

# Autocast keys of the devices the ops have kernels for.
DEVICE_TYPES = ("cpu", "cuda")


def _cast(t, device_type: str, dtype: torch.dtype):
    # autocast's own rule (is_eligible in ATen's autocast_mode.h): floating, on the region's
    # device type, not float64
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type):
        return t.to(dtype)
    return t


def register_autocast(op: torch._ops.OpOverload, num_cast: int) -> None:
    """Cast the first `num_cast` arguments of `op` (q, k, v) to the autocast dtype."""
    name = op._schema.name.split("::")[1]
    for device_type in DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            cast = tuple(_cast(a, _device_type, dtype) for a in args[:num_cast]) + tuple(args[num_cast:])
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast)

        op.py_kernels.pop(key, None)  # a re-import replaces it
        op.py_impl(key)(autocast_kernel)
        _LIB.impl(name, lambda _keyset, *args, _kernel=autocast_kernel: _kernel(*args), key_name, with_keyset=True)
