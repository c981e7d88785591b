// y = x W^T (+ b) with fp32 activations and bf16 weights, for the few rows of a decode step on AVX2 CPUs.
//
// A decode step reads every weight once and does little arithmetic with it: its speed is the speed of reading
// the weights. bf16 halves the bytes; this kernel widens each bf16 weight to fp32 in registers (a 16-bit shift)
// and accumulates in fp32, with fp32 activations, so it is more precise than a bf16 matmul. Rows are handled
// in blocks of up to 4 against 3 weight rows at a time: each weight vector is loaded and widened once per block.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Runs f(begin, end) over [0, n) in chunks. Each of torch's threads starts on its own contiguous share of the
// chunks, read front to back, and once that share is done takes the others' remaining chunks from their far end.
// On a shared machine one thread is often descheduled for a while: the others then take over its chunks, where a
// static split (at::parallel_for) would wait for its half at the end of every loop. And a few-row product is
// bound by reading the weights: one unbroken stream per thread keeps the prefetchers ahead, where chunks dealt in
// turn made every thread jump at every chunk (SmolLM2's matrices, 2 threads, interleaved runs, median of 7: one
// row, layers 5.9 -> 4.6 ms and head 2.3 -> 2.0 ms; 16 rows, layers 42 -> 33 ms).
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1) {
    f(0, n);
    return;
  }
  // Share t holds chunks [front, back), packed as front << 32 | back: its owner takes the front, the others the back.
  std::vector<std::atomic<uint64_t>> shares(threads);
  for (int64_t t = 0; t < threads; ++t)
    shares[t] = static_cast<uint64_t>(chunks * t / threads) << 32 | static_cast<uint64_t>(chunks * (t + 1) / threads);
  const auto take = [&](int64_t t, bool front) -> int64_t {
    uint64_t range = shares[t].load();
    while (true) {
      const uint64_t first = range >> 32, last = range & 0xFFFFFFFFu;
      if (first >= last) return -1;
      const uint64_t rest = front ? (first + 1) << 32 | last : first << 32 | (last - 1);
      if (shares[t].compare_exchange_weak(range, rest)) return static_cast<int64_t>(front ? first : last - 1);
    }
  };
  // One call per thread (grain 1); nested in another parallel region it is one call for all: still every chunk.
  at::parallel_for(0, threads, 1, [&](int64_t me, int64_t) {
    for (int64_t i = 0; i < threads; ++i) {
      const int64_t t = (me + i) % threads;
      for (int64_t c = take(t, i == 0); c >= 0; c = take(t, i == 0)) f(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// Block of rows x weight rows per inner loop: 12 accumulators, 3 widened weight vectors and one activation
// vector fill the 16 AVX2 registers (measured best of 4x2, 4x3, 3x4, 2x4 on the 2-core CI machine).
#ifndef MB_MAX
#define MB_MAX 4
#endif
#ifndef NB_MAX
#define NB_MAX 3
#endif

inline __m256 load_bf16(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline __m256 load_weights(const uint16_t* p) { return load_bf16(p); }
inline __m256 load_weights(const float* p) { return _mm256_loadu_ps(p); }
inline float weight_value(uint16_t h) { return bf16_to_float(h); }
inline float weight_value(float f) { return f; }

// Rows m0..m0+MB of x against the NB weight rows at w (row stride K), into output columns n0..n0+NB. The weights
// are bf16 (widened in registers) or fp32 (GGUF blocks dequantised just before, see dot_panels).
template <int MB, int NB, class W>
inline void block(const float* x, const W* w, float* y, const float* bias, int64_t m0, int64_t n0, int64_t K,
                  int64_t N) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t k_vec = K / 8 * 8;
  for (int64_t k = 0; k < k_vec; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_weights(w + j * K + k);
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int j = 0; j < NB; ++j) {
      float total = sum8(acc[m][j]);
      for (int64_t k = k_vec; k < K; ++k) total += x[(m0 + m) * K + k] * weight_value(w[j * K + k]);
      if (bias != nullptr) total += bias[n0 + j];
      y[(m0 + m) * N + n0 + j] = total;
    }
  }
}

template <int NB, class W>
inline void rows(const float* x, const W* w, float* y, const float* bias, int64_t M, int64_t n0, int64_t K,
                 int64_t N) {
  int64_t m0 = 0;
  for (; m0 + MB_MAX <= M; m0 += MB_MAX) block<MB_MAX, NB>(x, w, y, bias, m0, n0, K, N);
  switch (M - m0) {
    case 3: block<3, NB>(x, w, y, bias, m0, n0, K, N); break;
    case 2: block<2, NB>(x, w, y, bias, m0, n0, K, N); break;
    case 1: block<1, NB>(x, w, y, bias, m0, n0, K, N); break;
    default: break;
  }
}

}  // namespace

// y[M, N] = x[M, K] w[N, K]^T (+ bias), w in bf16.
void linear_bf16_into(const float* xp, const uint16_t* wp, const float* bp, float* yp, int64_t M, int64_t K,
                      int64_t N) {
  const int64_t groups = N / NB_MAX;
  parallel_chunks(groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) rows<NB_MAX>(xp, wp + NB_MAX * g * K, yp, bp, M, NB_MAX * g, K, N);
  });
  for (int64_t n = groups * NB_MAX; n < N; ++n) rows<1>(xp, wp + n * K, yp, bp, M, n, K, N);
}

