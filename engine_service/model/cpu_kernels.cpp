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
#include <type_traits>
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
  // Each share on a cache line of its own: an owner taking its next chunk writes a line already in its cache, where
  // shares side by side moved the line between the threads at every take (batch-1 layer products 0.97-0.98x).
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  std::vector<Share> shares(threads);
  for (int64_t t = 0; t < threads; ++t)
    shares[t].range =
        static_cast<uint64_t>(chunks * t / threads) << 32 | static_cast<uint64_t>(chunks * (t + 1) / threads);
  const auto take = [&](int64_t t, bool front) -> int64_t {
    uint64_t range = shares[t].range.load();
    while (true) {
      const uint64_t first = range >> 32, last = range & 0xFFFFFFFFu;
      if (first >= last) return -1;
      const uint64_t rest = front ? (first + 1) << 32 | last : first << 32 | (last - 1);
      if (shares[t].range.compare_exchange_weak(range, rest)) return static_cast<int64_t>(front ? first : last - 1);
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

// Rows m0..m0+MB of x against the NB bf16 weight rows at w (row stride K), into output columns n0..n0+NB.
template <int MB, int NB>
inline void block(const float* x, const uint16_t* w, float* y, const float* bias, int64_t m0, int64_t n0, int64_t K,
                  int64_t N) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t k_vec = K / 8 * 8;
  for (int64_t k = 0; k < k_vec; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_bf16(w + j * K + k);
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int j = 0; j < NB; ++j) {
      float total = sum8(acc[m][j]);
      for (int64_t k = k_vec; k < K; ++k) total += x[(m0 + m) * K + k] * bf16_to_float(w[j * K + k]);
      if (bias != nullptr) total += bias[n0 + j];
      y[(m0 + m) * N + n0 + j] = total;
    }
  }
}

