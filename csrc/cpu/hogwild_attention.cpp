// CPU launcher of hogwild_C::hogwild_attention: position-delta attention over a paged cache.
//
// Work item = (up to 16 query tokens, KV head). The item's (token, segment) pairs are grouped by the keys they read
// (views share the prompt, the history and each other's steps), and each group's keys are read once, in runs
// inside one block, for every query head of every token that reads them: each token's heads are rotated by that
// token's delta for the segment (fp32, pre-scaled), masked to the token's visible prefix, and folded into the
// token's online softmax. Nothing is written but out and lse. Inner
// loops run on fp32 vectors of the widest ISA the build enables (16 lanes with AVX-512, else 8: AVX2 or two SSE
// registers), over page tokens for keys and over dims for values. Two page packings: strided views (vLLM's `vec`
// packing has dim-major key pages) and vLLM's `amx` pages, whose 32-bit lanes each hold a pair of 16-bit elements
// (two dims of one key, one dim of two tokens' values), so that one load serves two dims or two tokens; the
// packing is a template argument, chosen once per call. Items run in parallel with at::parallel_for, on the threads
// the caller's process has (vLLM's CPU worker gives its OpenMP pool its own cores).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && __GNUC__ >= 11
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HOGWILD_AMX_TILES 1  // AMX tile code is compiled (target attribute) and chosen at run time
#endif

#include "../device/hogwild_attention.cuh"
#include "../device/rotate_by_delta.cuh"
#include "../hogwild_attention_args.h"
#include "../ops.h"

namespace {

using hogwild::HogwildAttentionParams;
using hogwild::SegmentRow;

constexpr int64_t kAmxKeyTokens = 16;   // tokens of one key group of an amx page (one dim-pair row: 16 lanes)
constexpr int64_t kAmxValueDims = 16;   // dims of one value group of an amx page (one token-pair row: 16 lanes)

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;           // fp32 lanes of one vector: an AVX-512 register
#else
constexpr int64_t kLanes = 8;            // fp32 lanes of one vector (AVX2 register; two SSE registers without AVX)
#endif
constexpr int kRun = 8;                  // vectors of keys in one run (one softmax update per run and row)
constexpr int64_t kChunk = kRun * kLanes;  // one aligned run of 64 (128) page tokens
constexpr int kScoreVectors = 4;         // vectors of keys scored at once (accumulators held in registers)
constexpr int64_t kScoreHeads = 3;       // query heads whose scores stay in registers together (3 x 4 vectors)
constexpr int64_t kValueHeads = 4;       // query heads whose value sums stay in registers together
#if defined(__AVX512F__)
constexpr int kValueVecs = 4;            // ... over 4 vectors of dims each (32 registers: 16 sums, 4 values)
#else
constexpr int kValueVecs = 2;            // ... over 2 vectors of dims each (16 registers: 8 sums, 2 values)
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t vhalfbits __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vbits __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// A broadcast. The portable `vfloat{} + v` costs an add first (0 + v is not v for v = -0).
inline vfloat splat(float v) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_set1_ps(v));
#elif defined(__AVX2__)
  return reinterpret_cast<vfloat>(_mm256_set1_ps(v));
#else
  return vfloat{} + v;
#endif
}

// kLanes consecutive elements of storage -> fp32 lanes. bf16 is the upper half of an fp32 (a shift).
inline vfloat load_lanes(const float* src) {
  vfloat v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}
inline vfloat load_lanes(const c10::BFloat16* src) {
#if defined(__AVX512F__)  // one widening load (the portable form below splits it in two halves)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const vbits wide = reinterpret_cast<vbits>(_mm512_maskz_cvtepu16_epi32(0xFFFF, bits)) << 16;  // maskz: no
  return reinterpret_cast<vfloat>(wide);  // undefined operand inside the intrinsic, which GCC 12 warns about
#elif defined(__AVX2__)
  const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), 16);
  return reinterpret_cast<vfloat>(_mm256_castsi256_ps(wide));
#else
  vhalfbits h;
  std::memcpy(&h, src, sizeof(h));
  const vbits wide = __builtin_convertvector(h, vbits) << 16;
  vfloat v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
#endif
}
inline vfloat load_lanes(const c10::Half* src) {
#if defined(__AVX512F__)
  // the masked form: GCC 12 warns on the plain one (an undefined source operand inside the intrinsic)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return reinterpret_cast<vfloat>(_mm512_mask_cvtph_ps(_mm512_setzero_ps(), 0xFFFF, bits));
#elif defined(__F16C__)
  return reinterpret_cast<vfloat>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
#else
  float tmp[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) tmp[i] = static_cast<float>(src[i]);
  return load_lanes(tmp);
#endif
}
// kLanes fp16 bit patterns -> fp32 lanes.
inline vfloat halves_to_float(vhalfbits h) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_mask_cvtph_ps(_mm512_setzero_ps(), 0xFFFF, reinterpret_cast<__m256i>(h)));
#elif defined(__F16C__)
  return reinterpret_cast<vfloat>(_mm256_cvtph_ps(reinterpret_cast<__m128i>(h)));
#else
  vfloat v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(c10::Half(h[i], c10::Half::from_bits()));
  return v;
#endif
}

// Amx pages: kLanes 32-bit lanes, each a pair of 16-bit elements; the low halves (first element of each pair) or
// the high halves as fp32. Each takes only its own half's bits, so the other half may hold anything (NaN bits).
inline vbits load_pairs(const void* src) {
  vbits bits;
  std::memcpy(&bits, src, sizeof(bits));
  return bits;
}
inline vfloat low_halves(vbits bits, c10::BFloat16) { return reinterpret_cast<vfloat>(bits << 16); }
inline vfloat high_halves(vbits bits, c10::BFloat16) { return reinterpret_cast<vfloat>(bits & 0xFFFF0000u); }
inline vfloat low_halves(vbits bits, c10::Half) { return halves_to_float(__builtin_convertvector(bits, vhalfbits)); }
inline vfloat high_halves(vbits bits, c10::Half) {
  return halves_to_float(__builtin_convertvector(bits >> 16, vhalfbits));
}

inline float load_float(float v) { return v; }
inline float load_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float load_float(c10::Half v) { return static_cast<float>(v); }