// An optional bias as a contiguous fp32 tensor (undefined when there is none).
torch::Tensor float_bias(const c10::optional<torch::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "weight must be a 2-D bfloat16 tensor");
  TORCH_CHECK(x.size(1) == weight.size(1), "x and weight disagree on the input size");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const torch::Tensor b = float_bias(bias);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  linear_bf16_into(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), bp,
                   y.data_ptr<float>(), M, K, N);
  return y;
}

// GGUF's block formats, repacked once at load (gguf_weights.repack) into a layout made for these loops; the values
// are the model's (the fp32 model is their dequantisation): fewer bytes, same values. Per matrix row:
//   Q4_1 (w = d * q + m): nb blocks of 16 bytes of nibbles, then nb fp16 scales d, then nb fp16 minimums m. A
//        block's 16 bytes are 8 little-endian uint16 lanes; nibble k (bits 4k..4k+3) of lane l is weight 8k + l, so
//        a zero-extension to 32-bit lanes, a shift and a mask give 8 consecutive weights, ready for one conversion.
//        (GGUF's own order, low nibbles then high nibbles bytewise, took four byte-to-int widenings on the shuffle
//        port per block: the batch-1 step was bound by them, not by memory.)
//   Q8_0 (w = d * q): nb blocks of 32 int8, then nb fp16 scales d.
// Scales and minimums sit apart from the quants so that eight are widened by one instruction, and Q4_1's
// minimums enter once per row as a dot product with the per-block sums of x.
namespace {

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// n (<= 8) fp16 values at p as floats into out[0..n).
inline void halves(const uint8_t* p, int64_t n, float* out) {
  if (n == 8) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(p + 2 * i);
}

// sum_i halves[i] * v[i] over n values.
inline float half_dot(const uint8_t* p, const float* v, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i))),
                          _mm256_loadu_ps(v + i), acc);
  float total = sum8(acc);
  for (; i < n; ++i) total += half_to_float(p + 2 * i) * v[i];
  return total;
}

template <bool Q4>
constexpr int64_t quant_bytes() { return Q4 ? 16 : 32; }   // a block's quants

template <bool Q4>
constexpr int64_t block_bytes() { return Q4 ? 20 : 34; }   // a block's quants, scale (and minimum)

// The 32 quants of block b as four vectors of 8 floats (weights 0-7, 8-15, 16-23, 24-31); Q4_1's times 16^k.
template <bool Q4>
inline void block_values(const uint8_t* quants, int64_t b, __m256 q[4]) {
  if (Q4) {
    const __m256i lanes =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + 16 * b)));
    // Masked in place, not shifted down: nibble k converts to q * 16^k exactly, and x comes pre-scaled by 16^-k
    // (linear_quant_into), so every product is the same float as x * q, one instruction fewer per 8 weights.
    for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(0x0F << (4 * k))));
  } else {
    const uint8_t* p = quants + 32 * b;
    for (int k = 0; k < 4; ++k)
      q[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * k))));
  }
}