template <int NB>
inline void rows(const float* x, const uint16_t* w, float* y, const float* bias, int64_t M, int64_t n0, int64_t K,
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

// GGUF's block formats, repacked once at load (gguf_weights.repack) into groups of 8 weight rows, the rows of a group
// side by side in the lanes of a vector: one load gives 8 rows' weights at the same input position. The values are
// the model's (the fp32 model is their dequantisation): fewer bytes, same values. Per group and block of 32 inputs:
//   Q4_1 (w = d * q + m), 160 bytes: 8 quads of 8 rows' uint16 (quad t of row i holds weights t, t + 8, t + 16,
//        t + 24 of that row's block in its nibbles 0-3), then the 8 rows' fp16 scales d, then their fp16 minimums m.
//   Q8_0 (w = d * q), 272 bytes: 32 positions of 8 rows' int8, then the 8 rows' fp16 scales d.
// Rows come in pairs of groups (16 rows, zero rows after the last matrix row): the unit of every loop below.
// Against one row per weight row (the layout before 2026-12-07), a batch-1 product needs no horizontal sum per
// weight row and no per-row scale handling, and an x value is broadcast once for 16 weight rows; a panel is built
// without a transpose (bit for bit the same panel). SmolLM2 decode steps (the layers and the LM head) replayed in one
// process, the two layouts and their kernels in alternating blocks, new/old time: 1 row 0.87, 2 rows 0.81, 3 rows
// 0.66, 16 rows 0.89, 64 rows 0.96.
namespace {

template <bool Q4>
constexpr int64_t group_block_bytes() { return Q4 ? 160 : 272; }

constexpr int64_t PAIR_ROWS = 16;   // weight rows per pair of groups: two vectors of output columns

inline __m256 load_halves(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Q4_1 quad (8 rows' uint16) as 32-bit lanes.
inline __m256i load_quad(const uint8_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Nibble s of each lane, in place: q * 16^s exactly as a float.
inline __m256 nibble(__m256i quad, int s) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(quad, _mm256_set1_epi32(0x0F << (4 * s))));
}

// Q8_0: the 8 rows' int8 at one position as floats.
inline __m256 load_int8s(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// MR rows of x against the 16 weight rows of groups g0 and g1: out[m * 16 + j]. x rows are K apart; for Q4_1 they
// come pre-scaled (x[32b + t + 8s] * 16^-s, for nibble s) with xsum[m * blocks + b] their unscaled block sums (the
// minimums' term). Each block's products are summed in registers, then scaled by the 8 rows' d at once; `ahead`
// bytes on, the next pair's block is prefetched (the hardware prefetcher alone left the loop waiting on memory).
template <bool Q4, int MR>
inline void pair_rows(const float* x, int64_t K, const float* xsum, const uint8_t* g0, const uint8_t* g1,
                      int64_t blocks, int64_t ahead, float* out) {
  constexpr int64_t G = group_block_bytes<Q4>();
  constexpr int P = MR == 1 ? 2 : 1;   // chains per accumulator: one row alone needs two to hide the latency
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p0 = g0 + b * G;
    const uint8_t* p1 = g1 + b * G;
    for (int64_t c = 0; c < G; c += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(p0 + ahead + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p1 + ahead + c), _MM_HINT_T0);
    }
    __m256 part[MR][2][P];
    for (int m = 0; m < MR; ++m)
      for (int p = 0; p < P; ++p) part[m][0][p] = part[m][1][p] = _mm256_setzero_ps();
    const float* xb = x + 32 * b;
    if constexpr (Q4) {
      for (int t = 0; t < 8; ++t) {
        const __m256i quad0 = load_quad(p0 + 16 * t), quad1 = load_quad(p1 + 16 * t);
        for (int s = 0; s < 4; ++s) {
          const __m256 q0 = nibble(quad0, s), q1 = nibble(quad1, s);
          for (int m = 0; m < MR; ++m) {
            const __m256 xv = _mm256_broadcast_ss(xb + m * K + t + 8 * s);
            part[m][0][s % P] = _mm256_fmadd_ps(q0, xv, part[m][0][s % P]);
            part[m][1][s % P] = _mm256_fmadd_ps(q1, xv, part[m][1][s % P]);
          }
        }
      }
    } else {
      for (int k = 0; k < 32; ++k) {
        const __m256 q0 = load_int8s(p0 + 8 * k), q1 = load_int8s(p1 + 8 * k);
        for (int m = 0; m < MR; ++m) {
          const __m256 xv = _mm256_broadcast_ss(xb + m * K + k);
          part[m][0][k % P] = _mm256_fmadd_ps(q0, xv, part[m][0][k % P]);
          part[m][1][k % P] = _mm256_fmadd_ps(q1, xv, part[m][1][k % P]);
        }
      }
    }
    const __m256 d0 = load_halves(p0 + (Q4 ? 128 : 256)), d1 = load_halves(p1 + (Q4 ? 128 : 256));
    for (int m = 0; m < MR; ++m) {
      __m256 s0 = part[m][0][0], s1 = part[m][1][0];
      if constexpr (P == 2) {
        s0 = _mm256_add_ps(s0, part[m][0][1]);
        s1 = _mm256_add_ps(s1, part[m][1][1]);
      }
      acc[m][0] = _mm256_fmadd_ps(d0, s0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(d1, s1, acc[m][1]);
    }
  }
  if constexpr (Q4) {
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256 m0 = load_halves(g0 + b * G + 144), m1 = load_halves(g1 + b * G + 144);
      for (int m = 0; m < MR; ++m) {
        const __m256 s = _mm256_broadcast_ss(xsum + m * blocks + b);
        acc[m][0] = _mm256_fmadd_ps(m0, s, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(m1, s, acc[m][1]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(out + m * PAIR_ROWS, acc[m][0]);
    _mm256_storeu_ps(out + m * PAIR_ROWS + 8, acc[m][1]);
  }
}

// The 8 rows of a group dequantised to exact fp32 into columns of a panel (out[k * 16 + i] = row i at input k; out
// is the panel's first or second half): Q4_1's d * q (exact: 4 x 11 significant bits, nibble s read as q * 16^s and
// its scale taken as d * 16^-s, exact too) + m rounds once, as the dequantisation that built the fp32 model does;
// Q8_0's d * q is exact.
template <bool Q4>
inline void pack_group(const uint8_t* group, float* out, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = group + b * group_block_bytes<Q4>();
    float* o = out + 32 * b * PAIR_ROWS;
    if constexpr (Q4) {
      const __m256 d = load_halves(p + 128), m = load_halves(p + 144);
      __m256 scale[4];
      for (int s = 0; s < 4; ++s) scale[s] = _mm256_mul_ps(d, _mm256_set1_ps(1.0f / static_cast<float>(1 << (4 * s))));
      for (int t = 0; t < 8; ++t) {
        const __m256i quad = load_quad(p + 16 * t);
        for (int s = 0; s < 4; ++s)
          _mm256_storeu_ps(o + (t + 8 * s) * PAIR_ROWS, _mm256_fmadd_ps(nibble(quad, s), scale[s], m));
      }
    } else {
      const __m256 d = load_halves(p + 256);
      for (int k = 0; k < 32; ++k) _mm256_storeu_ps(o + k * PAIR_ROWS, _mm256_mul_ps(load_int8s(p + 8 * k), d));
    }
  }
}

// A per-thread scratch buffer of at least n floats (slot 0 or 1), kept between calls. The panel loops below run
// once per pair of groups (3,072 pairs for a 64-row step's LM head), and a fresh zero-filled vector for each was
// ~110 MB of memset per 64-row step.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[2];
  if (static_cast<int64_t>(buffers[slot].size()) < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

constexpr int PANEL_ROWS = 6;   // rows of x per tile: 6 x 2 accumulators, 2 weight vectors, 1 broadcast

// y[m0..m0+MR, 16 columns) (row stride ldy) = x rows times a panel [K][16] (+ bias). Outer products: each k
// broadcasts one value of each x row against two vectors of the panel, so every load feeds 2 (x) or MR (panel)
// multiply-adds and no row needs a horizontal sum.
// Always inlined: GCC 12 compiles a tile that stays a function of its own with its accumulators stored to the stack
// on every k (a test build with more kernels in this file did that to panel_tile<4> and <2>: 16-row products at
// ~0.77x).
template <int MR>
__attribute__((always_inline)) inline void panel_tile(const float* x, const float* panel, float* y, int64_t ldy,
                                                      const float* bias, int64_t m0, int64_t K) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const float* row[MR];
  for (int m = 0; m < MR; ++m) row[m] = x + (m0 + m) * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + PAIR_ROWS * k), w1 = _mm256_loadu_ps(panel + PAIR_ROWS * k + 8);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(row[m] + k);
      acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
    }
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(y + (m0 + m) * ldy, _mm256_add_ps(acc[m][0], b0));
    _mm256_storeu_ps(y + (m0 + m) * ldy + 8, _mm256_add_ps(acc[m][1], b1));
  }
}

// Rows of a step from which a pair's weights are dequantised once into an fp32 panel and every row goes through it
// in tiles of 6 rows (panel_tile); below it the rows read the blocks themselves, 3 at a time (pair_rows), the
// widening paid once per 3 rows. SmolLM2 decode steps (the layers and the LM head, replayed in one process with the
// layout before 2026-12-07 in alternating blocks; new/old time): rows of 3 against panels at 4 rows 0.77 / 0.92, at
// 8 rows 0.73-0.83 / 0.98, at 12 rows 0.87-0.90 / 0.89-0.91, at 16 rows 1.01 / 0.89-0.90.
constexpr int64_t PANEL_STEP_ROWS = 13;

// y[M, N] = x[M, K] W^T (+ bias), W repacked Q4_1 (Q4) or Q8_0 groups.
template <bool Q4>
void linear_quant_into(const float* xp, const uint8_t* wp, const float* bp, float* yp, int64_t M, int64_t K,
                       int64_t N) {
  const int64_t blocks = K / 32, group_bytes = blocks * group_block_bytes<Q4>();
  const int64_t pairs = (N + PAIR_ROWS - 1) / PAIR_ROWS;
  // The last pair may run past N (its zero rows): its columns go through a buffer of 16, copied out in part.
  const auto columns = [&](int64_t g) { return std::min(PAIR_ROWS, N - PAIR_ROWS * g); };
  if (M >= PANEL_STEP_ROWS) {
    parallel_chunks(pairs, 2, [&](int64_t begin, int64_t end) {
      float* panel = scratch(0, PAIR_ROWS * K);
      for (int64_t g = begin; g < end; ++g) {
        pack_group<Q4>(wp + 2 * g * group_bytes, panel, blocks);
        pack_group<Q4>(wp + (2 * g + 1) * group_bytes, panel + 8, blocks);
        const int64_t n0 = PAIR_ROWS * g, n = columns(g);
        float bias16[PAIR_ROWS] = {};
        if (bp != nullptr) std::copy(bp + n0, bp + n0 + n, bias16);
        float* y = n == PAIR_ROWS ? yp + n0 : scratch(1, M * PAIR_ROWS);
        const int64_t ldy = n == PAIR_ROWS ? N : PAIR_ROWS;
        const float* bias = bp != nullptr ? bias16 : nullptr;
        int64_t m0 = 0;
        for (; m0 + PANEL_ROWS <= M; m0 += PANEL_ROWS) panel_tile<PANEL_ROWS>(xp, panel, y, ldy, bias, m0, K);
        switch (M - m0) {
          case 5: panel_tile<5>(xp, panel, y, ldy, bias, m0, K); break;
          case 4: panel_tile<4>(xp, panel, y, ldy, bias, m0, K); break;
          case 3: panel_tile<3>(xp, panel, y, ldy, bias, m0, K); break;
          case 2: panel_tile<2>(xp, panel, y, ldy, bias, m0, K); break;
          case 1: panel_tile<1>(xp, panel, y, ldy, bias, m0, K); break;
          default: break;
        }
        if (n < PAIR_ROWS)
          for (int64_t m = 0; m < M; ++m) std::copy(y + m * PAIR_ROWS, y + m * PAIR_ROWS + n, yp + m * N + n0);
      }
    });
    return;
  }
  // Q4_1: x * 16^-s for nibble s (see nibble) and the block sums of x for the minimums.
  std::vector<float> xsum(Q4 ? M * blocks : 0), scaled(Q4 ? M * K : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    __m256 s = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      const __m256 part = _mm256_loadu_ps(xp + i * 32 + 8 * k);
      s = _mm256_add_ps(s, part);
      _mm256_storeu_ps(scaled.data() + i * 32 + 8 * k, _mm256_mul_ps(part, _mm256_set1_ps(1.0f / (1 << (4 * k)))));
    }
    xsum[i] = sum8(s);
  }
  const float* x = Q4 ? scaled.data() : xp;
  parallel_chunks(pairs, 1, [&](int64_t begin, int64_t end) {
    float out[3 * PAIR_ROWS];
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* g0 = wp + 2 * g * group_bytes;
      const uint8_t* g1 = g0 + group_bytes;
      const int64_t ahead = 2 * group_bytes;   // the next pair, this thread's next unless it is the chunk's last
      const int64_t n0 = PAIR_ROWS * g, n = columns(g);
      // Up to 3 rows of x at a time (4 as 2 + 2); after the first, the pair's blocks come from L1.
      for (int64_t m0 = 0, rows = 0; m0 < M; m0 += rows) {
        rows = M - m0 == 4 ? 2 : std::min<int64_t>(3, M - m0);
        const float* xr = x + m0 * K;
        const float* sr = xsum.data() + (Q4 ? m0 * blocks : 0);
        switch (rows) {
          case 1: pair_rows<Q4, 1>(xr, K, sr, g0, g1, blocks, ahead, out); break;
          case 2: pair_rows<Q4, 2>(xr, K, sr, g0, g1, blocks, ahead, out); break;
          default: pair_rows<Q4, 3>(xr, K, sr, g0, g1, blocks, ahead, out); break;
        }
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t j = 0; j < n; ++j)
            yp[(m0 + m) * N + n0 + j] = out[m * PAIR_ROWS + j] + (bp ? bp[n0 + j] : 0.0f);
      }
    }
  });
}

