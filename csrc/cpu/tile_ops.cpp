#include "tile_ops.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "bf16_ops.h"

namespace longreach::cpu {
namespace {

// ATen decides once per process which vector ISA this CPU (and the
// ATEN_CPU_CAPABILITY environment variable) allows; we follow it. Builds for
// other architectures only compile the DEFAULT table.
enum class Isa { kDefault, kAvx2, kAvx512 };

Isa pick_isa() {
#if defined(LONGREACH_HAVE_X86_ISA)
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return Isa::kAvx512;
  if (cap == "AVX2") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa chosen_isa() {
  static const Isa isa = pick_isa();
  return isa;
}

}  // namespace

template <>
const TileOps<float>& tile_ops<float>() {
  switch (chosen_isa()) {
#if defined(LONGREACH_HAVE_X86_ISA)
    case Isa::kAvx512: return AVX512::float_ops();
    case Isa::kAvx2: return AVX2::float_ops();
#endif
    default: return DEFAULT::float_ops();
  }
}

template <>
const TileOps<double>& tile_ops<double>() {
  switch (chosen_isa()) {
#if defined(LONGREACH_HAVE_X86_ISA)
    case Isa::kAvx512: return AVX512::double_ops();
    case Isa::kAvx2: return AVX2::double_ops();
#endif
    default: return DEFAULT::double_ops();
  }
}

std::string cpu_kernels_in_use() {
  const Bf16Ops* bf = bf16_ops();
  return std::string(tile_ops<float>().isa) + (bf ? std::string("+") + bf->isa : std::string());
}

}  // namespace longreach::cpu
