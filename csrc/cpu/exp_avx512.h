// exp(x - shift) on 16 float lanes of AVX-512, the one copy of the CPU
// kernels' fast exp: TileOps' vexp_shifted (tile_ops_impl.h, the AVX512 copy)
// and the AMX forward's fused softmax (amx_bf16_impl.h) both call it, so the
// two softmax paths share one approximation and its error bound.
//
// 2^t with t = (x - shift) log2(e) = n + f, |f| <= 1/2, 2^f by its degree-6
// Taylor polynomial (relative error < 2e-7, about 2 ulp) and 2^n by vscalefps:
// 13 instructions, about half of ATen's exp_u20 and more accurate. Inputs below
// -120 give exactly 0 (so does -inf, and the NaN of -inf - -inf).
//
// Plain intrinsics in an unnamed namespace (flagged_helpers.h says why): each
// including file, compiled with its own -m flags, gets its own copy.
#pragma once

#if !defined(__AVX512F__)
#error "exp_avx512.h needs AVX-512F: include it only where the file is compiled with its flags"
#endif

#include <immintrin.h>

namespace longreach::cpu::avx512_math {
namespace {

inline __m512 exp_shifted(__m512 x, __m512 shift) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 lo = _mm512_set1_ps(-120.f * 1.44269504088896341f);
  // (x - shift) first: exact when x is near the shift, so large scores keep full precision.
  __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, shift), log2e);
  t = _mm512_max_ps(t, lo);  // also turns -inf (and NaN from -inf - -inf) into a finite input
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  // 2^f = sum (f ln2)^i / i!
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace
}  // namespace longreach::cpu::avx512_math