// The repacked groups' shape for a [N, K] matrix: [pairs * 2, K / 32 * group block bytes].
template <bool Q4>
void check_groups(const torch::Tensor& weight, int64_t K, int64_t N) {
  TORCH_CHECK(K > 0 && K % 32 == 0, "the input size must be a positive multiple of 32");
  TORCH_CHECK(N > 0 && weight.dim() == 2 && weight.scalar_type() == torch::kUInt8 &&
                  weight.size(0) == (N + PAIR_ROWS - 1) / PAIR_ROWS * 2 &&
                  weight.size(1) == K / 32 * group_block_bytes<Q4>(),
              "weight must be the repacked groups of an [N, K] matrix: uint8 [N rounded up to 16 / 8, K / 32 * group "
              "bytes]");
}

template <bool Q4>
torch::Tensor linear_quant(torch::Tensor x, torch::Tensor weight, int64_t K, int64_t N,
                           c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) == K, "x must be [M, K] float32");
  check_groups<Q4>(weight, K, N);
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const torch::Tensor b = float_bias(bias);
  TORCH_CHECK(!b.defined() || b.numel() == N, "the bias must have N values");
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (M > 0) linear_quant_into<Q4>(x.data_ptr<float>(), weight.data_ptr<uint8_t>(), bp, y.data_ptr<float>(), M, K, N);
  return y;
}

