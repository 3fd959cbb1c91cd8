"""Autograd of the C++ ops: a torch.autograd.Function per op, registered as the op's Autograd kernel.

Not torch.library.register_autograd, because the Function it generates has no setup_context and
no jvp: torch.func.grad / vjp / jacrev then fail with a message about an autograd.Function the
user never wrote, and forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad)
silently returns zero or None tangents. A Function of our own fixes both: it has setup_context
(so torch.func can use it), a jvp (a formula, or a clear error), and vmap comes from
generate_vmap_rule. torch.compile still sees the op itself (the kernel is below it).
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch.autograd import forward_ad

_LIB = torch.library.Library("longreach", "IMPL")


def schema_args(op: torch._ops.OpOverload, name: str):
    """A namedtuple type of `op`'s arguments (with the schema's defaults), so autograd code
    addresses them by name and keeps working when an argument is added."""
    arguments = op._schema.arguments
    defaults = [arg.default_value for arg in arguments if arg.has_default_value()]
    return namedtuple(name, [arg.name for arg in arguments], defaults=defaults)


def forward_below_autograd(op: torch._ops.OpOverload, *args):
    """The op's kernel without its autograd (the body of a Function's forward)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register(op: torch._ops.OpOverload, function: type, public_name: str) -> None:
    """Make `function` the derivative of `op` for every caller of the op."""

    def autograd_kernel(*args):
        if torch._C._are_functorch_transforms_active():
            # torch.func cannot look inside an op's Autograd kernel (it needs the Function
            # applied before dispatch, as `call` does).
            raise RuntimeError(
                f"{op} cannot be differentiated by torch.func transforms when called directly; "
                f"call {public_name} instead")
        if (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or forward_ad._current_level >= 0:
            return function.apply(*args)
        return forward_below_autograd(op, *args)  # nothing to differentiate: skip the Function's cost

    _LIB.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd")


def call(function: type, op: torch._ops.OpOverload, *args):
    """op(*args), differentiable by torch.autograd and by torch.func transforms.

    torch.compile gets the op itself (its AOT autograd reaches the Function through the
    op's Autograd kernel); torch.func gets the Function, applied here before dispatch."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return op(*args)
