// Dtype names as Python users write them ("torch.float32"), for error
// messages: c10's own names ("float", "long int", "c10::complex<float>") are
// C++ spellings that a PyTorch user does not recognise.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace longreach {

inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kLong: return "torch.int64";
    case c10::kInt: return "torch.int32";
    case c10::kShort: return "torch.int16";
    case c10::kChar: return "torch.int8";
    case c10::kByte: return "torch.uint8";
    case c10::kBool: return "torch.bool";
    case c10::kComplexFloat: return "torch.complex64";
    case c10::kComplexDouble: return "torch.complex128";
    case c10::kComplexHalf: return "torch.complex32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace longreach