// Row `row` of a matrix held as repacked groups (check_groups), dequantised to the values pack_group gives it (the
// fp32 model's: Q4_1's d * q + m rounded once, Q8_0's exact d * q): an embedding lookup from the GGUF's blocks.
template <bool Q4>
void dequantize_row(const uint8_t* groups, int64_t K, int64_t row, float* out) {
  const int64_t blocks = K / 32, G = group_block_bytes<Q4>();
  const uint8_t* group = groups + (row / 8) * blocks * G;
  const int64_t lane = row % 8;
  uint16_t bits;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = group + b * G;
    float* o = out + 32 * b;
    if constexpr (Q4) {
      std::memcpy(&bits, p + 128 + 2 * lane, 2);
      const float d = _cvtsh_ss(bits);
      std::memcpy(&bits, p + 144 + 2 * lane, 2);
      const float m = _cvtsh_ss(bits);
      for (int t = 0; t < 8; ++t) {
        uint16_t quad;
        std::memcpy(&quad, p + 16 * t + 2 * lane, 2);
        for (int s = 0; s < 4; ++s) o[t + 8 * s] = std::fma(static_cast<float>((quad >> (4 * s)) & 0x0F), d, m);
      }
    } else {
      std::memcpy(&bits, p + 256 + 2 * lane, 2);
      const float d = _cvtsh_ss(bits);
      for (int k = 0; k < 32; ++k) o[k] = static_cast<float>(static_cast<int8_t>(p[8 * k + lane])) * d;
    }
  }
}

