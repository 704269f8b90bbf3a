// compressjax CPU kernel: y (M, N) = x (M, K) float32 @ W for a packed QuantizedArray.
//
// Layout (compressjax/formats/packing.py, LAYOUT_VERSION 2): codes are packed along K into
// uint32 words, cpw = 32 / bits codes per word (2 bits: 16, 3 bits: 10 with bits 30-31 unused,
// 4 bits: 8, 8 bits: 4); code k of column n sits in bits [(k % cpw) * bits, +bits) of
// packed[k / cpw, n] (row-major (P, N)). Scales (and zeros) are (G, N) with G = K / group_size,
// in float32, float16 or bfloat16.
//   symmetric:  w = s * (q - c),  c = 2^(bits-1)
//   asymmetric: w = s * q + z  =  s * (q - c) + (z + c * s)
// The kernel decodes 8 columns per AVX2 register with a shift and a mask (the codes of one
// word for 8 adjacent columns), converts the centred codes to float32 and accumulates
// sum_k x[m, k] * (q[k, n] - c) per group in registers (FMA), then folds the group's scale once:
// y += s * acc (+ (z + c * s) * sum_k x[m, k] over the group, asymmetric). Column blocks of 16
// are split over the threads of XLA's intra-op thread pool (the calling thread works too).
// Without __AVX2__ / __FMA__ a portable scalar loop computes the same sums.
//
// References: llama.cpp ggml-quants.c (ggml_vec_dot_q4_0_q8_0: nibbles decoded in registers
// next to the multiply, scale folded once per block); Frantar et al., "MARLIN",
// arXiv:2408.11743 (a memory-bound decode GEMV must read the packed weight as stored).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CJ_AVX2 1
#else
#define CJ_AVX2 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum StatType { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float HalfToFloat(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float LoadStat(const void* p, int type, int64_t i) {
  switch (type) {
    case kF16: return HalfToFloat(static_cast<const uint16_t*>(p)[i]);
    case kBF16: {
      uint32_t bits = (uint32_t)static_cast<const uint16_t*>(p)[i] << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    default: return static_cast<const float*>(p)[i];
  }
}

struct Problem {
  const float* x;         // (M, K)
  const uint32_t* packed; // (P, N)
  const void* scale;      // (G, N)
  const void* zero;       // (G, N) or nullptr (symmetric)
  const float* xsum;      // (M, G) group sums of x (asymmetric only)
  float* y;               // (M, N)
  int64_t m, k, n, group_size, groups;
  int bits, scale_type, zero_type;
};

// Scalar reference for columns [n0, n1): also the portable fallback.
void ScalarColumns(const Problem& p, int64_t n0, int64_t n1) {
  const int bits = p.bits, cpw = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const float center = (float)(1 << (bits - 1));
  for (int64_t m = 0; m < p.m; ++m) {
    const float* xm = p.x + m * p.k;
    for (int64_t n = n0; n < n1; ++n) {
      float y = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        float acc = 0.f;
        const int64_t k0 = g * p.group_size, k1 = k0 + p.group_size;
        for (int64_t k = k0; k < k1; ++k) {
          const uint32_t word = p.packed[(k / cpw) * p.n + n];
          const uint32_t q = (word >> ((k % cpw) * bits)) & mask;
          acc += xm[k] * ((float)q - center);
        }
        const float s = LoadStat(p.scale, p.scale_type, g * p.n + n);
        y += s * acc;
        if (p.zero) {
          const float z = LoadStat(p.zero, p.zero_type, g * p.n + n);
          y += (z + center * s) * p.xsum[m * p.groups + g];
        }
      }
      p.y[m * p.n + n] = y;
    }
  }
}

#if CJ_AVX2
inline __m256 LoadStat8(const void* p, int type, int64_t i) {
  switch (type) {
    case kF16:
#if defined(__F16C__)
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
#else
    {
      alignas(32) float t[8];
      for (int j = 0; j < 8; ++j) t[j] = LoadStat(p, type, i + j);
      return _mm256_load_ps(t);
    }
#endif
    case kBF16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(
              reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i))),
          16));
    default:
      return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

// Accumulates codes [c0, c1) of the word row `wrow` (code k = kbase + c) for MB rows and
// 16 columns into acc. The two loaded word vectors are pre-shifted to code c0.
template <int BITS, int MB>
inline void WordCodes(const Problem& p, const uint32_t* wrow, int c0, int c1, int64_t kbase,
                      const float* const* xr, __m256 (&acc)[MB][2]) {
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256i center = _mm256_set1_epi32(1 << (BITS - 1));
  __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow));
  __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + 8));
  if (c0) {
    const __m128i sh = _mm_cvtsi32_si128(c0 * BITS);
    v0 = _mm256_srl_epi32(v0, sh);
    v1 = _mm256_srl_epi32(v1, sh);
  }
  for (int c = c0; c < c1; ++c) {
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, mask), center));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, mask), center));
    v0 = _mm256_srli_epi32(v0, BITS);
    v1 = _mm256_srli_epi32(v1, BITS);
    for (int r = 0; r < MB; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xr[r] + kbase + c);
      acc[r][0] = _mm256_fmadd_ps(xb, f0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, f1, acc[r][1]);
    }
  }
}

