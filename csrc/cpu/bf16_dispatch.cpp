// Which Bf16Ops table (bf16_ops.h) this process uses: none (the float path),
// AVX512_BF16, or AMX-BF16 where the CPU and the OS allow it and a first-use
// self-check agrees with AVX512_BF16. The rules are plain functions of their
// inputs (choose_bf16_kernels, choose_amx_kernels) so the tests can fake the
// capability flags; bf16_ops() feeds them the real ones once per process.
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "bf16_ops.h"
#include "tile_ops.h"
#if defined(LONGREACH_HAVE_X86_ISA)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace longreach::cpu {
namespace {

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

// cpuid leaf 7, sub-leaf 0, EDX bits 24 (AMX-TILE) and 22 (AMX-BF16).
bool cpu_has_amx_bf16() {
#if defined(LONGREACH_HAVE_X86_ISA) && !defined(LONGREACH_NO_AMX_INTRINSICS)  // (built without them: as if absent)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ((d >> 24) & 1u) && ((d >> 22) & 1u);
#else
  return false;
#endif
}

// Linux enables the tile data state (XTILEDATA, 8 KiB per thread) only for a
// process that asks for it (the kernel's Documentation/arch/x86/xstate.rst):
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), process-wide, then
// ARCH_GET_XCOMP_PERM says whether it was granted. Elsewhere: not granted.
bool request_amx_permission() {
#if defined(__linux__) && defined(LONGREACH_HAVE_X86_ISA) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long features = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &features) != 0) return false;
  return (features >> kXfeatureXtiledata) & 1ul;
#else
  return false;
#endif
}

std::string capability_for_bf16() {
  return std::string(tile_ops<float>().isa) == "avx512" ? "AVX512" : at::get_cpu_capability();
}

float test_value(int64_t i) { return static_cast<float>(1.5 * std::sin(0.37 * static_cast<double>(i) + 0.11)); }
uint32_t bits16(float x) {
  const c10::BFloat16 h(x);
  return h.x;
}