// Rows m0..m0+MB of x against weight rows n0..n0+NB: each block's quants are widened once and used for MB rows;
// accumulators stay in registers. xsum[m * blocks + b] = sum of x[m] over block b (Q4_1's minimums).
template <bool Q4, int MB, int NB>
inline void quant_tile(const float* x, const uint8_t* w, int64_t row_bytes, const float* xsum, float* y,
                       const float* bias, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  const int64_t blocks = K / 32, scales_at = blocks * quant_bytes<Q4>();
  const uint8_t* rows[NB];
  for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + j) * row_bytes;
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  alignas(32) float scale[NB][8];
  for (int64_t first = 0; first < blocks; first += 8) {
    const int64_t count = std::min<int64_t>(8, blocks - first);
    for (int j = 0; j < NB; ++j) halves(rows[j] + scales_at + 2 * first, count, scale[j]);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t b = first + i;
      for (int j = 0; j < NB; ++j) {
        // The same place in the next tile's rows (a tile's rows are contiguous; row j's quants and scales pass
        // by in step with b), a tile's work ahead: the hardware prefetcher alone, or a fixed distance into rows
        // that this tile reads anyway, left the batch-1 loop waiting on memory (SmolLM2's layers: 13.5 -> ~9 ms).
        _mm_prefetch(reinterpret_cast<const char*>(rows[j] + NB * row_bytes + b * block_bytes<Q4>()), _MM_HINT_T0);
        __m256 q[4];
        block_values<Q4>(rows[j], b, q);
        const __m256 d = _mm256_broadcast_ss(&scale[j][i]);
        for (int m = 0; m < MB; ++m) {
          const float* xb = x + (m0 + m) * K + b * 32;
          __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), q[0]);
          t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q[1], t);
          t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q[2], t);
          t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q[3], t);
          acc[m][j] = _mm256_fmadd_ps(d, t, acc[m][j]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      float total = sum8(acc[m][j]) + (bias ? bias[n0 + j] : 0.0f);
      if (Q4) total += half_dot(rows[j] + scales_at + 2 * blocks, xsum + (m0 + m) * blocks, blocks);
      y[(m0 + m) * N + n0 + j] = total;
    }
}

// Every row of x against weight rows n0..n0+NB, MB rows at a time.
template <bool Q4, int NB, int MB>
inline void quant_rows(const float* x, const uint8_t* w, int64_t row_bytes, const float* xsum, float* y,
                       const float* bias, int64_t M, int64_t n0, int64_t K, int64_t N) {
  int64_t m0 = 0;
  for (; m0 + MB <= M; m0 += MB) quant_tile<Q4, MB, NB>(x, w, row_bytes, xsum, y, bias, m0, n0, K, N);
  switch (M - m0) {
    case 3: quant_tile<Q4, 3, NB>(x, w, row_bytes, xsum, y, bias, m0, n0, K, N); break;
    case 2: quant_tile<Q4, 2, NB>(x, w, row_bytes, xsum, y, bias, m0, n0, K, N); break;
    case 1: quant_tile<Q4, 1, NB>(x, w, row_bytes, xsum, y, bias, m0, n0, K, N); break;
    default: break;
  }
}

template <bool Q4, int NB, int MB>
void quant_columns(const float* xp, const uint8_t* wp, int64_t row_bytes, const float* sp, const float* bp,
                   float* yp, int64_t M, int64_t K, int64_t N) {
  const int64_t groups = N / NB;
  parallel_chunks(groups, 16 / NB, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) quant_rows<Q4, NB, MB>(xp, wp, row_bytes, sp, yp, bp, M, NB * g, K, N);
  });
  for (int64_t n = groups * NB; n < N; ++n) quant_rows<Q4, 1, MB>(xp, wp, row_bytes, sp, yp, bp, M, n, K, N);
}

// Weight row `row` (repacked blocks) as its exact fp32 values: Q4_1's d * q (exact: 4 x 11 significant bits) + m
// rounds once, as the dequantisation that built the fp32 model does; Q8_0's d * q is exact. block_values gives
// Q4_1's nibble k as q * 16^k, so its scale is taken as d * 16^-k (exact too): the product is d * q all the same.
template <bool Q4>
inline void dequantize_row(const uint8_t* row, float* out, int64_t K) {
  const int64_t blocks = K / 32, scales_at = blocks * quant_bytes<Q4>();
  for (int64_t b = 0; b < blocks; ++b) {
    const float d = half_to_float(row + scales_at + 2 * b);
    const __m256 m = _mm256_set1_ps(Q4 ? half_to_float(row + scales_at + 2 * (blocks + b)) : 0.0f);
    __m256 q[4];
    block_values<Q4>(row, b, q);
    for (int k = 0; k < 4; ++k) {
      const __m256 scale = _mm256_set1_ps(Q4 ? d / static_cast<float>(1 << (4 * k)) : d);
      _mm256_storeu_ps(out + 32 * b + 8 * k, _mm256_fmadd_ps(q[k], scale, m));
    }
  }
}

