// moegrow::routed_moe.out: a quantized MoE layer that reads only the chosen experts, as an
// ExecuTorch kernel (XNNPACK has no quantized gather-then-matmul, so a delegated MoE runs
// every expert). The routed layout is `export/codes.py`'s `routed_codes` (the bytes ONNX
// Runtime's QMoE reads):
//   x          float [N, C]       the tokens
//   gates      float [N, E]       each token's weight on each base expert, 0 off its top k
//   fc1        uint8 [E, 2F, C*bits/8]  gate and up rows interleaved (row 2f gate, 2f+1 up)
//   fc1_scales float [E, 2F, C/32] one scale per group of 32 inputs
//   fc2        uint8 [E, C, F*bits/8]   the down projection
//   fc2_scales float [E, C, F/32]
//   out        float [N, C]       sum over experts e with gates[n, e] != 0 of
//                                 gates[n, e] * W2_e (silu(W1g_e x) * (W1u_e x))
// Codes are unsigned, value = (code - 2^(bits-1)) * scale; at 4 bits two to a byte, the
// first input in the low nibble. Each chosen expert's rows are read once for all the tokens
// that chose it. The torch reference is `export/codes.py`'s `_routed_moe` (fp32 activations),
// the numpy one `device_kernels/native.py`'s `reference`; `tests/test_kernels.py`.
//
// moegrow::pooled_moe.out: the same sums over a run of n pool slots of equal width in the
// pool's own layout (`export/moe.py` `Pooled`, `device_kernels/layout.py` q8/q4/q2: the
// bytes `runtime/compress.py` writes), so a gated program reads only the pool slots its
// tokens chose instead of dequantizing every one at every run:
//   gates      float [N, n]
//   gate, up   uint8 [n*F, C/32, 32*bits/8], scales float [n*F*C/32] (row e*F + f)
//   down       uint8 [C, n*F/32, 32*bits/8], scales float [C*n*F/32] (expert e's inputs
//              are groups e*F/32 .. (e+1)*F/32 - 1 of every row)
// bits 8, 4 or 2 (2: four codes to a byte, the first in the lowest bits, zero point 2).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t kGroup = 32;  // activations are quantized per group of 32 inputs
constexpr int64_t kGrain = 64;  // rows per task of ExecuTorch's thread pool

// One token's input quantized to int8 per group of 32 (scale max|x| / 127, rounded to
// nearest even, as llama.cpp's q8_0; XNNPACK's are per token), in the order the
// codes of one group unpack to: at 4 bits the even inputs then the odd ones (low nibbles
// then high nibbles of the group's 16 bytes), at 8 and 2 bits as they come. `sums` holds each
// group's sum of codes (the codes' zero point 2^(bits-1) times it is subtracted once).
struct Activation {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sums;
  void set(const float* x, int64_t k, int64_t bits) {
    q.resize(k), scale.resize(k / kGroup), sums.resize(k / kGroup);
    for (int64_t g = 0; g < k / kGroup; ++g) {
      const float* v = x + g * kGroup;
      float peak = 0.f;
      for (int64_t i = 0; i < kGroup; ++i) peak = std::max(peak, std::fabs(v[i]));
      const float d = peak / 127.f, inv = peak > 0.f ? 127.f / peak : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < kGroup; ++i) {
        const int64_t at = bits == 4 ? (i % 2) * (kGroup / 2) + i / 2 : i;
        const auto c = static_cast<int8_t>(std::nearbyint(v[i] * inv));
        q[g * kGroup + at] = c;
        sum += c;
      }
      scale[g] = d, sums[g] = sum;
    }
  }
};

// One row of K codes (its groups' scales `w`) times a quantized token: sum over groups of
// w[g] * a.scale[g] * (sum_i code_i * a.q_i - zero * a.sums[g]).
inline float dot(int64_t bits, const uint8_t* codes, const float* w, const Activation& a,
                 int64_t k) {
  const int64_t groups = k / kGroup, bytes = kGroup * bits / 8;
  const int32_t zero = 1 << (bits - 1);
  const int8_t* x = a.q.data();
  float total = 0.f;
  int64_t g = 0;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
  for (; bits != 2 && g < groups; ++g, codes += bytes, x += kGroup) {
    __m256i u = bits == 4
        ? [&] {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
            return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low),
                                    _mm_and_si128(b, low));
          }()
        : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    if (bits == 8) {  // u8 x s8 pairs could overflow int16: signed codes, signs moved to v
      const __m256i s = _mm256_xor_si256(u, flip);  // code - 128 as int8
      v = _mm256_sign_epi8(v, s);
      u = _mm256_sign_epi8(s, s);
    }
    const __m256i dots = _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), ones);
    const float d = w[g] * a.scale[g];
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(d), acc);
    if (bits == 4) total -= d * static_cast<float>(zero * a.sums[g]);
  }
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  total += _mm_cvtss_f32(half);
#endif
  for (; g < groups; ++g, codes += bytes, x += kGroup) {  // portable: the same sums
    int32_t sum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const int32_t c = bits == 4   ? (i < kGroup / 2 ? codes[i] & 15 : codes[i - kGroup / 2] >> 4)
                        : bits == 2 ? (codes[i / 4] >> (2 * (i % 4))) & 3
                                    : codes[i];
      sum += (c - zero) * x[i];
    }
    total += w[g] * a.scale[g] * static_cast<float>(sum);
  }
  return total;
}