// Same for a full word (all cpw codes): a constant trip count the compiler unrolls.
template <int BITS, int MB>
inline void FullWord(const uint32_t* wrow, int64_t kbase, const float* const* xr,
                     __m256 (&acc)[MB][2]) {
  constexpr int CPW = 32 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256i center = _mm256_set1_epi32(1 << (BITS - 1));
  __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow));
  __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + 8));
#pragma GCC unroll 16
  for (int c = 0; c < CPW; ++c) {
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, mask), center));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, mask), center));
    v0 = _mm256_srli_epi32(v0, BITS);
    v1 = _mm256_srli_epi32(v1, BITS);
#pragma GCC unroll 4
    for (int r = 0; r < MB; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xr[r] + kbase + c);
      acc[r][0] = _mm256_fmadd_ps(xb, f0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, f1, acc[r][1]);
    }
  }
}

// Rows [m0, m0 + MB) x columns [n0, n0 + 16).
template <int BITS, int MB>
void Block16(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int CPW = 32 / BITS;
  const float center = (float)(1 << (BITS - 1));
  const float* xr[MB];
  for (int r = 0; r < MB; ++r) xr[r] = p.x + (m0 + r) * p.k;
  __m256 y[MB][2];
  for (int r = 0; r < MB; ++r) y[r][0] = y[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 acc[MB][2];
    for (int r = 0; r < MB; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int64_t k1 = (g + 1) * p.group_size;
    int64_t k = g * p.group_size;
    while (k < k1) {
      const int64_t w = k / CPW;
      const int c0 = (int)(k - w * CPW);
      const int c1 = (int)std::min<int64_t>(CPW, c0 + (k1 - k));
      const uint32_t* wrow = p.packed + w * p.n + n0;
      if (c0 == 0 && c1 == CPW) {
        FullWord<BITS, MB>(wrow, w * CPW, xr, acc);
      } else {
        WordCodes<BITS, MB>(p, wrow, c0, c1, w * CPW, xr, acc);
      }
      k += c1 - c0;
    }
    const __m256 s0 = LoadStat8(p.scale, p.scale_type, g * p.n + n0);
    const __m256 s1 = LoadStat8(p.scale, p.scale_type, g * p.n + n0 + 8);
    for (int r = 0; r < MB; ++r) {
      y[r][0] = _mm256_fmadd_ps(s0, acc[r][0], y[r][0]);
      y[r][1] = _mm256_fmadd_ps(s1, acc[r][1], y[r][1]);
    }
    if (p.zero) {
      const __m256 c = _mm256_set1_ps(center);
      const __m256 o0 = _mm256_fmadd_ps(c, s0, LoadStat8(p.zero, p.zero_type, g * p.n + n0));
      const __m256 o1 = _mm256_fmadd_ps(c, s1, LoadStat8(p.zero, p.zero_type, g * p.n + n0 + 8));
      for (int r = 0; r < MB; ++r) {
        const __m256 xs = _mm256_set1_ps(p.xsum[(m0 + r) * p.groups + g]);
        y[r][0] = _mm256_fmadd_ps(o0, xs, y[r][0]);
        y[r][1] = _mm256_fmadd_ps(o1, xs, y[r][1]);
      }
    }
  }
  for (int r = 0; r < MB; ++r) {
    _mm256_storeu_ps(p.y + (m0 + r) * p.n + n0, y[r][0]);
    _mm256_storeu_ps(p.y + (m0 + r) * p.n + n0 + 8, y[r][1]);
  }
}

template <int BITS>
void Blocks(const Problem& p, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 16;
    int64_t m0 = 0;
    for (; m0 + 4 <= p.m; m0 += 4) Block16<BITS, 4>(p, m0, n0);
    switch (p.m - m0) {
      case 3: Block16<BITS, 3>(p, m0, n0); break;
      case 2: Block16<BITS, 2>(p, m0, n0); break;
      case 1: Block16<BITS, 1>(p, m0, n0); break;
      default: break;
    }
  }
}
#endif  // CJ_AVX2