// exp(x) for x <= kRescaleSlack (scores minus the max their row keeps, see fold_run), lane-wise and branch-free:
// 2^(x log2 e) = 2^k * 2^f with k = round(x log2 e) and f in [-0.5, 0.5], 2^f by a polynomial of degree kDegree:
// 6 (rel. error ~2e-7, exp_softmax) or 4 (~3e-6, 2 FMAs fewer: a whole run's weights on tiles, rounded to bf16,
// rel. error up to 4e-3, before they multiply anything; the row's sum takes the same unrounded values). exp_softmax
// clamps its inputs at -87 (-inf gives about 1e-38 instead of 0, which no sum of weights >= 1 notices). With AVX-512
// the rounding and the scaling by 2^k are one instruction each (exp2_scaled: roundscale, scalef, the same values
// as the portable form in 4 fewer instructions, for any finite exponent).
constexpr float kLog2e = 1.44269504088896341f;
// A row keeps its running max until a run's scores pass it by more than this (natural-log units): its weights stay
// below e^8 (~3e3: nothing for fp32 sums or bf16 weights), and its sums are rescaled when the max moves that much
// (a few times a row), not at every new max; lse = m + log(l) holds for any m the row keeps.
constexpr float kRescaleSlack = 8.0f;
template <int kDegree>
inline vfloat exp2_poly(vfloat f) {  // 2^f for f in [-0.5, 0.5]
  static_assert(kDegree == 6 || kDegree == 4);
  vfloat p;
  if constexpr (kDegree == 6) {
    p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    return p * f + 1.0f;
  } else {
    p = splat(9.570100784334288e-3f);
    p = p * f + 5.591786531460563e-2f;
    p = p * f + 2.402474489995212e-1f;
    p = p * f + 6.931218141366835e-1f;
    return p * f + 9.999992614102028e-1f;
  }
}
#if defined(__AVX512F__)
// 2^t for finite t of any size (scalef takes any exponent): rounding and scaling by 2^k one instruction each. The
// maskz forms: the plain ones have an undefined operand inside the intrinsic, which GCC 12 warns about.
template <int kDegree>
inline vfloat exp2_scaled(vfloat t) {
  const __m512 k = _mm512_maskz_roundscale_ps(0xFFFF, reinterpret_cast<__m512>(t),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vfloat p = exp2_poly<kDegree>(t - reinterpret_cast<vfloat>(k));
  return reinterpret_cast<vfloat>(_mm512_maskz_scalef_ps(0xFFFF, reinterpret_cast<__m512>(p), k));
}
#endif
inline vfloat exp_softmax(vfloat x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vfloat t = x * kLog2e;
#if defined(__AVX512F__)
  return exp2_scaled<6>(t);
#else
  const vfloat k = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const vfloat p = exp2_poly<6>(t - k);
  const vint bits = (__builtin_convertvector(k, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}
inline float exp_softmax(float x) { return exp_softmax(splat(x))[0]; }

// Horizontal max and sum, as trees of shuffles where the ISA has them (a lane-by-lane loop is a long dependency
// chain, paid once per run and row).
#if defined(__AVX2__)
#if defined(__AVX512F__)
inline __m256 half_lanes(vfloat v, int half) {  // lanes 8 * half .. 8 * half + 7
  // maskz: the plain forms (and the cast) have an undefined operand inside the intrinsic, which GCC 12 warns about
  const __m512d x = _mm512_castps_pd(reinterpret_cast<__m512>(v));
  return _mm256_castpd_ps(half == 0 ? _mm512_maskz_extractf64x4_pd(0xFF, x, 0)
                                    : _mm512_maskz_extractf64x4_pd(0xFF, x, 1));
}
#endif
inline float max8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float sum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
inline float lane_max(vfloat v) {
#if defined(__AVX512F__)
  return max8(_mm256_max_ps(half_lanes(v, 0), half_lanes(v, 1)));
#elif defined(__AVX2__)
  return max8(reinterpret_cast<__m256>(v));
#else
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
#endif
}
inline float lane_sum(vfloat v) {
#if defined(__AVX512F__)
  return sum8(_mm256_add_ps(half_lanes(v, 0), half_lanes(v, 1)));
#elif defined(__AVX2__)
  return sum8(reinterpret_cast<__m256>(v));
#else
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

constexpr int64_t kTileRows = 16;   // rows of one AMX tile, and fp32 columns of a result tile
constexpr int64_t kTileDepth = 32;  // bf16 elements along the dot product in one tile row (64 bytes)
inline int64_t tile_rows(int64_t rows) { return (rows + kTileRows - 1) / kTileRows * kTileRows; }

// The query tokens of one work item that read one run of keys: (sequence, first token), every use with its own
// visible prefix and rotation. Views share the prompt, the history and each other's steps, so the keys of such a
// segment are loaded once for all the tokens (and query heads) that read them.
struct SegmentUse {
  int64_t token;    // index inside the work item's tokens
  int64_t visible;  // keys start .. start + visible - 1
  hogwild::CosSinRow row;
};
struct SharedSegment {
  int64_t seq, start, longest;
  std::vector<SegmentUse> uses;
};

// Per-thread scratch. Rows of the item: up to kTokensPerItem tokens x G query heads (token-major): q, acc, state.
// Rows of one shared segment (its uses x G, grown as needed): q_rot, scores, acc_s, state_s, sums, limit; with AMX
// tiles also the rows' bf16 queries and weights (q16, p16; a whole number of 16-row tiles, as acc_s).
constexpr int64_t kTokensPerItem = 16;
struct Scratch {
  std::vector<float> q, acc, q_rot, acc_s;
  std::vector<hogwild::SoftmaxState> state, state_s;
  std::vector<vfloat> scores, sums;  // sums: a segment row's weights so far, lane-wise
  std::vector<int64_t> limit;
  std::vector<uint16_t> q16, p16;
  // The item's shared segments are shared[0 .. num_shared): entries past it keep their `uses` vectors (and their
  // capacity) for the next item, so that grouping allocates nothing once the scratch has grown.
  std::vector<SharedSegment> shared;
  size_t num_shared = 0;
  int64_t head_size = 0, value_size = 0;  // of the rows sized so far
  // Sized for `rows` item rows of these head and value sizes; a thread keeps its scratch from call to call (one per
  // thread: thread_local), so after the first calls of a shape nothing here allocates.
  void prepare(int64_t rows, int64_t head, int64_t value) {
    if (head != head_size || value != value_size) {  // another model's shapes: start over
      *this = Scratch();
      head_size = head;
      value_size = value;
    }
    if (static_cast<int64_t>(state.size()) < rows) {
      q.resize(rows * head);
      acc.resize(rows * value);
      state.resize(rows);
    }
  }
  void reserve_segment_rows(int64_t rows, int64_t head_size, int64_t value_size) {
    if (static_cast<int64_t>(limit.size()) >= rows) return;
    const int64_t padded = tile_rows(rows);
    q_rot.resize(rows * head_size);
    acc_s.resize(padded * value_size);  // AMX tiles load and store whole 16-row blocks of it
    state_s.resize(rows);
    sums.resize(rows);
    scores.resize(padded * kRun);
    limit.resize(rows);
    q16.assign(padded * head_size, 0);
    p16.assign(padded * kChunk, 0);
  }
};

// Score accumulators of kBlock heads x kVectors vectors of keys, zeroed; store() writes them to the heads' rows of
// `scores` (kRun vectors a row). Shared by the score loops of both packings.
template <int kBlock, int kVectors>
struct ScoreAcc {
  vfloat acc[kBlock][kVectors] = {};
  void store(vfloat* scores, int64_t g0) const {
    for (int b = 0; b < kBlock; ++b) {
      for (int v = 0; v < kVectors; ++v) scores[kRun * (g0 + b) + v] = acc[b][v];
    }
  }
};

// Dim-major page (vLLM's CPU layout), block_size % kLanes == 0: scores of the run of kVectors vectors of page
// tokens from j0 (vector-aligned) for heads g0 .. g0 + kBlock - 1. Each key vector is loaded once for all heads.
template <int kBlock, int kVectors, typename scalar_t>
inline void score_run_dim_major(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0,
                                const float* q_rot, int64_t g0, vfloat* scores) {
  ScoreAcc<kBlock, kVectors> a;
  auto& acc = a.acc;
  const int64_t d_size = p.head_size;
  for (int64_t d = 0; d < d_size; ++d) {
    const scalar_t* col = page + d * p.k_stride_dim + j0;
    vfloat qd[kBlock];
    for (int b = 0; b < kBlock; ++b) qd[b] = splat(q_rot[(g0 + b) * d_size + d]);
    for (int v = 0; v < kVectors; ++v) {
      const vfloat k = load_lanes(col + v * kLanes);
      for (int b = 0; b < kBlock; ++b) acc[b][v] += qd[b] * k;
    }
  }
  a.store(scores, g0);
}

// Amx key page (groups of 16 tokens; in a group, one row of 16 lanes per dim pair, lane i = token i's two dims):
// as score_run_dim_major. Vector v holds page tokens j0 + v * kLanes ..; one load per dim pair gives both dims'
// keys of its kLanes tokens (low halves: the even dim, high halves: the odd one).
template <int kBlock, int kVectors, typename scalar_t>
inline void score_run_amx(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0,
                          const float* q_rot, int64_t g0, vfloat* scores) {
  ScoreAcc<kBlock, kVectors> a;
  auto& acc = a.acc;
  const int64_t d_size = p.head_size;
  const scalar_t* lanes[kVectors];  // vector v's lanes in the row of dims 0 and 1
  for (int v = 0; v < kVectors; ++v) {
    const int64_t j = j0 + v * kLanes;
    lanes[v] = page + (j / kAmxKeyTokens) * kAmxKeyTokens * d_size + (j % kAmxKeyTokens) * 2;
  }
  for (int64_t d = 0; d < d_size; d += 2) {  // the row of dims d, d + 1 starts d * 16 elements into the group
    vfloat q_even[kBlock], q_odd[kBlock];
    for (int b = 0; b < kBlock; ++b) {
      q_even[b] = splat(q_rot[(g0 + b) * d_size + d]);
      q_odd[b] = splat(q_rot[(g0 + b) * d_size + d + 1]);
    }
    for (int v = 0; v < kVectors; ++v) {
      const vbits bits = load_pairs(lanes[v] + d * kAmxKeyTokens);
      const vfloat even = low_halves(bits, scalar_t{}), odd = high_halves(bits, scalar_t{});
      for (int b = 0; b < kBlock; ++b) {
        acc[b][v] += q_even[b] * even;
        acc[b][v] += q_odd[b] * odd;
      }
    }
  }
  a.store(scores, g0);
}

template <int kBlock, int kVectors, bool kAmx, typename scalar_t>
inline void score_block(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0,
                        const float* q_rot, int64_t g0, vfloat* scores) {
  if constexpr (kAmx) {
    score_run_amx<kBlock, kVectors>(p, page, j0, q_rot, g0, scores);
  } else {
    score_run_dim_major<kBlock, kVectors>(p, page, j0, q_rot, g0, scores);
  }
}

// All heads of the group, in blocks of kScoreHeads.
template <int kVectors, bool kAmx, typename scalar_t>
inline void score_heads(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0, int64_t group,
                        const float* q_rot, vfloat* scores) {
  int64_t g0 = 0;
  for (; g0 + kScoreHeads <= group; g0 += kScoreHeads) {
    score_block<kScoreHeads, kVectors, kAmx>(p, page, j0, q_rot, g0, scores);
  }
  switch (group - g0) {
    case 2: score_block<2, kVectors, kAmx>(p, page, j0, q_rot, g0, scores); break;
    case 1: score_block<1, kVectors, kAmx>(p, page, j0, q_rot, g0, scores); break;
    default: break;
  }
}

// scores[g] (kRun vectors: page tokens j0 .. j0 + kChunk - 1) for every head g of the group; lanes outside the run
// are garbage here and masked by the caller.
template <bool kAmx, typename scalar_t>
void score_run(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0, int64_t lo, int64_t hi,
               int64_t group, const float* q_rot, vfloat* scores) {
  if (kAmx || (p.k_stride_token == 1 && p.block_size % kLanes == 0)) {
    const int nv = static_cast<int>((hi + kLanes - 1) / kLanes);  // vectors the run needs (short segments: fewer)
    for (int v0 = 0; v0 < nv; v0 += kScoreVectors) {
      const int64_t j = j0 + v0 * kLanes;
      switch (std::min(nv - v0, kScoreVectors)) {
        case 1: score_heads<1, kAmx>(p, page, j, group, q_rot, scores + v0); break;
        case 2: score_heads<2, kAmx>(p, page, j, group, q_rot, scores + v0); break;
        case 3: score_heads<3, kAmx>(p, page, j, group, q_rot, scores + v0); break;
        default: score_heads<kScoreVectors, kAmx>(p, page, j, group, q_rot, scores + v0); break;
      }
    }
    return;
  }
  const int64_t d_size = p.head_size;  // any other layout: one dot product per (token, head)
  for (int64_t g = 0; g < group; ++g) {
    float* s = reinterpret_cast<float*>(scores + kRun * g);
    for (int64_t j = lo; j < hi; ++j) {
      const scalar_t* key = page + (j0 + j) * p.k_stride_token;
      const float* q = q_rot + g * d_size;
      float dot = 0.0f;
      for (int64_t d = 0; d < d_size; ++d) dot += q[d] * load_float(key[d * p.k_stride_dim]);
      s[j] = dot;
    }
  }
}

// Value sums of kBlock rows x kVecs vectors of dims (rows g0 .., dims d0 ..), loaded from and stored back to the
// rows of `acc` (dv floats a row). Shared by the value loops of both packings.
template <int kBlock, int kVecs>
struct ValueAcc {
  vfloat a[kBlock][kVecs];
  float* acc;
  int64_t dv, g0, d0;
  ValueAcc(float* acc_, int64_t dv_, int64_t g0_, int64_t d0_) : acc(acc_), dv(dv_), g0(g0_), d0(d0_) {
    for (int b = 0; b < kBlock; ++b) {
      for (int v = 0; v < kVecs; ++v) a[b][v] = load_lanes(acc + (g0 + b) * dv + d0 + v * kLanes);
    }
  }
  void store() const {
    for (int b = 0; b < kBlock; ++b) {
      for (int v = 0; v < kVecs; ++v) std::memcpy(acc + (g0 + b) * dv + d0 + v * kLanes, &a[b][v], sizeof(vfloat));
    }
  }
};

// For the heads g0 .. g0 + kBlock - 1: acc[g][d0 .. d0 + kVecs * kLanes) += sum over lanes j in lo .. hi - 1 of
// p[g][j] * value of page token j0 + j. Each value vector is loaded once for all heads of the block, and the
// accumulators stay in registers over the run (kBlock and kVecs are constants so that they can).
template <int kBlock, int kVecs, typename scalar_t>
inline void accumulate_values(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0,
                              int64_t lo, int64_t hi, const vfloat* probs, float* acc, int64_t g0, int64_t d0) {
  const int64_t dv = p.value_size;
  ValueAcc<kBlock, kVecs> sums(acc, dv, g0, d0);
  auto& a = sums.a;
  for (int64_t j = lo; j < hi; ++j) {
    const scalar_t* value = vpage + (j0 + j) * p.v_stride_token + d0;
    vfloat val[kVecs];
    for (int v = 0; v < kVecs; ++v) val[v] = load_lanes(value + v * kLanes);
    for (int b = 0; b < kBlock; ++b) {
      const vfloat weight = splat(reinterpret_cast<const float*>(probs + kRun * (g0 + b))[j]);
      for (int v = 0; v < kVecs; ++v) a[b][v] += weight * val[v];
    }
  }
  sums.store();
}

// Amx value page (groups of 16 dims; in a group, one row of 16 lanes per token pair, lane i = dim i of both
// tokens): as accumulate_values. Vector v holds dims d0 + v * kLanes ..; one load per token pair gives both tokens'
// values (low halves: the even token, high halves: the odd one). A run that starts or ends inside a pair takes only
// its own token's half: the other slot may never have been written (NaN bits), so it is left out, not weighted 0.
template <int kBlock, int kVecs, typename scalar_t>
inline void accumulate_values_amx(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0,
                                  int64_t lo, int64_t hi, const vfloat* probs, float* acc, int64_t g0, int64_t d0) {
  const int64_t dv = p.value_size;
  ValueAcc<kBlock, kVecs> sums(acc, dv, g0, d0);
  auto& a = sums.a;
  const scalar_t* lanes[kVecs];  // vector v's lanes in the row of tokens 0 and 1
  for (int v = 0; v < kVecs; ++v) {
    const int64_t d = d0 + v * kLanes;
    lanes[v] = vpage + (d / kAmxValueDims) * kAmxValueDims * p.block_size + (d % kAmxValueDims) * 2;
  }
  const float* weight[kBlock];  // weight[b][j]: head g0 + b's probability of lane j
  for (int b = 0; b < kBlock; ++b) weight[b] = reinterpret_cast<const float*>(probs + kRun * (g0 + b));
  // j0 is even (vector-aligned), so page token j0 + j is the second of its pair iff j is odd; the row of tokens
  // t, t + 1 (t even) starts t * 16 elements into the group.
  int64_t j = lo;
  if (j % 2 == 1 && j < hi) {  // the run starts on the second token of a pair
    for (int v = 0; v < kVecs; ++v) {
      const vfloat val = high_halves(load_pairs(lanes[v] + (j0 + j - 1) * kAmxValueDims), scalar_t{});
      for (int b = 0; b < kBlock; ++b) a[b][v] += splat(weight[b][j]) * val;
    }
    ++j;
  }
  for (; j + 1 < hi; j += 2) {
    for (int v = 0; v < kVecs; ++v) {
      const vbits bits = load_pairs(lanes[v] + (j0 + j) * kAmxValueDims);
      const vfloat first = low_halves(bits, scalar_t{}), second = high_halves(bits, scalar_t{});
      for (int b = 0; b < kBlock; ++b) {
        a[b][v] += splat(weight[b][j]) * first;
        a[b][v] += splat(weight[b][j + 1]) * second;
      }
    }
  }
  if (j < hi) {  // the run ends on the first token of a pair
    for (int v = 0; v < kVecs; ++v) {
      const vfloat val = low_halves(load_pairs(lanes[v] + (j0 + j) * kAmxValueDims), scalar_t{});
      for (int b = 0; b < kBlock; ++b) a[b][v] += splat(weight[b][j]) * val;
    }
  }
  sums.store();
}

template <int kBlock, int kVecs, bool kAmx, typename scalar_t>
inline void accumulate_block(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0,
                             int64_t lo, int64_t hi, const vfloat* probs, float* acc, int64_t g0, int64_t d0) {
  if constexpr (kAmx) {
    accumulate_values_amx<kBlock, kVecs>(p, vpage, j0, lo, hi, probs, acc, g0, d0);
  } else {
    accumulate_values<kBlock, kVecs>(p, vpage, j0, lo, hi, probs, acc, g0, d0);
  }
}

// accumulate_values for every row, kValueHeads rows at a time.
template <int kVecs, bool kAmx, typename scalar_t>
inline void accumulate_value_rows(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0,
                                  int64_t lo, int64_t hi, int64_t rows, const vfloat* probs, float* acc,
                                  int64_t d0) {
  int64_t g0 = 0;
  for (; g0 + kValueHeads <= rows; g0 += kValueHeads) {
    accumulate_block<kValueHeads, kVecs, kAmx>(p, vpage, j0, lo, hi, probs, acc, g0, d0);
  }
  switch (rows - g0) {
    case 3: accumulate_block<3, kVecs, kAmx>(p, vpage, j0, lo, hi, probs, acc, g0, d0); break;
    case 2: accumulate_block<2, kVecs, kAmx>(p, vpage, j0, lo, hi, probs, acc, g0, d0); break;
    case 1: accumulate_block<1, kVecs, kAmx>(p, vpage, j0, lo, hi, probs, acc, g0, d0); break;
    default: break;
  }
}

// lanes (fp32) -> bf16 bits, rounded to nearest even (finite inputs).
inline void store_bf16(vfloat v, uint16_t* dst) {
  vbits bits = reinterpret_cast<vbits>(v);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vhalfbits h = __builtin_convertvector(bits, vhalfbits);
  std::memcpy(dst, &h, sizeof(h));
}

#if defined(HOGWILD_AMX_TILES)
// Two vectors of lanes -> 2 kLanes bf16 at dst (lo's first), rounded to nearest even, in one AVX512-BF16
// instruction (the tile path's CPUs have it: amx_tiles_available checks; as asm, so that no function needs the
// target). Unlike store_bf16 it flushes subnormal results to 0 (weights below 1e-38 of the row's max).
inline void store_bf16_pair(vfloat lo, vfloat hi, uint16_t* dst) {
  __m512i packed;
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(packed) : "v"(hi), "v"(lo));
  std::memcpy(dst, &packed, sizeof(packed));
}
#endif

// Whether some lane of v is above `threshold`.
inline bool any_lane_above(vfloat v, float threshold) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(threshold), _CMP_GT_OQ) != 0;
#elif defined(__AVX2__)
  return _mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(v), _mm256_set1_ps(threshold), _CMP_GT_OQ)) != 0;