// A per-thread scratch buffer of at least n floats (slot 0 or 1), kept between calls. The panel loops below run
// once per chunk of weight rows (1,536 chunks for a 64-row step's LM head), and a fresh zero-filled vector for
// each chunk was ~110 MB of memset per 64-row step.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[2];
  if (static_cast<int64_t>(buffers[slot].size()) < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

// Weight rows first..N (those a panel loop's groups leave over), one dequantised row at a time through the dot tiles.
template <bool Q4>
void leftover_rows(const float* xp, const uint8_t* wp, int64_t row_bytes, const float* bp, float* yp, int64_t M,
                   int64_t K, int64_t N, int64_t first) {
  float* row = scratch(0, K);
  for (int64_t n = first; n < N; ++n) {
    dequantize_row<Q4>(wp + n * row_bytes, row, K);
    rows<1>(xp, row, yp, bp, M, n, K, N);
  }
}

// Steps of 4 to OUTER_PANEL_ROWS rows: each group of NB_MAX weight rows is dequantised into an fp32 panel (in L1)
// and the panel goes through the fp32 register-tiled product (4x3 dot products), so the widening is paid once per
// weight, not once per row.
template <bool Q4>
void dot_panels(const float* xp, const uint8_t* wp, int64_t row_bytes, const float* bp, float* yp,
                        int64_t M, int64_t K, int64_t N) {
  const int64_t groups = N / NB_MAX;
  parallel_chunks(groups, 8, [&](int64_t begin, int64_t end) {
    float* panel = scratch(0, NB_MAX * K);
    for (int64_t g = begin; g < end; ++g) {
      for (int j = 0; j < NB_MAX; ++j) dequantize_row<Q4>(wp + (NB_MAX * g + j) * row_bytes, panel + j * K, K);
      rows<NB_MAX>(xp, panel, yp, bp, M, NB_MAX * g, K, N);
    }
  });
  leftover_rows<Q4>(xp, wp, row_bytes, bp, yp, M, K, N, groups * NB_MAX);
}

// The 8 vectors r[0..8) as the rows of an 8x8 matrix, transposed in place (r[i] becomes column i).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

constexpr int64_t PANEL_COLUMNS = 16;   // weight rows per panel: two vectors of output columns
constexpr int PANEL_ROWS = 6;           // rows of x per tile: 6 x 2 accumulators, 2 weight vectors, 1 broadcast

// y[m0..m0+MR, n0..n0+16) = x rows times a panel [K][16] (16 weight rows, interleaved: panel[16k + j] is weight
// row j at k) (+ bias). Outer products: each k broadcasts one value of each x row against two vectors of the
// panel, so every load feeds 2 (x) or MR (panel) multiply-adds and no row needs a horizontal sum.
// Always inlined: GCC 12 compiles a tile that stays a function of its own with its accumulators stored to the stack
// on every k (a test build with more kernels in this file did that to panel_tile<4> and <2>: 16-row products at
// ~0.77x).
template <int MR>
__attribute__((always_inline)) inline void panel_tile(const float* x, const float* panel, float* y, const float* bias,
                                                      int64_t m0, int64_t n0, int64_t K, int64_t N) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const float* row[MR];
  for (int m = 0; m < MR; ++m) row[m] = x + (m0 + m) * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + PANEL_COLUMNS * k), w1 = _mm256_loadu_ps(panel + PANEL_COLUMNS * k + 8);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(row[m] + k);
      acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
    }
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(y + (m0 + m) * N + n0, _mm256_add_ps(acc[m][0], b0));
    _mm256_storeu_ps(y + (m0 + m) * N + n0 + 8, _mm256_add_ps(acc[m][1], b1));
  }
}