// The rows of one projection of every expert: row r of expert e at codes + e * e_codes +
// r * r_codes (bytes), its group scales at scales + e * e_scales + r * r_scales.
struct Rows {
  const uint8_t* codes;
  const float* scales;
  int64_t e_codes, r_codes, e_scales, r_scales;
  const uint8_t* row(int64_t e, int64_t r) const { return codes + e * e_codes + r * r_codes; }
  const float* scale(int64_t e, int64_t r) const { return scales + e * e_scales + r * r_scales; }
};

// out [N, C] = sum over experts e with gates[n, e] != 0 of gates[n, e] * down_e(silu(gate_e
// x) * up_e x), each chosen expert's rows read once for all the tokens that chose it.
void moe(const float* xs, const float* gs, int64_t n, int64_t c, int64_t f, int64_t experts,
         int64_t bits, const Rows& gate, const Rows& up, const Rows& down, float* ys) {
  std::memset(ys, 0, sizeof(float) * n * c);
  // the (expert, token) pairs with a gate, expert by expert
  std::vector<int64_t> pair_token, first{0}, used;
  for (int64_t e = 0; e < experts; ++e) {
    for (int64_t t = 0; t < n; ++t)
      if (gs[t * experts + e] != 0.f) pair_token.push_back(t);
    if (static_cast<int64_t>(pair_token.size()) > first.back())
      used.push_back(e), first.push_back(static_cast<int64_t>(pair_token.size()));
  }
  std::vector<Activation> inputs(n), hidden(pair_token.size());
  for (int64_t t = 0; t < n; ++t) inputs[t].set(xs + t * c, c, bits);
  std::vector<float> h(pair_token.size() * f);
  const auto experts_used = static_cast<int64_t>(used.size());
  // the gate and up rows r of every chosen expert, split over the threads
  executorch::extension::parallel_for(0, experts_used * f, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t at = lo; at < hi; ++at) {
      const int64_t j = at / f, r = at % f, e = used[j];
      for (int64_t p = first[j]; p < first[j + 1]; ++p) {
        const Activation& a = inputs[pair_token[p]];
        const float g = dot(bits, gate.row(e, r), gate.scale(e, r), a, c),
                    u = dot(bits, up.row(e, r), up.scale(e, r), a, c);
        h[p * f + r] = g / (1.f + std::exp(-g)) * u;
      }
    }
  });
  for (size_t p = 0; p < pair_token.size(); ++p) hidden[p].set(h.data() + p * f, f, bits);
  // every output row r sums the chosen experts' down rows r: each thread owns its rows
  executorch::extension::parallel_for(0, c, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = 0; j < experts_used; ++j) {
      const int64_t e = used[j];
      for (int64_t r = lo; r < hi; ++r) {
        for (int64_t p = first[j]; p < first[j + 1]; ++p) {
          const int64_t t = pair_token[p];
          ys[t * c + r] += gs[t * experts + e] * dot(bits, down.row(e, r), down.scale(e, r),
                                                     hidden[p], f);
        }
      }
    }
  });
}