#else
  for (int64_t i = 0; i < kLanes; ++i) {
    if (v[i] > threshold) return true;
  }
  return false;
#endif
}

// The max a row keeps after a run whose lanes peak at run_max: its max until then, unless the run passes that by
// more than kRescaleSlack (then the run's max; always on the row's first run, from -inf).
inline float kept_max(float m, vfloat run_max) {
  return any_lane_above(run_max, m + kRescaleSlack) ? lane_max(run_max) : m;
}

// A row's softmax state after a run whose weights exp(score - m_new) sum (lane-wise) to `total`: the lane-wise sum
// of its weights so far (`sum`, reduced once the segment ends) and its value sums acc[0 .. dv) rescaled to the new
// max when it moved (kept_max).
inline void fold_run(hogwild::SoftmaxState& st, vfloat& sum, float m_new, vfloat total, float* acc, int64_t dv) {
  if (m_new != st.m) {
    const float correction = exp_softmax(st.m - m_new);
    sum *= correction;
    for (int64_t d = 0; d < dv; ++d) acc[d] *= correction;
    st.m = m_new;
  }
  sum += total;
}

// Folds the scores of one run into the online softmax of each of the `rows` rows: lanes lo .. hi - 1 are page
// tokens j0 + lo .. of the segment, from its token `seg_offset` on; row r sees the segment's first limit[r] tokens.
// state[r].m, sums[r] and acc[r * Dv ..] are row r's max, weight sums and value sums (rescaled here); the scores
// become the rows' weights (0 outside what the row sees), which accumulate_run_values then folds in. With
// `weights16` (AMX tiles, whole runs), the weights go there instead, as the tiles' bf16 rows (kChunk a row),
// straight from the registers: no fp32 round trip, and the rows' stores are long done when the value tiles load
// them.
inline void softmax_run(int64_t lo, int64_t hi, int64_t rows, int64_t dv, vfloat* scores,
                        hogwild::SoftmaxState* state, vfloat* sums, float* acc_rows, const int64_t* limit,
                        int64_t seg_offset, uint16_t* weights16 = nullptr) {
  vint lane;
  for (int64_t i = 0; i < kLanes; ++i) lane[i] = static_cast<int32_t>(i);
  const vint lo_v = vint{} + static_cast<int32_t>(lo), hi_v = vint{} + static_cast<int32_t>(hi);
  const int nv = static_cast<int>((hi + kLanes - 1) / kLanes);  // vectors holding lanes of the run
  vint inside[kRun];
  for (int v = 0; v < kRun; ++v) {
    const vint index = lane + static_cast<int32_t>(v * kLanes);
    inside[v] = (index >= lo_v) & (index < hi_v);
  }
  const vfloat neg_inf = splat(-INFINITY);
  const bool whole_run = lo == 0 && hi == kChunk;
  for (int64_t g = 0; g < rows; ++g) {
    vfloat* s = scores + kRun * g;
    // lane L holds segment token seg_offset + L - lo: visible to this row iff that is below limit[g]
    const int64_t visible_end = std::min<int64_t>(hi, lo + limit[g] - seg_offset);
    if (whole_run && visible_end == hi) {  // every lane is a key this row sees: no masks (most runs of long rows)
      vfloat run_max = s[0];
      for (int v = 1; v < kRun; ++v) run_max = run_max > s[v] ? run_max : s[v];
      const float m_new = kept_max(state[g].m, run_max);
      vfloat total = vfloat{};
#if defined(HOGWILD_AMX_TILES)
      if (weights16 != nullptr) {  // 2^(s log2 e - m log2 e): one FMA, and no clamp (every lane is a score)
        const vfloat m_log2 = splat(m_new * kLog2e);
        uint16_t* w16 = weights16 + g * kChunk;
        for (int v = 0; v < kRun; v += 2) {
          const vfloat e0 = exp2_scaled<4>(s[v] * kLog2e - m_log2);
          const vfloat e1 = exp2_scaled<4>(s[v + 1] * kLog2e - m_log2);
          store_bf16_pair(e0, e1, w16 + v * kLanes);
          total += e0 + e1;
        }
        fold_run(state[g], sums[g], m_new, total, acc_rows + g * dv, dv);
        continue;
      }
#endif
      for (int v = 0; v < kRun; ++v) {
        s[v] = exp_softmax(s[v] - m_new);
        total += s[v];
      }
      fold_run(state[g], sums[g], m_new, total, acc_rows + g * dv, dv);
      continue;
    }
    const vint row_end = vint{} + static_cast<int32_t>(visible_end);
    vint mask[kRun];
    vfloat run_max = neg_inf;
    for (int v = 0; v < nv; ++v) {
      mask[v] = inside[v] & (lane + static_cast<int32_t>(v * kLanes) < row_end);
      s[v] = mask[v] ? s[v] : neg_inf;
      run_max = run_max > s[v] ? run_max : s[v];
    }
    if (lane_max(run_max) == -INFINITY) {  // the row sees none of this run
      for (int v = 0; v < nv; ++v) s[v] = vfloat{};
    } else {
      const float m_new = kept_max(state[g].m, run_max);
      vfloat total = vfloat{};
      for (int v = 0; v < nv; ++v) {
        s[v] = mask[v] ? exp_softmax(s[v] - m_new) : vfloat{};
        total += s[v];
      }
      fold_run(state[g], sums[g], m_new, total, acc_rows + g * dv, dv);
    }
    if (weights16 != nullptr) {  // a whole run (nv == kRun) of a row that sees only part of it
      for (int v = 0; v < kRun; ++v) store_bf16(s[v], weights16 + g * kChunk + v * kLanes);
    }
  }
}