// Column work item i of `items`: full 16-column blocks split evenly; the last item also does the
// N % 16 tail columns (scalar).
void RunItem(const Problem& p, int64_t i, int64_t items) {
#if CJ_AVX2
  const int64_t nb = p.n / 16;
  const int64_t b0 = nb * i / items, b1 = nb * (i + 1) / items;
  switch (p.bits) {
    case 2: Blocks<2>(p, b0, b1); break;
    case 3: Blocks<3>(p, b0, b1); break;
    case 4: Blocks<4>(p, b0, b1); break;
    case 8: Blocks<8>(p, b0, b1); break;
  }
  if (i == items - 1 && nb * 16 < p.n) ScalarColumns(p, nb * 16, p.n);
#else
  const int64_t n0 = p.n * i / items, n1 = p.n * (i + 1) / items;
  ScalarColumns(p, n0, n1);
#endif
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t items = 0;
  Problem problem;
};

// Claims and runs items until none is left. A task that starts after all items were claimed
// returns without touching the buffers, so the caller only waits for claimed items.
void Drain(Shared* s) {
  for (;;) {
    const int64_t i = s->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= s->items) return;
    RunItem(s->problem, i, s->items);
    s->done.fetch_add(1, std::memory_order_release);
  }
}

int StatTypeOf(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::F16: return kF16;
    case ffi::DataType::BF16: return kBF16;
    default: return -1;
  }
}

ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> packed,
               ffi::AnyBuffer scale, const ffi::AnyBuffer* zero, int64_t bits,
               int64_t group_size, int64_t threads, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), pd = packed.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || pd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("quant_gemv: x, packed and scale must be 2-D");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    return ffi::Error::InvalidArgument("quant_gemv: bits must be 2, 3, 4 or 8");
  Problem p;
  p.m = xd[0];
  p.k = xd[1];
  p.n = pd[1];
  p.bits = (int)bits;
  p.group_size = group_size;
  const int64_t cpw = 32 / bits;
  if (group_size <= 0 || p.k % group_size)
    return ffi::Error::InvalidArgument("quant_gemv: group_size must divide K");
  p.groups = p.k / group_size;
  if (pd[0] != (p.k + cpw - 1) / cpw && pd[0] != ((p.k + 31) / 32) * bits)
    return ffi::Error::InvalidArgument("quant_gemv: packed rows do not match K and bits");
  if (sd[0] != p.groups || sd[1] != p.n)
    return ffi::Error::InvalidArgument("quant_gemv: scale must be (K / group_size, N)");
  p.scale_type = StatTypeOf(scale.element_type());
  if (p.scale_type < 0)
    return ffi::Error::InvalidArgument("quant_gemv: scale must be float32, float16 or bfloat16");
  p.zero = nullptr;
  p.zero_type = 0;
  std::vector<float> xsum;
  if (zero) {
    auto zd = zero->dimensions();
    if (zd.size() != 2 || zd[0] != p.groups || zd[1] != p.n)
      return ffi::Error::InvalidArgument("quant_gemv: zero must be (K / group_size, N)");
    p.zero_type = StatTypeOf(zero->element_type());
    if (p.zero_type < 0)
      return ffi::Error::InvalidArgument("quant_gemv: zero must be float32, float16 or bfloat16");
    p.zero = zero->untyped_data();
    xsum.assign(p.m * p.groups, 0.f);
    for (int64_t m = 0; m < p.m; ++m)
      for (int64_t g = 0; g < p.groups; ++g) {
        float s = 0.f;
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += x.typed_data()[m * p.k + k];
        xsum[m * p.groups + g] = s;
      }
  }
  p.x = x.typed_data();
  p.packed = packed.typed_data();
  p.scale = scale.untyped_data();
  p.xsum = xsum.empty() ? nullptr : xsum.data();
  p.y = y->typed_data();
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();

  // Work items: at least 4 column blocks (64 columns) each, at most one per thread.
  int64_t avail = threads > 0 ? threads : std::max<int64_t>(1, pool.num_threads());
  const int64_t blocks = std::max<int64_t>(1, p.n / 16);
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>(avail, blocks / 4));
  if (items == 1) {
    RunItem(p, 0, 1);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared>();
  shared->items = items;
  shared->problem = p;
  for (int64_t t = 1; t < items; ++t) pool.Schedule([shared]() { Drain(shared.get()); });
  Drain(shared.get());
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error Sym(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> packed,
               ffi::AnyBuffer scale, int64_t bits, int64_t group_size, int64_t threads,
               ffi::ResultBuffer<ffi::F32> y) {
  return Run(pool, x, packed, scale, nullptr, bits, group_size, threads, y);
}

ffi::Error Asym(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> packed,
                ffi::AnyBuffer scale, ffi::AnyBuffer zero, int64_t bits, int64_t group_size,
                int64_t threads, ffi::ResultBuffer<ffi::F32> y) {
  return Run(pool, x, packed, scale, &zero, bits, group_size, threads, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cj_quant_gemv_sym, Sym,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(cj_quant_gemv_asym, Asym,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when built with the AVX2/FMA path, 0 for the portable scalar loop.
extern "C" int cj_quant_gemv_simd() { return CJ_AVX2; }