// Steps of OUTER_PANEL_ROWS rows or more: each group of 16 weight rows is dequantised to exact fp32, transposed
// into an interleaved panel [K][16], and every row of x goes through it in tiles of 6 rows (panel_tile). The 4x3
// tiles of dot_panels read each row of x again for every 3 weight rows: at 64 rows that stream of x from L2 was
// their limit, where here each x value feeds 16 weight rows. Below ~40 rows building the wider panel costs more
// than it saves (SmolLM2 Q4_1 decode steps, 2 threads, interleaved A/B over 8 rounds, median step time against
// dot_panels: 16 rows 1.19x, 32 rows 1.04x, 48 rows 0.93x, 64 rows 0.85x). The weight rows left over (N not a
// multiple of 16) go through leftover_rows.
constexpr int64_t OUTER_PANEL_ROWS = 40;

template <bool Q4>
void outer_panels(const float* xp, const uint8_t* wp, int64_t row_bytes, const float* bp, float* yp,
                        int64_t M, int64_t K, int64_t N) {
  const int64_t groups = N / PANEL_COLUMNS;
  parallel_chunks(groups, 2, [&](int64_t begin, int64_t end) {
    float* rows16 = scratch(0, PANEL_COLUMNS * K);
    float* panel = scratch(1, PANEL_COLUMNS * K);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = PANEL_COLUMNS * g;
      for (int64_t j = 0; j < PANEL_COLUMNS; ++j) dequantize_row<Q4>(wp + (n0 + j) * row_bytes, rows16 + j * K, K);
      for (int64_t k0 = 0; k0 < K; k0 += 8)
        for (int64_t half = 0; half < 2; ++half) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows16 + (8 * half + i) * K + k0);
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k0 + i) * PANEL_COLUMNS + 8 * half, r[i]);
        }
      int64_t m0 = 0;
      for (; m0 + PANEL_ROWS <= M; m0 += PANEL_ROWS) panel_tile<PANEL_ROWS>(xp, panel, yp, bp, m0, n0, K, N);
      switch (M - m0) {
        case 5: panel_tile<5>(xp, panel, yp, bp, m0, n0, K, N); break;
        case 4: panel_tile<4>(xp, panel, yp, bp, m0, n0, K, N); break;
        case 3: panel_tile<3>(xp, panel, yp, bp, m0, n0, K, N); break;
        case 2: panel_tile<2>(xp, panel, yp, bp, m0, n0, K, N); break;
        case 1: panel_tile<1>(xp, panel, yp, bp, m0, n0, K, N); break;
        default: break;
      }
    }
  });
  leftover_rows<Q4>(xp, wp, row_bytes, bp, yp, M, K, N, groups * PANEL_COLUMNS);
}

// y[M, N] = x[M, K] W^T (+ bias), W repacked Q4_1 (Q4) or Q8_0 blocks, [N, K / 32 * block bytes].
template <bool Q4>
void linear_quant_into(const float* xp, const uint8_t* wp, const float* bp, float* yp, int64_t M, int64_t K,
                       int64_t N) {
  const int64_t blocks = K / 32, row_bytes = blocks * block_bytes<Q4>();
  if (M >= OUTER_PANEL_ROWS) return outer_panels<Q4>(xp, wp, row_bytes, bp, yp, M, K, N);
  if (M >= 4) return dot_panels<Q4>(xp, wp, row_bytes, bp, yp, M, K, N);
  std::vector<float> xsum(Q4 ? M * blocks : 0, 0.0f), scaled(Q4 ? M * K : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    __m256 s = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      const __m256 part = _mm256_loadu_ps(xp + i * 32 + 8 * k);
      s = _mm256_add_ps(s, part);
      _mm256_storeu_ps(scaled.data() + i * 32 + 8 * k, _mm256_mul_ps(part, _mm256_set1_ps(1.0f / (1 << (4 * k)))));
    }
    xsum[i] = sum8(s);
  }
  const float* sp = xsum.data();
  if (Q4) xp = scaled.data();   // x * 16^-k for nibble k: see block_values
  // One row: four weight rows per tile (the widening is the work); two or three: two weight rows per tile.
  if (M == 1)
    quant_columns<Q4, 4, 1>(xp, wp, row_bytes, sp, bp, yp, M, K, N);
  else
    quant_columns<Q4, 2, 3>(xp, wp, row_bytes, sp, bp, yp, M, K, N);
}