// acc[r] += sum over lanes j in lo .. hi - 1 of weight[r][j] * value of page token j0 + j, for every row r.
template <bool kAmx, typename scalar_t>
void accumulate_run_values(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0, int64_t lo,
                           int64_t hi, int64_t rows, const vfloat* scores, float* acc_rows) {
  if (lo >= hi) return;
  const int64_t dv = p.value_size;
  if (!kAmx && dv % kLanes != 0) {  // value sizes that are not a whole number of vectors: scalar (strided only)
    for (int64_t g = 0; g < rows; ++g) {
      const float* pj = reinterpret_cast<const float*>(scores + kRun * g);
      float* acc = acc_rows + g * dv;
      for (int64_t j = lo; j < hi; ++j) {
        const scalar_t* value = vpage + (j0 + j) * p.v_stride_token;
        for (int64_t d = 0; d < dv; ++d) acc[d] += pj[j] * load_float(value[d]);
      }
    }
    return;
  }
  int64_t d0 = 0;  // chunks of kValueVecs vectors of dims, then what is left vector by vector
  for (; d0 + kValueVecs * kLanes <= dv; d0 += kValueVecs * kLanes) {
    accumulate_value_rows<kValueVecs, kAmx>(p, vpage, j0, lo, hi, rows, scores, acc_rows, d0);
  }
  for (; d0 < dv; d0 += kLanes) accumulate_value_rows<1, kAmx>(p, vpage, j0, lo, hi, rows, scores, acc_rows, d0);
}