// max |t - r| over the pairs, and max |r|.
void compare(const std::vector<float>& t, const std::vector<float>& r, double* diff, double* size) {
  for (size_t i = 0; i < t.size(); ++i) {
    const double d = std::fabs(static_cast<double>(t[i]) - r[i]);
    *diff = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(*diff, d);
    *size = std::max(*size, std::fabs(static_cast<double>(r[i])));
  }
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

std::string choose_amx_kernels(const std::string& env, const std::string& bf16_choice, bool cpu_has_amx,
                               bool os_grants_amx) {
  const bool emulate = env == "emulate" || env == "emulate_broken";
  TORCH_CHECK_VALUE(env.empty() || env == "0" || env == "1" || emulate,
                    "LONGREACH_CPU_AMX must be unset, 0 (off), 1 (required) or emulate (tests), got '", env, "'");
  if (env == "0") return "off";
  const bool bf16_on = bf16_choice == "avx512_bf16";
  // The AMX table is used where AVX512_BF16 is: the same kernels' operands, and the self-check's reference.
  TORCH_CHECK(!emulate || bf16_on, "LONGREACH_CPU_AMX=", env, " needs the AVX512_BF16 kernels, which are off here");
  if (emulate) return "amx_bf16_emulated";
  const bool available = bf16_on && cpu_has_amx && os_grants_amx;
  TORCH_CHECK(env != "1" || available, "LONGREACH_CPU_AMX=1 but this process cannot run the AMX kernels (bf16 kernels ",
              bf16_choice, ", cpuid AMX-TILE and AMX-BF16 ", cpu_has_amx ? "yes" : "no", ", OS tile permission ",
              os_grants_amx ? "granted" : "not granted", ")");
  return available ? "amx_bf16" : "off";
}

double bf16_table_difference(const Bf16Ops& test, const Bf16Ops& ref) {
  double diff = 0.0, size = 0.0;
  const int64_t m = 37, n = 90, ld = 112;  // a ragged 16-row tail; n not whole vectors
  // Rows' runs: ragged bands, one row empty.
  std::vector<int64_t> first(m), end(m);
  for (int64_t a = 0; a < m; ++a) {
    first[a] = std::min<int64_t>(n - 1, a + (a * 7) % 20);
    end[a] = a == 5 ? first[a] : std::min<int64_t>(n, first[a] + 30 + a % 11);
  }
  // Keys' runs: the hull of the rows that see each key.
  std::vector<int64_t> key_first(n, 0), key_end(n, 0);
  for (int64_t c = 0; c < n; ++c) {
    int64_t lo = m, hi = 0;
    for (int64_t a = 0; a < m; ++a) {
      if (first[a] <= c && c < end[a]) lo = std::min(lo, a), hi = std::max(hi, a + 1);
    }
    key_first[c] = lo < hi ? lo : 0;
    key_end[c] = lo < hi ? hi : 0;
  }
  for (const int64_t D : {40, 64}) {  // a K tail of 4 pairs, and whole tiles
    const int64_t k2 = D / 2, ldb = (D + 15) / 16 * 16;
    // S = 0.125 Q K^T: Q rows bf16, K^T panel-major pair columns (key_operands.h pack_pair_columns).
    std::vector<c10::BFloat16> q(m * D);
    for (int64_t i = 0; i < m * D; ++i) q[i] = c10::BFloat16(test_value(i));
    std::vector<uint32_t> kT(((n + 15) / 16 + 1) * (k2 + 1) * 16, 0u);
    auto key = [&](int64_t r, int64_t x) { return test_value(1000 + r * D + x); };
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t p = 0; p < k2; ++p) {
        kT[(r / 16) * (k2 + 1) * 16 + p * 16 + r % 16] = bits16(key(r, 2 * p)) | bits16(key(r, 2 * p + 1)) << 16;
      }
    }
    std::vector<float> st(m * ld, 0.f), sr(m * ld, 0.f);
    test.gemm_band_n(m, n, D, q.data(), D, kT.data(), 0.125f, st.data(), ld, first.data(), end.data());
    ref.gemm_band_n(m, n, D, q.data(), D, kT.data(), 0.125f, sr.data(), ld, first.data(), end.data());
    std::vector<float> in_t, in_r;  // only the runs are defined
    for (int64_t a = 0; a < m; ++a) {
      for (int64_t c = first[a]; c < end[a]; ++c) in_t.push_back(st[a * ld + c]), in_r.push_back(sr[a * ld + c]);
    }
    compare(in_t, in_r, &diff, &size);
    // A float tile, zero outside the runs (as P and dS are).
    std::vector<float> A(m * ld, 0.f);
    for (int64_t a = 0; a < m; ++a) {
      for (int64_t c = first[a]; c < end[a]; ++c) A[a * ld + c] = test_value(5000 + a * ld + c);
    }
    // dQ += dS K: K as pair rows of n keys.
    std::vector<uint32_t> kp(((n + 1) / 2 + 1) * ldb, 0u);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t x = 0; x < D; ++x) kp[(r / 2) * ldb + x] |= bits16(key(r, x)) << (16 * (r % 2));
    }
    std::vector<float> ct(m * D), cr(m * D);
    for (int64_t i = 0; i < m * D; ++i) ct[i] = cr[i] = test_value(9000 + i);
    test.gemm_band_k(m, D, n, A.data(), ld, 1, kp.data(), ldb, ct.data(), D, first.data(), end.data());
    ref.gemm_band_k(m, D, n, A.data(), ld, 1, kp.data(), ldb, cr.data(), D, first.data(), end.data());
    compare(ct, cr, &diff, &size);
    // dK += dS^T Q: A read transposed, Q as pair rows of m (odd) rows.
    std::vector<uint32_t> qp(((m + 1) / 2 + 1) * ldb, 0u);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t x = 0; x < D; ++x) qp[(r / 2) * ldb + x] |= static_cast<uint32_t>(q[r * D + x].x) << (16 * (r % 2));
    }
    std::vector<float> dt(n * D), dr(n * D);
    for (int64_t i = 0; i < n * D; ++i) dt[i] = dr[i] = test_value(20000 + i);
    test.gemm_band_k(n, D, m, A.data(), 1, ld, qp.data(), ldb, dt.data(), D, key_first.data(), key_end.data());
    ref.gemm_band_k(n, D, m, A.data(), 1, ld, qp.data(), ldb, dr.data(), D, key_first.data(), key_end.data());
    compare(dt, dr, &diff, &size);
  }
  return size > 0.0 ? diff / size : std::numeric_limits<double>::infinity();
}