// Is `table` the repacked groups of a matrix of K columns (Q4_1: true), not an fp32 [N, K] one? Its groups hold
// the rows rounded up to 16 (zero rows after the last): 8 rows each.
bool quantized_table(const torch::Tensor& table, int64_t K, bool& q4) {
  if (table.scalar_type() != torch::kUInt8) return false;
  q4 = table.dim() == 2 && table.size(1) == K / 32 * group_block_bytes<true>();
  if (q4)
    check_groups<true>(table, K, table.size(0) * 8);
  else
    check_groups<false>(table, K, table.size(0) * 8);
  TORCH_CHECK(table.is_contiguous(), "the repacked groups must be contiguous");
  return true;
}

// out[i] = row ids[i] of `table`: fp32 [N, K], or repacked Q4_1 / Q8_0 groups of an [N, K] matrix.
void lookup_rows(const torch::Tensor& table, const int64_t* ids, int64_t n, int64_t K, float* out) {
  bool q4 = false;
  const bool quantized = quantized_table(table, K, q4);
  const int64_t rows = quantized ? table.size(0) * 8 : table.size(0);
  TORCH_CHECK(quantized || (table.scalar_type() == torch::kFloat32 && table.is_contiguous() && table.size(1) == K),
              "an embedding must be a contiguous fp32 [vocab, hidden] table or its repacked blocks");
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= ids[i] && ids[i] < rows, "a token id outside the vocabulary");
  for (int64_t i = 0; i < n; ++i) {
    if (!quantized)
      std::memcpy(out + i * K, table.data_ptr<float>() + ids[i] * K, K * sizeof(float));
    else if (q4)
      dequantize_row<true>(table.data_ptr<uint8_t>(), K, ids[i], out + i * K);
    else
      dequantize_row<false>(table.data_ptr<uint8_t>(), K, ids[i], out + i * K);
  }
}