// AMX tiles on bf16 amx pages. The pages are already laid out as the B operand of a tile dot product (keys: one
// 64-byte row per dim pair of 16 tokens; values: one row per token pair of 16 dims), so the op multiplies straight
// from the cache: scores = queries (rounded to bf16 once per segment) x 16 keys per tile, value sums = weights
// (rounded to bf16) x 32 tokens' values per tile, fp32 accumulation in the tiles. The softmax, its masks and the
// rescaling stay on fp32 vectors, as on the other paths. Rows are processed 16 at a time (a tile's rows); the
// buffers hold a whole number of 16-row blocks (the rows past the last real one carry weight 0 into the value sums,
// and their scores and sums are never read). Chosen at run time (AMX-capable CPU, the kernel's permission for tile
// state, HOGWILD_CPU_AMX_TILES not "0"); each thread sets its tile configuration for its share of a call and puts
// back the one it found (vLLM's own kernel keeps one between calls).
#if defined(HOGWILD_AMX_TILES)

bool amx_tiles_available() {
  static const bool available = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool avx512_bf16 = (a >> 5) & 1u;  // the softmax's bf16 conversions (store_bf16_pair)
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // arch_prctl: ask for the tile data state
    return tile && bf16 && avx512_bf16 && syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return available;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows of 64 bytes: 0-3 hold the A operands that stay loaded over a run (up to four 32-dim chunks
// of the query rows for scores, up to four 32-token slices of the weights for value sums), 4 and 6 the B operands
// read from the pages (in turn, so that one loads while the other multiplies), 5 and 7 the results (two 16-key
// groups, or two 16-dim groups, at once). Loaded for the scope of one thread's share of a call; the thread's previous
// configuration (vLLM's kernel keeps its own between calls) is put back after.
class TileScope {
 public:
  __attribute__((target("amx-tile"))) TileScope() {
    _tile_storeconfig(&saved_);
    TileConfig mine;
    for (int t = 0; t < 8; ++t) {
      mine.colsb[t] = 64;
      mine.rows[t] = kTileRows;
    }
    // GCC 12 does not count the bytes ldtilecfg reads as a use of them (it dropped the stores above without this)
    asm volatile("" : : "r"(&mine) : "memory");
    _tile_loadconfig(&mine);
  }
  __attribute__((target("amx-tile"))) ~TileScope() {
    if (saved_.palette == 0) {
      _tile_release();
    } else {
      _tile_loadconfig(&saved_);
    }
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  TileConfig saved_;
};

// The tile instructions with the tile number a template argument (the compiler's intrinsics take it as a literal
// token). Loads and stores are memory barriers: the scratch rows they read are written just before, and the
// scores and sums they write are read just after.
template <int kTile>
inline void tile_load(const void* base, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" : : "r"(base), "r"(stride), "i"(kTile) : "memory");
}
template <int kTile>
inline void tile_store(void* base, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" : : "r"(base), "r"(stride), "i"(kTile) : "memory");
}
template <int kTile>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" : : "i"(kTile));
}
template <int kSum, int kA, int kB>
inline void tile_dot() {  // kSum (fp32, 16 x 16) += kA (16 rows of 32 bf16) x kB (16 rows of 16 bf16 pairs)
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" : : "i"(kSum), "i"(kA), "i"(kB));
}

// kSum += sum over the kCount resident A tiles c (0 ..) of A tile c x the B rows at b + c * b_step (B tiles 4, 6).
template <int kCount, int kSum, int c = 0>
inline void dot_resident(const c10::BFloat16* b, int64_t b_step) {
  if constexpr (c < kCount) {
    constexpr int kB = c % 2 == 0 ? 4 : 6;
    tile_load<kB>(b + c * b_step, 64);
    tile_dot<kSum, c, kB>();
    dot_resident<kCount, kSum, c + 1>(b, b_step);
  }
}
template <int kCount, int c = 0>
inline void load_resident(const uint16_t* a, int64_t a_step, int64_t stride) {
  if constexpr (c < kCount) {
    tile_load<c>(a + c * a_step, stride);
    load_resident<kCount, c + 1>(a, a_step, stride);
  }
}

// scores[r][v] (kRun vectors a row) for the 16-token key groups v < groups of the run (from page token j0, a
// multiple of 16) and the 16 rows of q (bf16, kChunks * 32 dims a row), the row block's chunks held in tiles 0 ...
// Lanes outside the run are whatever the page holds there (masked by the softmax).
template <int kChunks>
__attribute__((target("amx-tile,amx-bf16"))) void score_rows_tiles(const c10::BFloat16* kpage, int64_t j0,
                                                                     int64_t groups, const uint16_t* q,
                                                                     vfloat* scores) {
  constexpr int64_t d_size = kChunks * kTileDepth;
  constexpr int64_t group_step = kAmxKeyTokens * d_size, chunk_step = kTileDepth * kAmxKeyTokens;
  load_resident<kChunks>(q, kTileDepth, d_size * sizeof(uint16_t));
  const c10::BFloat16* keys = kpage + j0 * d_size;
  for (int64_t v = 0; v < groups; v += 2) {
    tile_zero<5>();
    dot_resident<kChunks, 5>(keys + v * group_step, chunk_step);
    if (v + 1 < groups) {
      tile_zero<7>();
      dot_resident<kChunks, 7>(keys + (v + 1) * group_step, chunk_step);
    }
    tile_store<5>(scores + v, kRun * sizeof(vfloat));
    if (v + 1 < groups) tile_store<7>(scores + v + 1, kRun * sizeof(vfloat));
  }
}

// Any head size (a multiple of 32): the query chunks are loaded again for every key group.
__attribute__((target("amx-tile,amx-bf16"))) void score_rows_tiles_any(const c10::BFloat16* kpage, int64_t j0,
                                                                         int64_t groups, const uint16_t* q,
                                                                         int64_t d_size, vfloat* scores) {
  for (int64_t v = 0; v < groups; ++v) {
    const c10::BFloat16* keys = kpage + (j0 + v * kAmxKeyTokens) * d_size;
    tile_zero<5>();
    for (int64_t d = 0; d < d_size; d += kTileDepth) {
      tile_load<0>(q + d, d_size * sizeof(uint16_t));
      tile_load<4>(keys + d * kAmxKeyTokens, 64);
      tile_dot<5, 0, 4>();
    }
    tile_store<5>(scores + v, kRun * sizeof(vfloat));
  }
}

// scores[r][v] for every row r < rows (q16: tile_rows(rows) bf16 rows of head_size) and the key groups of the run
// (page tokens j0 .. j0 + hi - 1, j0 a multiple of 16).
void score_run_tiles(const c10::BFloat16* kpage, int64_t j0, int64_t hi, int64_t rows, int64_t head_size,
                     const uint16_t* q16, vfloat* scores) {
  const int64_t groups = (hi + kAmxKeyTokens - 1) / kAmxKeyTokens;
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const uint16_t* q = q16 + r0 * head_size;
    vfloat* s = scores + kRun * r0;
    switch (head_size) {
      case 64: score_rows_tiles<2>(kpage, j0, groups, q, s); break;
      case 128: score_rows_tiles<4>(kpage, j0, groups, q, s); break;
      case 32: score_rows_tiles<1>(kpage, j0, groups, q, s); break;
      case 96: score_rows_tiles<3>(kpage, j0, groups, q, s); break;
      default: score_rows_tiles_any(kpage, j0, groups, q, head_size, s); break;
    }
  }
}

// For the 16 rows of p (bf16 weights from lane a0: kSlices 32-token slices, held in tiles 0 ..): their value sums
// over page tokens `first` .. first + 32 kSlices - 1 (first even), added to the 16 rows of acc_rows (rows of dv
// floats) in the tiles themselves: each 16-dim group of the rows is loaded as the result tile, multiplied into and
// stored back, two groups at a time.
template <int kSlices>
__attribute__((target("amx-tile,amx-bf16"))) void value_rows_tiles(const c10::BFloat16* vpage, int64_t block_size,
                                                                     int64_t first, int64_t dv, const uint16_t* p,
                                                                     float* acc_rows) {
  constexpr int64_t slice_step = kTileDepth * kAmxValueDims;  // 16 token-pair rows
  const int64_t acc_stride = dv * static_cast<int64_t>(sizeof(float));
  load_resident<kSlices>(p, kTileDepth, kChunk * sizeof(uint16_t));
  for (int64_t d0 = 0; d0 < dv; d0 += 2 * kAmxValueDims) {
    const bool two = d0 + kAmxValueDims < dv;
    tile_load<5>(acc_rows + d0, acc_stride);
    dot_resident<kSlices, 5>(vpage + d0 * block_size + first * kAmxValueDims, slice_step);
    if (two) {
      tile_load<7>(acc_rows + d0 + kAmxValueDims, acc_stride);
      dot_resident<kSlices, 7>(vpage + (d0 + kAmxValueDims) * block_size + first * kAmxValueDims, slice_step);
    }
    tile_store<5>(acc_rows + d0, acc_stride);
    if (two) tile_store<7>(acc_rows + d0 + kAmxValueDims, acc_stride);
  }
}

// acc[r][0 .. dv) += sum over lanes j in a0 .. a1 - 1 (a0 even, a1 - a0 a multiple of 32, at most kChunk) of
// weight[r][j] * value of page token j0 + j, for every row r; p16 (tile_rows(rows) x kChunk bf16) holds the weights
// as bf16 rows (written here from `weights`, or already by softmax_run when `stored`: then only the padding rows), and
// acc_rows holds tile_rows(rows) rows (the padding rows get weight 0 and are never read). Every value read is a
// written one (inside the run), so a weight of 0 never meets NaN.
void value_run_tiles(const c10::BFloat16* vpage, int64_t block_size, int64_t j0, int64_t a0, int64_t a1,
                     int64_t rows, int64_t dv, const vfloat* weights, float* acc_rows, uint16_t* p16,
                     bool stored) {
  const int64_t padded = tile_rows(rows);
  for (int64_t r = stored ? rows : 0; r < padded; ++r) {  // `stored`: softmax_run wrote the real rows' weights
    for (int64_t v = a0 / kLanes; v * kLanes < a1; ++v) {
      store_bf16(r < rows ? weights[kRun * r + v] : vfloat{}, p16 + r * kChunk + v * kLanes);
    }
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const uint16_t* p = p16 + r0 * kChunk + a0;
    float* acc = acc_rows + r0 * dv;
    switch ((a1 - a0) / kTileDepth) {
      case 4: value_rows_tiles<4>(vpage, block_size, j0 + a0, dv, p, acc); break;
      case 3: value_rows_tiles<3>(vpage, block_size, j0 + a0, dv, p, acc); break;
      case 2: value_rows_tiles<2>(vpage, block_size, j0 + a0, dv, p, acc); break;
      default: value_rows_tiles<1>(vpage, block_size, j0 + a0, dv, p, acc); break;
    }
  }
}
#else
inline bool amx_tiles_available() { return false; }
#endif

// Whether this call multiplies bf16 amx pages with AMX tiles: the build has the tile code, the CPU and the kernel
// allow it, and HOGWILD_CPU_AMX_TILES is not "0" (read every call: tests and comparisons switch it).
inline bool use_amx_tiles() {
  const char* env = std::getenv("HOGWILD_CPU_AMX_TILES");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return amx_tiles_available();
}

// Asks for the cache lines of [begin, begin + bytes) in L2 ahead of their use (a run of keys and values is more
// than L1 holds).
inline void prefetch_bytes(const void* begin, int64_t bytes) {
  const char* at = static_cast<const char*>(begin);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(at + b, 0, 2);
}

// Amx pages: prefetches the run that starts at segment token `next` (< end) of one block-table row, so that its
// pages (at a random place in the cache, which the hardware prefetcher cannot guess) load while the current run
// computes: keys of whole 16-token groups, values of the token pairs' rows of every 16-dim group.
template <typename scalar_t>
void prefetch_amx_run(const HogwildAttentionParams<scalar_t>& p, const int32_t* blocks, int64_t next, int64_t end,
                      int64_t kv_head) {
  const int64_t block = blocks[next / p.block_size];
  if (block < 0 || block >= p.num_blocks) return;  // the run itself reports it
  const int64_t off = next % p.block_size, j0 = off - off % kLanes;
  const int64_t j_end = std::min({j0 + kChunk, p.block_size, off + (end - next)});
  const int64_t elem = sizeof(scalar_t);
  const scalar_t* kpage = p.key_cache + block * p.k_stride_block + kv_head * p.k_stride_head;
  const int64_t group = j0 / kAmxKeyTokens, groups = (j_end + kAmxKeyTokens - 1) / kAmxKeyTokens - group;
  prefetch_bytes(kpage + group * kAmxKeyTokens * p.head_size, groups * kAmxKeyTokens * p.head_size * elem);
  const scalar_t* vpage = p.value_cache + block * p.v_stride_block + kv_head * p.v_stride_head;
  const int64_t pair = j0 / 2, pairs = (j_end + 1) / 2 - pair;
  for (int64_t d = 0; d < p.value_size; d += kAmxValueDims) {
    prefetch_bytes(vpage + d * p.block_size + pair * 2 * kAmxValueDims, pairs * 2 * kAmxValueDims * elem);
  }
}

// Groups the (token, segment) pairs of tokens first .. last - 1 by the keys they read, into w.shared. Returns false
// when the table is out of bounds for the cache or the RoPE table.
template <typename scalar_t>
bool collect_segments(const HogwildAttentionParams<scalar_t>& p, int64_t first, int64_t last, Scratch& w) {
  w.num_shared = 0;
  for (int64_t t = first; t < last; ++t) {
    size_t hint = 0;  // views list their common segments in one order: the next use is most often the next one
    const int64_t view = p.query_view[t];
    if (view < 0 || view >= p.num_views) return false;
    const int64_t n_q = p.query_pos[2 * t], p_q = p.query_pos[2 * t + 1];
    const int64_t seg_begin = p.view_offsets[view], seg_end = p.view_offsets[view + 1];
    if (seg_begin < 0 || seg_end > p.num_segments || seg_begin > seg_end) return false;
    for (int64_t s = seg_begin; s < seg_end; ++s) {
      const SegmentRow seg = hogwild::load_segment(p.segments, s);
      if (!hogwild::segment_in_bounds(seg, p.num_seqs, p.max_blocks, p.block_size)) return false;
      const int64_t visible = hogwild::visible_keys(p_q, seg);
      if (visible == 0) continue;
      SegmentUse use{t - first, visible, {}};
      if (!hogwild::cos_sin_row(p.cos_sin_table, p.table_rows, p.table_stride, p.rotary_dim,
                                hogwild::segment_delta(n_q, p_q, seg), &use.row)) {
        return false;
      }
      const auto same = [&](size_t i) { return w.shared[i].seq == seg.seq && w.shared[i].start == seg.start; };
      size_t at = hint < w.num_shared && same(hint) ? hint : 0;
      while (at < w.num_shared && !same(at)) ++at;
      if (at == w.num_shared) {  // a new one: reuse the next entry (and its uses' capacity) or add one
        if (at == w.shared.size()) w.shared.emplace_back();
        SharedSegment& fresh = w.shared[at];
        fresh.seq = seg.seq;
        fresh.start = seg.start;
        fresh.longest = 0;
        fresh.uses.clear();
        ++w.num_shared;
      }
      hint = at + 1;
      SharedSegment& sh = w.shared[at];
      sh.longest = std::max(sh.longest, visible);
      sh.uses.push_back(use);
    }
  }
  return true;
}

// One work item: tokens first .. last - 1, one KV head, all its query heads. Returns false on a bad table.
// kTiles: bf16 amx pages multiplied with AMX tiles (launch checks that the CPU has them).
template <bool kAmx, bool kTiles, typename scalar_t>
bool attend_item(const HogwildAttentionParams<scalar_t>& p, int64_t first, int64_t last, int64_t kv_head,
                 Scratch& w) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t d_size = p.head_size, dv = p.value_size;
  if (!collect_segments(p, first, last, w)) return false;
  size_t most = 0;  // a view may read one run of keys more than once (the glue marker after every peer's step)
  const SharedSegment* const shared = w.shared.data();
  for (size_t i = 0; i < w.num_shared; ++i) most = std::max(most, shared[i].uses.size());
  w.reserve_segment_rows(static_cast<int64_t>(most) * group, d_size, dv);
  for (int64_t t = first; t < last; ++t) {  // row (t - first) * G + g
    for (int64_t g = 0; g < group; ++g) {
      const scalar_t* q = p.query + t * p.q_stride_token + (kv_head * group + g) * p.q_stride_head;
      float* row = w.q.data() + ((t - first) * group + g) * d_size;
      for (int64_t d = 0; d < d_size; ++d) row[d] = load_float(q[d]);
      w.state[(t - first) * group + g] = {-INFINITY, 0.0f};
    }
  }
  std::fill_n(w.acc.data(), (last - first) * group * dv, 0.0f);  // the item's rows (the scratch may hold more)
  for (size_t i = 0; i < w.num_shared; ++i) {
    const SharedSegment& sh = shared[i];
    // This segment's rows (use u, head g) -> u * G + g: rotated queries, and the rows' states gathered.
    const int64_t rows = static_cast<int64_t>(sh.uses.size()) * group;
    for (size_t u = 0; u < sh.uses.size(); ++u) {
      const SegmentUse& use = sh.uses[u];
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = use.token * group + g, k = static_cast<int64_t>(u) * group + g;
        hogwild::rotate_scaled(w.q.data() + r * d_size, w.q_rot.data() + k * d_size, d_size, p.rotary_dim,
                               p.is_neox, use.row.cos, use.row.sin, use.row.sin_sign, p.scale);
        w.state_s[k] = {-INFINITY, 0.0f};  // each use starts its own softmax, merged into the token's below
        w.sums[k] = vfloat{};
        std::fill_n(w.acc_s.data() + k * dv, dv, 0.0f);
        w.limit[k] = use.visible;
      }
    }
#if defined(HOGWILD_AMX_TILES)
    if constexpr (kTiles) {  // the rotated queries as the tiles' bf16 rows (rows past the last: unused results)
      for (int64_t i = 0; i < rows * d_size; i += kLanes) store_bf16(load_lanes(w.q_rot.data() + i), &w.q16[i]);
    }
#endif
    const int32_t* blocks = p.block_tables + sh.seq * p.bt_stride;
    // On tiles, a whole run's value product waits until the next run is scored (its weights sit in p16 until
    // then): the tiles then load weights stored a whole run earlier, and the value tiles of one run overlap the
    // softmax of the next. It runs before that softmax, which may rescale the value sums.
    const scalar_t* pending_values = nullptr;  // the waiting run's value page (null: none waits)
    int64_t pending_j0 = 0;                      // and its first page token
    [[maybe_unused]] const auto flush_pending = [&] {
#if defined(HOGWILD_AMX_TILES)
      if constexpr (kTiles) {
        if (pending_values != nullptr) {
          value_run_tiles(pending_values, p.block_size, pending_j0, 0, kChunk, rows, dv, nullptr, w.acc_s.data(),
                          w.p16.data(), true);
          pending_values = nullptr;
        }
      }
#endif
    };
    for (int64_t i = sh.start, end = sh.start + sh.longest; i < end;) {
      const int64_t block = blocks[i / p.block_size];
      if (block < 0 || block >= p.num_blocks) return false;
      const int64_t off = i % p.block_size;
      // A run of up to kChunk page tokens from the vector-aligned one holding token i (the page is a whole number
      // of runs on the fast path, so the run never leaves it; otherwise the run is clipped to the page): lanes
      // lo .. hi - 1 are keys of this segment.
      const int64_t j0 = p.block_size % kLanes == 0 ? off - off % kLanes : off;
      const int64_t lo = off - j0;
      const int64_t hi = std::min({kChunk, p.block_size - j0, lo + (end - i)});
      const scalar_t* kpage = p.key_cache + block * p.k_stride_block + kv_head * p.k_stride_head;
      const scalar_t* vpage = p.value_cache + block * p.v_stride_block + kv_head * p.v_stride_head;
      if (kAmx && i + hi - lo < end) prefetch_amx_run(p, blocks, i + hi - lo, end, kv_head);
#if defined(HOGWILD_AMX_TILES)
      if constexpr (kTiles) {
        score_run_tiles(kpage, j0, hi, rows, d_size, w.q16.data(), w.scores.data());
      } else {
        score_run<kAmx>(p, kpage, j0, lo, hi, rows, w.q_rot.data(), w.scores.data());
      }
#else
      score_run<kAmx>(p, kpage, j0, lo, hi, rows, w.q_rot.data(), w.scores.data());
#endif
      flush_pending();
      const bool whole_run = kTiles && lo == 0 && hi == kChunk;  // all lanes on tiles: weights stored as bf16
      softmax_run(lo, hi, rows, dv, w.scores.data(), w.state_s.data(), w.sums.data(), w.acc_s.data(),
                  w.limit.data(), i - sh.start, whole_run ? w.p16.data() : nullptr);
      i += hi - lo;
      if (whole_run) {
        pending_values = vpage;
        pending_j0 = j0;
        continue;
      }
      int64_t a0 = hi, a1 = hi;  // lanes a0 .. a1 - 1 on tiles: whole 32-token slices from the first even lane
#if defined(HOGWILD_AMX_TILES)
      if constexpr (kTiles) {
        a0 = std::min(hi, lo + lo % 2);
        a1 = a0 + (hi - a0) / kTileDepth * kTileDepth;
        if (a1 > a0) {
          value_run_tiles(vpage, p.block_size, j0, a0, a1, rows, dv, w.scores.data(), w.acc_s.data(),
                          w.p16.data(), false);
        } else {
          a0 = a1 = hi;
        }
      }
#endif
      accumulate_run_values<kAmx>(p, vpage, j0, lo, a0, rows, w.scores.data(), w.acc_s.data());
      accumulate_run_values<kAmx>(p, vpage, j0, a1, hi, rows, w.scores.data(), w.acc_s.data());
    }
    flush_pending();
    for (size_t u = 0; u < sh.uses.size(); ++u) {  // merge each use into its token's softmax (log-sum-exp)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = sh.uses[u].token * group + g, k = static_cast<int64_t>(u) * group + g;
        hogwild::SoftmaxState& mine = w.state[r];
        hogwild::SoftmaxState& part = w.state_s[k];
        part.l = lane_sum(w.sums[k]);
        const float m = std::max(mine.m, part.m);
        const float a = exp_softmax(mine.m - m), b = exp_softmax(part.m - m);
        float* acc = w.acc.data() + r * dv;
        const float* acc_part = w.acc_s.data() + k * dv;
        for (int64_t d = 0; d < dv; ++d) acc[d] = acc[d] * a + acc_part[d] * b;
        mine = {m, mine.l * a + part.l * b};
      }
    }
  }
  for (int64_t t = first; t < last; ++t) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = (t - first) * group + g, h = kv_head * group + g;
      const hogwild::SoftmaxState& st = w.state[r];
      const float inv = st.l > 0.0f ? 1.0f / st.l : 0.0f;
      scalar_t* o = p.out + t * p.o_stride_token + h * p.o_stride_head;
      for (int64_t d = 0; d < dv; ++d) o[d] = static_cast<scalar_t>(w.acc[r * dv + d] * inv);
      if (p.lse != nullptr) p.lse[t * p.lse_stride_token + h] = st.l > 0.0f ? st.m + std::log(st.l) : -INFINITY;
    }
  }
  return true;
}

