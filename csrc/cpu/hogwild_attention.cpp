// CPU launcher of hogwild_C::hogwild_attention: position-delta attention over a paged cache.
//
// Work item = (query token, KV head): the Hq / Hkv query heads of one KV head share every key and value load. For
// each segment of the token's view the query heads are rotated once (fp32, pre-scaled), the visible keys are read
// in runs inside one block, scored, and folded into an online softmax; nothing is written but out and lse. Inner
// loops are plain fp32 loops over contiguous memory that the compiler vectorizes (keys token-contiguous: over
// tokens; keys dim-contiguous: over dims; values: over dims). Items run in parallel with at::parallel_for, on the
// threads the caller's process has (vLLM's CPU worker gives its OpenMP pool its own cores).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../device/hogwild_attention.cuh"
#include "../device/rotate_by_delta.cuh"
#include "../hogwild_attention_args.h"
#include "../ops.h"

namespace {

using hogwild::HogwildAttentionParams;
using hogwild::SegmentRow;

constexpr int64_t kLanes = 8;            // fp32 lanes of one vector (AVX2 register; two SSE registers without AVX)
constexpr int kRun = 4;                  // vectors of keys scored at once
constexpr int64_t kChunk = kRun * kLanes;  // one aligned run of 32 page tokens: a 64-byte line of a bf16 key dim
constexpr int64_t kScoreHeads = 3;       // query heads whose scores stay in registers together (3 x 4 vectors)
constexpr int64_t kValueHeads = 4;       // query heads whose value sums stay in registers together (4 x 2 vectors)
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t vhalfbits __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vbits __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline vfloat splat(float v) { return vfloat{v, v, v, v, v, v, v, v}; }

// kLanes consecutive elements of storage -> fp32 lanes. bf16 is the upper half of an fp32 (a shift).
inline vfloat load_lanes(const float* src) {
  vfloat v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}
inline vfloat load_lanes(const c10::BFloat16* src) {
#if defined(__AVX2__)
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
  float tmp[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) tmp[i] = static_cast<float>(src[i]);
  return load_lanes(tmp);
}
inline float load_float(float v) { return v; }
inline float load_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float load_float(c10::Half v) { return static_cast<float>(v); }

// exp(x) for x <= 0 (scores minus their running max), lane-wise and branch-free:
// 2^(x log2 e) = 2^k * 2^f with k = round(x log2 e) and f in [-0.5, 0.5], 2^f by a degree-6 polynomial (rel. error
// ~2e-7). Inputs below -87 (and -inf) give about 1e-38 instead of 0, which no sum of weights >= 1 notices.
inline vfloat exp_nonpositive(vfloat x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vfloat t = x * 1.44269504088896341f;
  const vfloat k = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const vfloat f = t - k;
  vfloat p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vint bits = (__builtin_convertvector(k, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline float exp_nonpositive(float x) { return exp_nonpositive(splat(x))[0]; }

inline float lane_max(vfloat v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline float lane_sum(vfloat v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Per-thread scratch: queries (fp32), rotated queries, scores, accumulators and softmax states of the G query heads
// of one KV head. Scores of a chunk: [G][kChunk].
struct Scratch {
  std::vector<float> q, q_rot, acc;
  std::vector<vfloat> scores;
  std::vector<hogwild::SoftmaxState> state;
  Scratch(int64_t group, int64_t head_size, int64_t value_size)
      : q(group * head_size), q_rot(group * head_size), acc(group * value_size), scores(group * kRun),
        state(group) {}
};

// Dim-major page (vLLM's CPU layout), block_size % kChunk == 0: scores of the aligned 16-token run starting at
// page token j0 for heads g0 .. g0 + kBlock - 1. Each key vector is loaded once for all heads of the block.
template <int kBlock, typename scalar_t>
inline void score_run_dim_major(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0,
                                const float* q_rot, int64_t g0, vfloat* scores) {
  vfloat acc[kBlock][kRun];
  for (int b = 0; b < kBlock; ++b) {
    for (int v = 0; v < kRun; ++v) acc[b][v] = vfloat{};
  }
  const int64_t d_size = p.head_size;
  for (int64_t d = 0; d < d_size; ++d) {
    const scalar_t* col = page + d * p.k_stride_dim + j0;
    vfloat qd[kBlock];
    for (int b = 0; b < kBlock; ++b) qd[b] = splat(q_rot[(g0 + b) * d_size + d]);
    for (int v = 0; v < kRun; ++v) {
      const vfloat k = load_lanes(col + v * kLanes);
      for (int b = 0; b < kBlock; ++b) acc[b][v] += qd[b] * k;
    }
  }
  for (int b = 0; b < kBlock; ++b) {
    for (int v = 0; v < kRun; ++v) scores[kRun * (g0 + b) + v] = acc[b][v];
  }
}

// scores[g] (2 vectors: page tokens j0 .. j0 + 15) for every head g of the group; lanes outside the run are
// garbage here and masked by the caller.
template <typename scalar_t>
void score_run(const HogwildAttentionParams<scalar_t>& p, const scalar_t* page, int64_t j0, int64_t lo, int64_t hi,
               int64_t group, const float* q_rot, vfloat* scores) {
  if (p.k_stride_token == 1 && p.block_size % kChunk == 0) {
    int64_t g0 = 0;
    for (; g0 + kScoreHeads <= group; g0 += kScoreHeads) {
      score_run_dim_major<kScoreHeads>(p, page, j0, q_rot, g0, scores);
    }
    switch (group - g0) {
      case 2: score_run_dim_major<2>(p, page, j0, q_rot, g0, scores); break;
      case 1: score_run_dim_major<1>(p, page, j0, q_rot, g0, scores); break;
      default: break;
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

// For the heads g0 .. g0 + kBlock - 1: acc[g][d0 .. d0 + 2 * kLanes) += sum over lanes j in lo .. hi - 1 of
// p[g][j] * value of page token j0 + j. Each value vector is loaded once for all heads of the block, and the
// accumulators stay in registers over the run (kBlock is a constant so that they can).
template <int kBlock, typename scalar_t>
inline void accumulate_values(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0,
                              int64_t lo, int64_t hi, const vfloat* probs, float* acc, int64_t g0, int64_t d0) {
  const int64_t dv = p.value_size;
  vfloat a[kBlock][2];
  for (int b = 0; b < kBlock; ++b) {
    a[b][0] = load_lanes(acc + (g0 + b) * dv + d0);
    a[b][1] = load_lanes(acc + (g0 + b) * dv + d0 + kLanes);
  }
  for (int64_t j = lo; j < hi; ++j) {
    const scalar_t* value = vpage + (j0 + j) * p.v_stride_token + d0;
    const vfloat v0 = load_lanes(value), v1 = load_lanes(value + kLanes);
    for (int b = 0; b < kBlock; ++b) {
      const vfloat weight = splat(reinterpret_cast<const float*>(probs + kRun * (g0 + b))[j]);
      a[b][0] += weight * v0;
      a[b][1] += weight * v1;
    }
  }
  for (int b = 0; b < kBlock; ++b) {
    std::memcpy(acc + (g0 + b) * dv + d0, &a[b][0], sizeof(vfloat));
    std::memcpy(acc + (g0 + b) * dv + d0 + kLanes, &a[b][1], sizeof(vfloat));
  }
}

// Folds the scores of lanes lo .. hi - 1 of one run (page tokens j0 + lo ..) and their values into the online
// softmax of every head.
template <typename scalar_t>
void accumulate_run(const HogwildAttentionParams<scalar_t>& p, const scalar_t* vpage, int64_t j0, int64_t lo,
                    int64_t hi, int64_t group, vfloat* scores, Scratch& w) {
  const int64_t dv = p.value_size;
  vint lane;
  for (int64_t i = 0; i < kLanes; ++i) lane[i] = static_cast<int32_t>(i);
  const vint lo_v = vint{} + static_cast<int32_t>(lo), hi_v = vint{} + static_cast<int32_t>(hi);
  vint inside[kRun];
  for (int v = 0; v < kRun; ++v) {
    const vint index = lane + static_cast<int32_t>(v * kLanes);
    inside[v] = (index >= lo_v) & (index < hi_v);
  }
  const vfloat neg_inf = splat(-INFINITY);
  for (int64_t g = 0; g < group; ++g) {
    vfloat* s = scores + kRun * g;
    vfloat run_max = neg_inf;
    for (int v = 0; v < kRun; ++v) {
      s[v] = inside[v] ? s[v] : neg_inf;
      run_max = run_max > s[v] ? run_max : s[v];
    }
    hogwild::SoftmaxState& st = w.state[g];
    const float m_new = std::max(st.m, lane_max(run_max));
    const float correction = exp_nonpositive(st.m - m_new);
    vfloat total = vfloat{};
    for (int v = 0; v < kRun; ++v) {
      s[v] = inside[v] ? exp_nonpositive(s[v] - m_new) : vfloat{};
      total += s[v];
    }
    st.l = st.l * correction + lane_sum(total);
    st.m = m_new;
    if (correction != 1.0f) {
      float* acc = w.acc.data() + g * dv;
      for (int64_t d = 0; d < dv; ++d) acc[d] *= correction;
    }
  }
  if (dv % (2 * kLanes) != 0) {  // odd value sizes: scalar
    for (int64_t g = 0; g < group; ++g) {
      const float* pj = reinterpret_cast<const float*>(scores + kRun * g);
      float* acc = w.acc.data() + g * dv;
      for (int64_t j = lo; j < hi; ++j) {
        const scalar_t* value = vpage + (j0 + j) * p.v_stride_token;
        for (int64_t d = 0; d < dv; ++d) acc[d] += pj[j] * load_float(value[d]);
      }
    }
    return;
  }
  for (int64_t d0 = 0; d0 < dv; d0 += 2 * kLanes) {
    int64_t g0 = 0;
    for (; g0 + kValueHeads <= group; g0 += kValueHeads) {
      accumulate_values<kValueHeads>(p, vpage, j0, lo, hi, scores, w.acc.data(), g0, d0);
    }
    switch (group - g0) {
      case 3: accumulate_values<3>(p, vpage, j0, lo, hi, scores, w.acc.data(), g0, d0); break;
      case 2: accumulate_values<2>(p, vpage, j0, lo, hi, scores, w.acc.data(), g0, d0); break;
      case 1: accumulate_values<1>(p, vpage, j0, lo, hi, scores, w.acc.data(), g0, d0); break;
      default: break;
    }
  }
}

// One work item. Returns false when the table is out of bounds for the cache or the RoPE table (nothing is read).
template <typename scalar_t>
bool attend_item(const HogwildAttentionParams<scalar_t>& p, int64_t t, int64_t kv_head, Scratch& w) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t d_size = p.head_size, dv = p.value_size;
  const int64_t view = p.query_view[t];
  if (view < 0 || view >= p.num_views) return false;
  const int64_t n_q = p.query_pos[2 * t], p_q = p.query_pos[2 * t + 1];
  for (int64_t g = 0; g < group; ++g) {
    const scalar_t* q = p.query + t * p.q_stride_token + (kv_head * group + g) * p.q_stride_head;
    for (int64_t d = 0; d < d_size; ++d) w.q[g * d_size + d] = load_float(q[d]);
    w.state[g] = {-INFINITY, 0.0f};
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  const int64_t seg_begin = p.view_offsets[view], seg_end = p.view_offsets[view + 1];
  if (seg_begin < 0 || seg_end > p.num_segments || seg_begin > seg_end) return false;
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    const SegmentRow seg = hogwild::load_segment(p.segments, s);
    if (!hogwild::segment_in_bounds(seg, p.num_seqs, p.max_blocks, p.block_size)) return false;
    const int64_t visible = hogwild::visible_keys(p_q, seg);
    if (visible == 0) continue;
    hogwild::CosSinRow row;
    if (!hogwild::cos_sin_row(p.cos_sin_table, p.table_rows, p.table_stride, p.rotary_dim,
                              hogwild::segment_delta(n_q, p_q, seg), &row)) {
      return false;
    }
    for (int64_t g = 0; g < group; ++g) {
      hogwild::rotate_scaled(w.q.data() + g * d_size, w.q_rot.data() + g * d_size, d_size, p.rotary_dim, p.is_neox,
                             row.cos, row.sin, row.sin_sign, p.scale);
    }
    const int32_t* blocks = p.block_tables + seg.seq * p.bt_stride;
    for (int64_t i = seg.start, end = seg.start + visible; i < end;) {
      const int64_t block = blocks[i / p.block_size];
      if (block < 0 || block >= p.num_blocks) return false;
      const int64_t off = i % p.block_size;
      // The aligned run of kChunk page tokens holding token i (the page is a whole number of runs on the fast
      // path; otherwise the run is clipped to the page): lanes lo .. hi - 1 are keys of this segment.
      const int64_t j0 = p.block_size % kChunk == 0 ? off - off % kChunk : off;
      const int64_t lo = off - j0;
      const int64_t hi = std::min({kChunk, p.block_size - j0, lo + (end - i)});
      const scalar_t* kpage = p.key_cache + block * p.k_stride_block + kv_head * p.k_stride_head;
      const scalar_t* vpage = p.value_cache + block * p.v_stride_block + kv_head * p.v_stride_head;
      score_run(p, kpage, j0, lo, hi, group, w.q_rot.data(), w.scores.data());
      accumulate_run(p, vpage, j0, lo, hi, group, w.scores.data(), w);
      i += hi - lo;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = kv_head * group + g;
    const hogwild::SoftmaxState& st = w.state[g];
    const float inv = st.l > 0.0f ? 1.0f / st.l : 0.0f;
    scalar_t* o = p.out + t * p.o_stride_token + h * p.o_stride_head;
    for (int64_t d = 0; d < dv; ++d) o[d] = static_cast<scalar_t>(w.acc[g * dv + d] * inv);
    if (p.lse != nullptr) p.lse[t * p.lse_stride_token + h] = st.l > 0.0f ? st.m + std::log(st.l) : -INFINITY;
  }
  return true;
}

template <typename scalar_t>
void launch(const HogwildAttentionParams<scalar_t>& p) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  std::atomic<bool> ok{true};
  at::parallel_for(0, p.num_tokens * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch w(group, p.head_size, p.value_size);
    for (int64_t item = begin; item < end; ++item) {
      if (!attend_item(p, item / p.num_kv_heads, item % p.num_kv_heads, w)) ok.store(false);
    }
  });
  TORCH_CHECK(ok.load(), "hogwild_attention: the segment table reads outside the block tables, the cache or the "
              "RoPE table (a view, segment, block id or |delta| out of range)");
}

}  // namespace

void hogwild_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& segments,
                           const at::Tensor& view_offsets, const at::Tensor& query_view, const at::Tensor& query_pos,
                           const at::Tensor& cos_sin_table, int64_t rotary_dim, bool is_neox, double scale,
                           const std::optional<at::Tensor>& lse) {
  hogwild::check_hogwild_attention_args(out, query, key_cache, value_cache, block_tables, segments, view_offsets,
                                        query_view, query_pos, cos_sin_table, rotary_dim, lse, c10::DeviceType::CPU);
  if (query.size(0) == 0) return;
  switch (query.scalar_type()) {
    case at::kFloat:
      launch(hogwild::make_hogwild_attention_params<float>(out, query, key_cache, value_cache, block_tables, segments,
                                                           view_offsets, query_view, query_pos, cos_sin_table,
                                                           rotary_dim, is_neox, scale, lse));
      break;
    case at::kBFloat16:
      launch(hogwild::make_hogwild_attention_params<c10::BFloat16>(
          out, query, key_cache, value_cache, block_tables, segments, view_offsets, query_view, query_pos,
          cos_sin_table, rotary_dim, is_neox, scale, lse));
      break;
    case at::kHalf:
      launch(hogwild::make_hogwild_attention_params<c10::Half>(out, query, key_cache, value_cache, block_tables,
                                                               segments, view_offsets, query_view, query_pos,
                                                               cos_sin_table, rotary_dim, is_neox, scale, lse));
      break;
    default:
      TORCH_CHECK(false, "hogwild_attention: unsupported dtype ", query.scalar_type());
  }
}