double amx_emulated_self_check(bool broken) {
#if defined(LONGREACH_HAVE_X86_ISA)
  TORCH_CHECK(choose_bf16_kernels("", capability_for_bf16(), cpu_has_avx512_bf16()) == "avx512_bf16",
              "the AMX self-check compares with the AVX512_BF16 kernels, which this CPU cannot run");
  AMX_EMULATED::set_emulated_tile_fault(broken);
  double diff = std::numeric_limits<double>::infinity();
  try {
    diff = bf16_table_difference(AMX_EMULATED::bf16_table(), AVX512_BF16::bf16_table());
  } catch (const std::exception&) {
  }
  AMX_EMULATED::set_emulated_tile_fault(false);
  return diff;
#else
  (void)broken;
  TORCH_CHECK(false, "the AMX kernels exist only in x86-64 builds");
#endif
}

const Bf16Ops* bf16_ops() {
  static const Bf16Ops* ops = []() -> const Bf16Ops* {
    const char* env = std::getenv("LONGREACH_CPU_BF16");
    const std::string bf16 = choose_bf16_kernels(env ? env : "", capability_for_bf16(), cpu_has_avx512_bf16());
    const char* amx_env_c = std::getenv("LONGREACH_CPU_AMX");
    const std::string amx_env = amx_env_c ? amx_env_c : "";
    const bool has_amx = cpu_has_amx_bf16();
    // The permission is asked for only where it would be used.
    const bool granted = bf16 != "off" && amx_env != "0" && has_amx && request_amx_permission();
    const std::string amx = choose_amx_kernels(amx_env, bf16, has_amx, granted);  // raises for =1 without AMX
    if (bf16 == "off") return nullptr;
#if defined(LONGREACH_HAVE_X86_ISA)
    const Bf16Ops* avx = &AVX512_BF16::bf16_table();
    if (amx == "off") return avx;
    // A kernel that cannot be run where it was written must not give a silent
    // wrong answer: compare it with AVX512_BF16 once before using it.
#if defined(LONGREACH_NO_AMX_INTRINSICS)
    const Bf16Ops* table = &AMX_EMULATED::bf16_table();  // "amx_bf16" needs cpu_has_amx_bf16(), false here
#else
    const Bf16Ops* table = amx == "amx_bf16" ? &AMX_BF16::bf16_table() : &AMX_EMULATED::bf16_table();
#endif
    const bool broken = amx_env == "emulate_broken";
    if (broken) AMX_EMULATED::set_emulated_tile_fault(true);
    double diff = std::numeric_limits<double>::infinity();
    try {
      diff = bf16_table_difference(*table, *avx);
    } catch (const std::exception&) {
    }
    if (broken) AMX_EMULATED::set_emulated_tile_fault(false);
    if (diff < kAmxSelfCheckTolerance) return table;
    TORCH_CHECK(amx_env != "1", "LONGREACH_CPU_AMX=1 but the ", table->isa,
                " kernels failed their first-use self-check against avx512_bf16 (relative difference ", diff, ")");
    TORCH_WARN("longreach: the ", table->isa, " kernels disagree with avx512_bf16 in their first-use self-check ",
               "(relative difference ", diff, "); using avx512_bf16 instead. Please report this with your CPU model.");
    return avx;
#else
    return nullptr;
#endif
  }();
  return ops;
}

}  // namespace longreach::cpu