template <bool Q4>
torch::Tensor linear_quant(torch::Tensor x, torch::Tensor weight, int64_t K, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) == K, "x must be [M, K] float32");
  TORCH_CHECK(K % 32 == 0, "the input size must be a multiple of 32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kUInt8 &&
                  weight.size(1) == K / 32 * block_bytes<Q4>(),
              "weight must be [N, K / 32 * block bytes] uint8");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const torch::Tensor b = float_bias(bias);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  linear_quant_into<Q4>(x.data_ptr<float>(), weight.data_ptr<uint8_t>(), bp, y.data_ptr<float>(), M, K, N);
  return y;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// A whole decode step through every layer of a Llama-family model, in one call: B rows, each one new token of its
// own sequence. Eager torch spends ~30 ops per layer on it, each with its dispatch cost; at batch 1 on a CPU those
// costs are as large as reading the weights. The arithmetic is the fast path's (llama.py), fp32 throughout:
// RMSNorm, the fused projections (from GGUF blocks or the bf16 copy), rotary, the paged KV-cache write, attention
// over each sequence's cached context (slots listed per row), SiLU-gated MLP, residuals.
namespace {

// y = x w^T (+ b) with whichever compact weight format w holds (bf16, Q4_1 or Q8_0 blocks).
void linear_into(const float* x, const torch::Tensor& w, const float* bias, float* y, int64_t M, int64_t K) {
  const int64_t N = w.size(0);
  if (w.scalar_type() == torch::kBFloat16) {
    linear_bf16_into(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), bias, y, M, K, N);
  } else if (w.size(1) == K / 32 * block_bytes<true>()) {
    linear_quant_into<true>(x, w.data_ptr<uint8_t>(), bias, y, M, K, N);
  } else {
    linear_quant_into<false>(x, w.data_ptr<uint8_t>(), bias, y, M, K, N);
  }
}

// One row of RMSNorm as transformers' LlamaRMSNorm in fp32, weight * (x * rsqrt(mean(x^2) + eps)), after adding
// delta to x in place when there is one (the residual the norm follows). Vectorised: a scalar sum of squares
// (a loop-carried fp32 add the compiler may not reorder) was most of the step's serial time at 64 rows.
void add_rms_norm_row(float* x, const float* delta, const float* weight, float* y, int64_t H, float eps) {
  __m256 squares = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= H; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (delta != nullptr) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(delta + i));
      _mm256_storeu_ps(x + i, v);
    }
    squares = _mm256_fmadd_ps(v, v, squares);
  }
  float total = sum8(squares);
  for (; i < H; ++i) {
    if (delta != nullptr) x[i] += delta[i];
    total += x[i] * x[i];
  }
  const float scale = 1.0f / std::sqrt(total / static_cast<float>(H) + eps);
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (i = 0; i + 8 <= H; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), scale8)));
  for (; i < H; ++i) y[i] = weight[i] * (x[i] * scale);
}

// x * cos + rotate_half(x) * sin over one head, in place (cos/sin hold the head's D values), rounded as torch's
// three ops are: each product, then their sum.
void rotate(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + half);
    _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(cos + i)),
                                          _mm256_mul_ps(b, _mm256_loadu_ps(sin + i))));
    _mm256_storeu_ps(x + i + half, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(cos + i + half)),
                                                 _mm256_mul_ps(a, _mm256_loadu_ps(sin + i + half))));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// f(b) for each row b of a step: across the threads once the step has PARALLEL_ROWS rows or more (a parallel region
// costs ~1 us here), else in order on this thread. At 64 rows the layers' per-row work (norms, residual adds,
// rotary and cache writes, SiLU), scalar and on one thread, took 0.49 s of a run's 6.9 s in the decode kernel; it
// takes 0.2 s since. Same process, the two builds alternating (2026-12-07): the decode kernel's time 1.6 % less at 16
// rows (8 rounds, each 0.5-4 %), 0.9 % at 64 (6 rounds, -1.6 to +5 %), no change at 1 row; tokens/s unchanged
// within the spread.
constexpr int64_t PARALLEL_ROWS = 8;

template <class F>
void each_row(int64_t B, const F& f) {
  if (B < PARALLEL_ROWS) {
    for (int64_t b = 0; b < B; ++b) f(b);
    return;
  }
  parallel_chunks(B, 2, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b);
  });
}

