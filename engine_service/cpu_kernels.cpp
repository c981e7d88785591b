// y = x W^T (+ b) with fp32 activations and bf16 weights, for the few rows of a decode step on AVX2 CPUs.
//
// A decode step reads every weight once and does little arithmetic with it: its speed is the speed of reading
// the weights. bf16 halves the bytes; this kernel widens each bf16 weight to fp32 in registers (a 16-bit shift)
// and accumulates in fp32, with fp32 activations, so it is more precise than a bf16 matmul. Rows are handled
// in blocks of up to 4 against 3 weight rows at a time: each weight vector is loaded and widened once per block.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

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

// Rows m0..m0+MB of x against weight rows n0..n0+NB.
template <int MB, int NB>
inline void block(const float* x, const uint16_t* w, float* y, const float* bias, int64_t m0, int64_t n0,
                  int64_t K, int64_t N) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t k_vec = K / 8 * 8;
  for (int64_t k = 0; k < k_vec; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_bf16(w + (n0 + j) * K + k);
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int j = 0; j < NB; ++j) {
      float total = sum8(acc[m][j]);
      for (int64_t k = k_vec; k < K; ++k) total += x[(m0 + m) * K + k] * bf16_to_float(w[(n0 + j) * K + k]);
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

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "weight must be a 2-D bfloat16 tensor");
  TORCH_CHECK(x.size(1) == weight.size(1), "x and weight disagree on the input size");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  torch::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    bp = b.data_ptr<float>();
  }
  const int64_t groups = N / NB_MAX;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) rows<NB_MAX>(xp, wp, yp, bp, M, NB_MAX * g, K, N);
  });
  for (int64_t n = groups * NB_MAX; n < N; ++n) rows<1>(xp, wp, yp, bp, M, n, K, N);
  return y;
}

// GGUF's own block formats, read as they are stored: Q4_1 blocks of 32 weights {fp16 d, fp16 m, 16 bytes of
// nibbles: low nibble of byte j is weight j, high nibble weight j + 16}, w = d * q + m; Q8_0 blocks {fp16 d,
// 32 int8}, w = d * q. The weights are the model's (the fp32 model is their dequantisation): fewer bytes, same values.
namespace {

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// Rows m0..m0+MB of x against weight rows n0..n0+NB, accumulators in registers (a chain through memory made
// every block wait for the previous one's store); xsum[m * blocks + b] = sum of x[m] over block b (Q4_1's offset).
template <bool Q4, int MB, int NB>
inline void quant_block(const float* x, const uint8_t* w, int64_t row_bytes, const float* xsum, float* y,
                        const float* bias, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  const int64_t blocks = K / 32;
  const int64_t block_bytes = Q4 ? 20 : 34;
  __m256 acc[MB][NB];
  float offset[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      acc[m][j] = _mm256_setzero_ps();
      offset[m][j] = 0.0f;
    }
  for (int64_t b = 0; b < blocks; ++b) {
    for (int j = 0; j < NB; ++j) {
      const uint8_t* block = w + (n0 + j) * row_bytes + b * block_bytes;
      const __m256 d = _mm256_set1_ps(half_to_float(block));
      __m256 q[4];
      if (Q4) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
        const __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
        q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)));
        q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
        q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)));
      } else {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18));
        q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        q[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        q[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
      }
      const float block_min = Q4 ? half_to_float(block + 2) : 0.0f;
      for (int m = 0; m < MB; ++m) {
        const float* xb = x + (m0 + m) * K + b * 32;
        __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), q[0]);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q[1], t);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q[2], t);
        t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q[3], t);
        acc[m][j] = _mm256_fmadd_ps(d, t, acc[m][j]);
        if (Q4) offset[m][j] += block_min * xsum[(m0 + m) * blocks + b];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j)
      y[(m0 + m) * N + n0 + j] = sum8(acc[m][j]) + offset[m][j] + (bias ? bias[n0 + j] : 0.0f);
}

template <bool Q4, int NB>
inline void quant_rows(const float* x, const uint8_t* w, int64_t row_bytes, const float* xsum, float* y,
                       const float* bias, int64_t M, int64_t n0, int64_t K, int64_t N) {
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2) quant_block<Q4, 2, NB>(x, w, row_bytes, xsum, y, bias, m0, n0, K, N);
  if (m0 < M) quant_block<Q4, 1, NB>(x, w, row_bytes, xsum, y, bias, m0, n0, K, N);
}

template <bool Q4>
torch::Tensor linear_quant(torch::Tensor x, torch::Tensor weight, int64_t K, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) == K, "x must be [M, K] float32");
  TORCH_CHECK(K % 32 == 0, "the input size must be a multiple of 32");
  const int64_t block_bytes = Q4 ? 20 : 34, blocks = K / 32;
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kUInt8 && weight.size(1) == blocks * block_bytes,
              "weight must be [N, K / 32 * block bytes] uint8");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  auto xsum = x.view({M, blocks, 32}).sum(-1).contiguous();
  const float* xp = x.data_ptr<float>();
  const float* sp = xsum.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  torch::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    bp = b.data_ptr<float>();
  }
  const int64_t row_bytes = blocks * block_bytes;
  const int64_t groups = N / 4;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) quant_rows<Q4, 4>(xp, wp, row_bytes, sp, yp, bp, M, 4 * g, K, N);
  });
  for (int64_t n = groups * 4; n < N; ++n) quant_rows<Q4, 1>(xp, wp, row_bytes, sp, yp, bp, M, n, K, N);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "y = x W^T + b, fp32 x, bf16 W, fp32 accumulation (AVX2)");
  m.def("linear_q4_1", &linear_quant<true>, "y = x W^T + b, W in GGUF Q4_1 blocks, fp32 x and accumulation");
  m.def("linear_q8_0", &linear_quant<false>, "y = x W^T + b, W in GGUF Q8_0 blocks, fp32 x and accumulation");
}