torch::Tensor embed_rows(torch::Tensor ids, torch::Tensor table, int64_t K) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong, "ids must be a 1-D int64 tensor");
  ids = ids.contiguous();
  auto out = torch::empty({ids.size(0), K}, torch::dtype(torch::kFloat32));
  lookup_rows(table, ids.data_ptr<int64_t>(), ids.size(0), K, out.data_ptr<float>());
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// A whole decode step through every layer of a Llama-family model, in one call: B rows, each one new token of its
// own sequence. Eager torch spends ~30 ops per layer on it, each with its dispatch cost; at batch 1 on a CPU those
// costs are as large as reading the weights. The arithmetic is the fast path's (llama.py), fp32 throughout:
// RMSNorm, the fused projections (from GGUF blocks or the bf16 copy), rotary, the paged KV-cache write, attention
// over each sequence's cached context (slots listed per row), SiLU-gated MLP, residuals.
namespace {

// y = x w^T (+ b) with whichever compact weight format w holds (bf16, or Q4_1 or Q8_0 groups), w being [N, K].
void linear_into(const float* x, const torch::Tensor& w, const float* bias, float* y, int64_t M, int64_t K,
                 int64_t N) {
  if (w.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(w.size(0) == N && w.size(1) == K, "a bf16 weight of the wrong shape");
    linear_bf16_into(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), bias, y, M, K, N);
  } else if (w.size(1) == K / 32 * group_block_bytes<true>()) {
    check_groups<true>(w, K, N);
    linear_quant_into<true>(x, w.data_ptr<uint8_t>(), bias, y, M, K, N);
  } else {
    check_groups<false>(w, K, N);
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

// A KV-cache entry type: fp32, or 16-bit (--kv-cache-dtype float16 / bfloat16) widened to fp32 on load.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) { return load_bf16(reinterpret_cast<const uint16_t*>(p)); }

// A new key or value into its cache slot, rounded as torch's .to(dtype) rounds (to nearest even): the prefill path
// writes the cache with torch, and both must store the same values.
template <class T>
inline void store_entry(T* out, const float* in, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, in, D * sizeof(float));
  } else {
    for (int64_t i = 0; i < D; ++i) out[i] = T(in[i]);
  }
}

template <class T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  return sum8(acc);
}

// out[i] = scale * (q . key of slot i) over n keys (D values each), 8 keys at a time: their eight accumulators
// are reduced together by a transpose of horizontal adds, not by one horizontal sum per key.
template <class T>
void attention_scores(const float* q, const T* keys, const int64_t* slots, int64_t n, int64_t D, float scale,
                      float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const T* key[8];
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) {
      key[j] = keys + slots[i + j] * D;
      acc[j] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(key[j] + d), acc[j]);
    }
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
  }
  for (; i < n; ++i) out[i] = dot(q, keys + slots[i] * D, D) * scale;
}

// out[d0, d0 + 8V) = sum_i weight * p[i] * value of slot i, accumulated in registers over the n values.
template <int V, class T>
inline void weighted_values(const float* p, float weight, const T* values, const int64_t* slots, int64_t n,
                            int64_t D, int64_t d0, float* out) {
  __m256 acc[V];
  for (int k = 0; k < V; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 w = _mm256_set1_ps(p[i] * weight);
    const T* v = values + slots[i] * D + d0;
    for (int k = 0; k < V; ++k) acc[k] = _mm256_fmadd_ps(w, load8(v + 8 * k), acc[k]);
  }
  for (int k = 0; k < V; ++k) _mm256_storeu_ps(out + d0 + 8 * k, acc[k]);
}