// kAmx: p.packing == kAmxPages (bf16 / fp16 only); kTiles: bf16 amx pages on AMX tiles.
template <bool kAmx, bool kTiles = false, typename scalar_t>
void launch(const HogwildAttentionParams<scalar_t>& p) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  // Tokens per item: up to kTokensPerItem (keys shared by more tokens are loaded fewer times), but small enough
  // that every thread gets several items (a decode step of 8 tokens over 3 KV heads is 3 items of 8 tokens, two
  // of them on one of two threads; in items of 4 tokens it is 6, three a thread). The tokens are then spread
  // evenly over the chunks (sizes differ by at most one: 4 tokens in 2 chunks are 2 + 2, not 3 + 1, which left one
  // of two threads a quarter of the work). One thread (vLLM's CPU worker here) wants no split at all: items of
  // up to kTokensPerItem tokens, so that a decode step of 8 workers reads each shared key once, on full tiles (in
  // items of 4 tokens it read them twice, on tiles of 8 rows, for nothing: 0.26 -> 0.21 ms a call, qwen2 shapes).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted_items = threads == 1 ? 1 : 3 * threads;
  const int64_t per_item = std::clamp<int64_t>((p.num_tokens * p.num_kv_heads + wanted_items - 1) / wanted_items, 1,
                                               kTokensPerItem);
  const int64_t chunks = (p.num_tokens + per_item - 1) / per_item;
  std::atomic<bool> ok{true};
  at::parallel_for(0, chunks * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
#if defined(HOGWILD_AMX_TILES)
    std::optional<TileScope> tiles;
    if constexpr (kTiles) tiles.emplace();
#endif
    static thread_local Scratch w;
    w.prepare(kTokensPerItem * group, p.head_size, p.value_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / p.num_kv_heads;
      const int64_t first = chunk * p.num_tokens / chunks;
      const int64_t last = (chunk + 1) * p.num_tokens / chunks;
      if (!attend_item<kAmx, kTiles>(p, first, last, item % p.num_kv_heads, w)) ok.store(false);
    }
  });
  TORCH_CHECK(ok.load(), "hogwild_attention: the segment table reads outside the block tables, the cache or the "
              "RoPE table (a view, segment, block id or |delta| out of range)");
}