// e^x for 8 floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial for e^r, then 2^n), ~1 ulp; softmax and
// SiLU take one exp per value, and the scalar call was a tenth of a batch-1 step.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// values[i] = e^(values[i] - top); returns their sum.
float exp_shifted(float* values, int64_t n, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(values + i), shift));
    _mm256_storeu_ps(values + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = sum8(acc);
  for (; i < n; ++i) {
    values[i] = std::exp(values[i] - top);
    total += values[i];
  }
  return total;
}

// out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up.
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return sum8(acc);
}

// out[i] = scale * (q . key of slot i) over n keys (D floats each), 8 keys at a time: their eight accumulators
// are reduced together by a transpose of horizontal adds, not by one horizontal sum per key.
void attention_scores(const float* q, const float* keys, const int64_t* slots, int64_t n, int64_t D, float scale,
                      float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float* key[8];
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) {
      key[j] = keys + slots[i + j] * D;
      acc[j] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[j] + d), acc[j]);
    }
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
  }
  for (; i < n; ++i) out[i] = dot(q, keys + slots[i] * D, D) * scale;
}

// out[d0, d0 + 8V) = sum_i weight * p[i] * value of slot i, accumulated in registers over the n values.
template <int V>
inline void weighted_values(const float* p, float weight, const float* values, const int64_t* slots, int64_t n,
                            int64_t D, int64_t d0, float* out) {
  __m256 acc[V];
  for (int k = 0; k < V; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 w = _mm256_set1_ps(p[i] * weight);
    const float* v = values + slots[i] * D + d0;
    for (int k = 0; k < V; ++k) acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * k), acc[k]);
  }
  for (int k = 0; k < V; ++k) _mm256_storeu_ps(out + d0 + 8 * k, acc[k]);
}

void attention_output(const float* p, float weight, const float* values, const int64_t* slots, int64_t n, int64_t D,
                      float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_values<8>(p, weight, values, slots, n, D, d0, out);
  for (; d0 < D; d0 += 8) weighted_values<1>(p, weight, values, slots, n, D, d0, out);
}

}  // namespace

