// Calls a longreach dispatcher op with its arguments given by name, the others
// taking the schema's defaults. By name rather than through a typed signature so
// the C++ API keeps working when an op's schema gains a trailing argument with a
// default (csrc/ops.cpp), and so it never restates a schema.
#pragma once

#include <vector>
#include <string>
#include <utility>

#include <ATen/core/ivalue.h>
#include <ATen/core/stack.h>

namespace longreach::api {

using NamedArgs = std::vector<std::pair<const char*, c10::IValue>>;

// Runs longreach::<op> below the Autograd key (the caller's autograd Function owns the
// derivative) and returns the op's outputs.
torch::jit::Stack call_op(const char* op, const NamedArgs& args);

}  // namespace longreach::api