// The 16-bit types, on either packing.
template <typename scalar_t>
void launch_16bit(const HogwildAttentionParams<scalar_t>& p) {
  if (p.packing == hogwild::kAmxPages) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (use_amx_tiles()) return launch<true, true>(p);  // head sizes are whole tiles on amx pages (% 32 == 0)
    }
    launch<true>(p);
  } else {
    launch<false>(p);
  }
}

}  // namespace

void hogwild_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& segments,
                           const at::Tensor& view_offsets, const at::Tensor& query_view, const at::Tensor& query_pos,
                           const at::Tensor& cos_sin_table, int64_t rotary_dim, bool is_neox, double scale,
                           const std::optional<at::Tensor>& lse, int64_t packing) {
  hogwild::check_hogwild_attention_args(out, query, key_cache, value_cache, block_tables, segments, view_offsets,
                                        query_view, query_pos, cos_sin_table, rotary_dim, lse, packing,
                                        c10::DeviceType::CPU);
  if (query.size(0) == 0) return;
  switch (query.scalar_type()) {
    case at::kFloat:  // strided only (the checks refuse fp32 amx pages)
      launch<false>(hogwild::make_hogwild_attention_params<float>(out, query, key_cache, value_cache, block_tables,
                                                                  segments, view_offsets, query_view, query_pos,
                                                                  cos_sin_table, rotary_dim, is_neox, scale, lse,
                                                                  packing));
      break;
    case at::kBFloat16:
      launch_16bit(hogwild::make_hogwild_attention_params<c10::BFloat16>(
          out, query, key_cache, value_cache, block_tables, segments, view_offsets, query_view, query_pos,
          cos_sin_table, rotary_dim, is_neox, scale, lse, packing));
      break;
    case at::kHalf:
      launch_16bit(hogwild::make_hogwild_attention_params<c10::Half>(
          out, query, key_cache, value_cache, block_tables, segments, view_offsets, query_view, query_pos,
          cos_sin_table, rotary_dim, is_neox, scale, lse, packing));
      break;
    default:
      TORCH_CHECK(false, "hogwild_attention: unsupported dtype ", query.scalar_type());
  }
}

bool hogwild_cpu_amx_tiles() { return use_amx_tiles(); }