// ids [B] (each row's token), embed [V, H] (the embedding table), positions [B] (each row's position: its row of
// the rotary tables cos/sin [P, D]), slots [B] (where each row's new key/value goes), context [B, L] with lengths
// [B] (the cache slots each row attends, its own new slot included), k_cache/v_cache per layer [Hkv, S, D] fp32,
// weights per layer: input norm, qkv, qkv bias (or an empty tensor), o, post norm, gate_up, down; final_norm [H].
// Returns the rows after the last layer and the final norm [B, H], ready for the LM head. The embedding lookup, the
// rotary rows and the final norm are here, not torch ops around the call: after the step has streamed the weights
// through the caches each torch op costs tens of microseconds (its code and data cold), ~0.5 ms a batch-1 step.
torch::Tensor decode_layers(torch::Tensor ids, torch::Tensor embed, torch::Tensor positions, torch::Tensor cos,
                            torch::Tensor sin, torch::Tensor slots, torch::Tensor context, torch::Tensor lengths,
                            std::vector<torch::Tensor> k_cache, std::vector<torch::Tensor> v_cache,
                            std::vector<torch::Tensor> weights, torch::Tensor final_norm, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, double eps, double scaling) {
  const int64_t B = ids.size(0), H = embed.size(1), D = head_dim, L = context.size(1);
  const int64_t layers = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(embed.scalar_type() == torch::kFloat32 && embed.is_contiguous() && D % 8 == 0,
              "a contiguous fp32 embedding and a head size divisible by 8 only");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && positions.scalar_type() == torch::kLong &&
                  positions.size(0) == B && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "ids and positions [B] int64, cos/sin [P, head size]");
  TORCH_CHECK(final_norm.numel() == H, "the final norm has the hidden size");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 7 * layers && v_cache.size() == k_cache.size(),
              "seven weights and two caches per layer");
  ids = ids.contiguous();
  positions = positions.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  final_norm = final_norm.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= id[b] && id[b] < embed.size(0), "a token id outside the vocabulary");
    TORCH_CHECK(0 <= position[b] && position[b] < cos.size(0), "a position beyond the rotary table");
  }
  auto x = torch::empty({B, H}, embed.options());
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(x.data_ptr<float>() + b * H, embed.data_ptr<float>() + id[b] * H, H * sizeof(float));
  slots = slots.contiguous();
  context = context.contiguous();
  lengths = lengths.contiguous();
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D, qkv_size = q_size + 2 * kv_size;
  const int64_t groups = num_heads / num_kv_heads;
  const int64_t inter = layers > 0 ? weights[5].size(0) / 2 : 0;
  std::vector<float> normed(B * H), qkv(B * qkv_size), attn(B * q_size), proj(B * H), gate_up(B * 2 * inter),
      act(B * inter);
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* ctx = context.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  const float epsf = static_cast<float>(eps), scale = static_cast<float>(scaling);
  // The residual adds ride on the norms that follow them: x += delta, then the next norm of x, one pass per row.
  // A layer's last residual (its MLP's output, in proj) is added by the next layer's input norm or the final norm.
  const auto add_norm = [&](const float* delta, const float* weight, float* out) {
    each_row(B, [&](int64_t b) {
      add_rms_norm_row(xp + b * H, delta == nullptr ? nullptr : delta + b * H, weight, out + b * H, H, epsf);
    });
  };
  for (int64_t layer = 0; layer < layers; ++layer) {
    const torch::Tensor* w = &weights[7 * layer];
    float* kc = k_cache[layer].data_ptr<float>();
    float* vc = v_cache[layer].data_ptr<float>();
    const int64_t S = k_cache[layer].size(1);
    add_norm(layer == 0 ? nullptr : proj.data(), w[0].data_ptr<float>(), normed.data());
    linear_into(normed.data(), w[1], w[2].numel() ? w[2].data_ptr<float>() : nullptr, qkv.data(), B, H);
    // Rows write distinct cache slots and read nothing of each other here, so they may go in any order.
    each_row(B, [&](int64_t b) {
      float* row = qkv.data() + b * qkv_size;
      const int64_t at = position[b] * D;   // this row's rotary angles
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate(row + h * D, cp + at, sp + at, D);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::memcpy(kc + (h * S + slot[b]) * D, row + q_size + h * D, D * sizeof(float));
        std::memcpy(vc + (h * S + slot[b]) * D, row + q_size + kv_size + h * D, D * sizeof(float));
      }
    });
    parallel_chunks(B * num_heads, 1, [&](int64_t begin, int64_t end) {
      float* scores = scratch(0, L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / num_heads, h = task % num_heads, kvh = h / groups, n = len[b];
        const float* q = qkv.data() + b * qkv_size + h * D;
        const float* keys = kc + kvh * S * D;
        const float* values = vc + kvh * S * D;
        attention_scores(q, keys, ctx + b * L, n, D, scale, scores);
        const float top = *std::max_element(scores, scores + n);
        const float inverse = 1.0f / exp_shifted(scores, n, top);
        attention_output(scores, inverse, values, ctx + b * L, n, D, attn.data() + b * q_size + h * D);
      }
    });
    linear_into(attn.data(), w[3], nullptr, proj.data(), B, q_size);
    add_norm(proj.data(), w[4].data_ptr<float>(), normed.data());
    linear_into(normed.data(), w[5], nullptr, gate_up.data(), B, H);
    each_row(B, [&](int64_t b) {
      silu_mul(gate_up.data() + b * 2 * inter, gate_up.data() + b * 2 * inter + inter, act.data() + b * inter, inter);
    });
    linear_into(act.data(), w[6], nullptr, proj.data(), B, inter);
  }
  auto out = torch::empty_like(x);
  add_norm(layers == 0 ? nullptr : proj.data(), final_norm.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// The GIL is released while a kernel runs: the engine's gRPC threads stream the previous step's tokens meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear_bf16", &linear_bf16, "y = x W^T + b, fp32 x, bf16 W, fp32 accumulation (AVX2)", no_gil);
  m.def("linear_q4_1", &linear_quant<true>, "y = x W^T + b, W in GGUF Q4_1 blocks, fp32 x and accumulation",
        no_gil);
  m.def("linear_q8_0", &linear_quant<false>, "y = x W^T + b, W in GGUF Q8_0 blocks, fp32 x and accumulation",
        no_gil);
  m.def("decode_layers", &decode_layers, "a Llama-family decode step from the embeddings to the final norm (B rows, one token each)",
        no_gil);
}
