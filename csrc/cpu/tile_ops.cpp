#include "tile_ops.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "bf16_ops.h"
#if defined(LONGREACH_HAVE_X86_ISA)
#include <cpuid.h>
#endif

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

// cpuid leaf 7, sub-leaf 1, EAX bit 5: AVX512_BF16 (vdpbf16ps). The OS's
// saving of the zmm state is already implied by ATen choosing AVX512.
bool cpu_has_avx512_bf16() {
#if defined(LONGREACH_HAVE_X86_ISA)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 5) & 1u;
#else
  return false;
#endif
}

}  // namespace

std::string choose_bf16_kernels(const std::string& env, const std::string& capability, bool cpu_has_bf16) {
  TORCH_CHECK_VALUE(env.empty() || env == "0" || env == "1",
                    "LONGREACH_CPU_BF16 must be unset, 0 (off) or 1 (required), got '", env, "'");
  const bool available = capability == "AVX512" && cpu_has_bf16;
  if (env == "0") return "off";
  TORCH_CHECK(env != "1" || available, "LONGREACH_CPU_BF16=1 but this process cannot run the AVX512_BF16 kernels ",
              "(ATen CPU capability ", capability, ", cpuid AVX512_BF16 ", cpu_has_bf16 ? "yes" : "no", ")");
  return available ? "avx512_bf16" : "off";
}

const Bf16Ops* bf16_ops() {
  static const Bf16Ops* ops = [] {
    const char* env = std::getenv("LONGREACH_CPU_BF16");
    const std::string cap = chosen_isa() == Isa::kAvx512 ? "AVX512" : at::get_cpu_capability();
    const bool on = choose_bf16_kernels(env ? env : "", cap, cpu_has_avx512_bf16()) != "off";
#if defined(LONGREACH_HAVE_X86_ISA)
    if (on) return &AVX512_BF16::bf16_table();
#endif
    (void)on;
    return static_cast<const Bf16Ops*>(nullptr);
  }();
  return ops;
}

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