template <class T>
void attention_output(const float* p, float weight, const T* values, const int64_t* slots, int64_t n, int64_t D,
                      float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_values<8>(p, weight, values, slots, n, D, d0, out);
  for (; d0 < D; d0 += 8) weighted_values<1>(p, weight, values, slots, n, D, d0, out);
}

}  // namespace

// ids [B] (each row's token), embed (the embedding table: fp32 [V, H] or its repacked GGUF groups), positions [B]
// (each row's position: its row of the rotary tables cos/sin [P, D]), slots [B] (where each row's new key/value
// goes), context [B, L] with lengths
// [B] (the cache slots each row attends, its own new slot included), k_cache/v_cache per layer [Hkv, S, D] (fp32,
// or fp16 / bf16 with --kv-cache-dtype: widened to fp32 as they are read, new entries rounded as torch rounds),
// weights per layer: input norm, qkv, qkv bias (or an empty tensor), o, post norm, gate_up, down (each compact
// matrix as linear_into reads it; intermediate_size: the MLP's); final_norm [H].
// Returns the rows after the last layer and the final norm [B, H], ready for the LM head. The embedding lookup, the
// rotary rows and the final norm are here, not torch ops around the call: after the step has streamed the weights
// through the caches each torch op costs tens of microseconds (its code and data cold), ~0.5 ms a batch-1 step.
template <class T>
torch::Tensor decode_layers_with(torch::Tensor ids, torch::Tensor embed, torch::Tensor positions, torch::Tensor cos,
                                 torch::Tensor sin, torch::Tensor slots, torch::Tensor context, torch::Tensor lengths,
                                 const std::vector<torch::Tensor>& k_cache, const std::vector<torch::Tensor>& v_cache,
                                 const std::vector<torch::Tensor>& weights, torch::Tensor final_norm,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size,
                                 double eps, double scaling) {
  const int64_t B = ids.size(0), H = final_norm.numel(), D = head_dim, L = context.size(1);
  const int64_t layers = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(D % 8 == 0, "a head size divisible by 8 only");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && positions.scalar_type() == torch::kLong &&
                  positions.size(0) == B && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "ids and positions [B] int64, cos/sin [P, head size]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 7 * layers,
              "seven weights per layer");
  ids = ids.contiguous();
  positions = positions.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  final_norm = final_norm.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= position[b] && position[b] < cos.size(0), "a position beyond the rotary table");
  auto x = torch::empty({B, H}, torch::dtype(torch::kFloat32));
  lookup_rows(embed, id, B, H, x.data_ptr<float>());
  slots = slots.contiguous();
  context = context.contiguous();
  lengths = lengths.contiguous();
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D, qkv_size = q_size + 2 * kv_size;
  const int64_t groups = num_heads / num_kv_heads;
  const int64_t inter = intermediate_size;
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
    T* kc = k_cache[layer].data_ptr<T>();
    T* vc = v_cache[layer].data_ptr<T>();
    const int64_t S = k_cache[layer].size(1);
    add_norm(layer == 0 ? nullptr : proj.data(), w[0].data_ptr<float>(), normed.data());
    linear_into(normed.data(), w[1], w[2].numel() ? w[2].data_ptr<float>() : nullptr, qkv.data(), B, H, qkv_size);
    // Rows write distinct cache slots and read nothing of each other here, so they may go in any order.
    each_row(B, [&](int64_t b) {
      float* row = qkv.data() + b * qkv_size;
      const int64_t at = position[b] * D;   // this row's rotary angles
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate(row + h * D, cp + at, sp + at, D);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        store_entry(kc + (h * S + slot[b]) * D, row + q_size + h * D, D);
        store_entry(vc + (h * S + slot[b]) * D, row + q_size + kv_size + h * D, D);
      }
    });
    parallel_chunks(B * num_heads, 1, [&](int64_t begin, int64_t end) {
      float* scores = scratch(0, L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / num_heads, h = task % num_heads, kvh = h / groups, n = len[b];
        const float* q = qkv.data() + b * qkv_size + h * D;
        const T* keys = kc + kvh * S * D;
        const T* values = vc + kvh * S * D;
        attention_scores(q, keys, ctx + b * L, n, D, scale, scores);
        const float top = *std::max_element(scores, scores + n);
        const float inverse = 1.0f / exp_shifted(scores, n, top);
        attention_output(scores, inverse, values, ctx + b * L, n, D, attn.data() + b * q_size + h * D);
      }
    });
    linear_into(attn.data(), w[3], nullptr, proj.data(), B, q_size, H);
    add_norm(proj.data(), w[4].data_ptr<float>(), normed.data());
    linear_into(normed.data(), w[5], nullptr, gate_up.data(), B, H, 2 * inter);
    each_row(B, [&](int64_t b) {
      silu_mul(gate_up.data() + b * 2 * inter, gate_up.data() + b * 2 * inter + inter, act.data() + b * inter, inter);
    });
    linear_into(act.data(), w[6], nullptr, proj.data(), B, inter, H);
  }
  auto out = torch::empty_like(x);
  add_norm(layers == 0 ? nullptr : proj.data(), final_norm.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

torch::Tensor decode_layers(torch::Tensor ids, torch::Tensor embed, torch::Tensor positions, torch::Tensor cos,
                            torch::Tensor sin, torch::Tensor slots, torch::Tensor context, torch::Tensor lengths,
                            std::vector<torch::Tensor> k_cache, std::vector<torch::Tensor> v_cache,
                            std::vector<torch::Tensor> weights, torch::Tensor final_norm, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size, double eps,
                            double scaling) {
  TORCH_CHECK(k_cache.size() == v_cache.size(), "one key and one value cache per layer");
  const auto type = k_cache.empty() ? torch::kFloat32 : k_cache[0].scalar_type();
  for (size_t i = 0; i < k_cache.size(); ++i)
    TORCH_CHECK(k_cache[i].scalar_type() == type && v_cache[i].scalar_type() == type && k_cache[i].is_contiguous() &&
                    v_cache[i].is_contiguous() && k_cache[i].dim() == 3 && k_cache[i].size(0) == num_kv_heads &&
                    k_cache[i].size(2) == head_dim && v_cache[i].sizes() == k_cache[i].sizes(),
                "contiguous [kv heads, slots, head size] caches of one dtype");
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    return decode_layers_with<T>(ids, embed, positions, cos, sin, slots, context, lengths, k_cache, v_cache, weights,
                                 final_norm, num_heads, num_kv_heads, head_dim, intermediate_size, eps, scaling);
  };
  switch (type) {
    case torch::kFloat32: return run(float{});
    case torch::kFloat16: return run(c10::Half{});
    case torch::kBFloat16: return run(c10::BFloat16{});
    default: TORCH_CHECK(false, "a KV cache in fp32, fp16 or bf16 only");
  }
}

// The GIL is released while a kernel runs: the engine's gRPC threads stream the previous step's tokens meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear_bf16", &linear_bf16, "y = x W^T + b, fp32 x, bf16 W, fp32 accumulation (AVX2)", no_gil);
  m.def("linear_q4_1", &linear_quant<true>,
        "y = x W^T + b, W [N, K] in GGUF Q4_1 blocks (repacked groups), fp32 x and accumulation",
        no_gil);
  m.def("linear_q8_0", &linear_quant<false>,
        "y = x W^T + b, W [N, K] in GGUF Q8_0 blocks (repacked groups), fp32 x and accumulation",
        no_gil);
  m.def("embed_rows", &embed_rows, "rows of an fp32 [N, K] table or of its repacked Q4_1 / Q8_0 groups, as fp32",
        no_gil);
  m.def("decode_layers", &decode_layers, "a Llama-family decode step from the embeddings to the final norm (B rows, one token each)",
        no_gil);
}