Tensor& routed_moe_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& gates,
                       const Tensor& fc1, const Tensor& fc1_scales, const Tensor& fc2,
                       const Tensor& fc2_scales, int64_t bits, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, bits == 4 || bits == 8, InvalidArgument, out,
                      "routed_moe: bits must be 4 or 8");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 2 && gates.dim() == 2 && fc1.dim() == 3 &&
                               fc2.dim() == 3 && x.scalar_type() == ScalarType::Float &&
                               gates.scalar_type() == ScalarType::Float &&
                               fc1.scalar_type() == ScalarType::Byte &&
                               fc2.scalar_type() == ScalarType::Byte,
                      InvalidArgument, out, "routed_moe: unexpected ranks or dtypes");
  const int64_t n = x.size(0), c = x.size(1), experts = fc1.size(0), f = fc1.size(1) / 2;
  ET_KERNEL_CHECK_MSG(ctx, gates.size(0) == n && gates.size(1) == experts &&
                               fc1.size(2) * 8 == c * bits && fc2.size(1) == c &&
                               fc2.size(2) * 8 == f * bits && c % kGroup == 0 &&
                               f % kGroup == 0 && fc1_scales.size(2) * kGroup == c &&
                               fc2_scales.size(2) * kGroup == f,
                      InvalidArgument, out, "routed_moe: shapes do not match the layout");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok,
                  InvalidArgument, out);
  const int64_t row1 = c * bits / 8, row2 = f * bits / 8, g1 = c / kGroup, g2 = f / kGroup;
  const uint8_t* w1 = fc1.const_data_ptr<uint8_t>();
  const float* s1 = fc1_scales.const_data_ptr<float>();
  // gate row 2r and up row 2r + 1 of fc1
  const Rows gate{w1, s1, 2 * f * row1, 2 * row1, 2 * f * g1, 2 * g1},
      up{w1 + row1, s1 + g1, 2 * f * row1, 2 * row1, 2 * f * g1, 2 * g1},
      down{fc2.const_data_ptr<uint8_t>(), fc2_scales.const_data_ptr<float>(), c * row2, row2,
           c * g2, g2};
  moe(x.const_data_ptr<float>(), gates.const_data_ptr<float>(), n, c, f, experts, bits, gate,
      up, down, out.mutable_data_ptr<float>());
  return out;
}

Tensor& pooled_moe_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& gates,
                       const Tensor& gate_codes, const Tensor& gate_scales,
                       const Tensor& up_codes, const Tensor& up_scales, const Tensor& down_codes,
                       const Tensor& down_scales, int64_t bits, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, bits == 2 || bits == 4 || bits == 8, InvalidArgument, out,
                      "pooled_moe: bits must be 2, 4 or 8");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 2 && gates.dim() == 2 && gate_codes.dim() == 3 &&
                               up_codes.dim() == 3 && down_codes.dim() == 3 &&
                               x.scalar_type() == ScalarType::Float &&
                               gates.scalar_type() == ScalarType::Float &&
                               gate_codes.scalar_type() == ScalarType::Byte &&
                               up_codes.scalar_type() == ScalarType::Byte &&
                               down_codes.scalar_type() == ScalarType::Byte,
                      InvalidArgument, out, "pooled_moe: unexpected ranks or dtypes");
  const int64_t n = x.size(0), c = x.size(1), experts = gates.size(1);
  const int64_t f = experts ? gate_codes.size(0) / experts : 0;
  const int64_t row1 = c * bits / 8, row2 = f * bits / 8, g1 = c / kGroup, g2 = f / kGroup;
  ET_KERNEL_CHECK_MSG(ctx, gates.size(0) == n && experts > 0 && c % kGroup == 0 &&
                               f % kGroup == 0 && gate_codes.size(0) == experts * f &&
                               gate_codes.size(1) * gate_codes.size(2) == row1 &&
                               up_codes.sizes() == gate_codes.sizes() &&
                               down_codes.size(0) == c &&
                               down_codes.size(1) * down_codes.size(2) == experts * row2 &&
                               gate_scales.numel() == experts * f * g1 &&
                               up_scales.numel() == experts * f * g1 &&
                               down_scales.numel() == c * experts * g2,
                      InvalidArgument, out, "pooled_moe: shapes do not match the layout");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok,
                  InvalidArgument, out);
  const Rows gate{gate_codes.const_data_ptr<uint8_t>(), gate_scales.const_data_ptr<float>(),
                  f * row1, row1, f * g1, g1},
      up{up_codes.const_data_ptr<uint8_t>(), up_scales.const_data_ptr<float>(), f * row1, row1,
         f * g1, g1},
      down{down_codes.const_data_ptr<uint8_t>(), down_scales.const_data_ptr<float>(), row2,
           experts * row2, g2, experts * g2};
  moe(x.const_data_ptr<float>(), gates.const_data_ptr<float>(), n, c, f, experts, bits, gate,
      up, down, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(moegrow, "routed_moe.out", routed_moe_out);
EXECUTORCH_LIBRARY(moegrow, "pooled_moe.out", pooled_moe_out);
