// Weight-only quantized matrix products on a CPU, computed on GGUF blocks as they are stored.
//
//   out (M, N) = x (M, K) @ W^T,  W given as one or more row groups of GGUF blocks
//
// The activations are quantized in blocks of 32 to two 8-bit levels, x = d * (q + r / 128)
// (one float scale per block, and the block's sum, which folds each format's offset or minimum
// into a single term): about 15 bits, so the result is within float rounding of the dequantized
// product, where 8-bit activations alone change noticeably more next-token choices. Every 32 weights
// are unpacked into bytes once and multiplied with the M activation rows in integer
// arithmetic. Three code paths, chosen when the library loads: AVX-512 VNNI, AVX2, and plain
// C++ (dequantize a row, then a float dot product) for any other CPU; the last one is also
// the reference the tests compare the others with. decode_layer (below) runs a whole
// transformer block for one new token per row on these products.
//
// Block layouts (ggml's, as GGUF stores them): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 hold 32 weights
// per block with a float16 scale (and minimum); Q4_K, Q5_K, Q6_K hold 256 weights per block
// with 6- or 8-bit scales for sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q6_K).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace llmos {

enum : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Format {
  int64_t block, bytes;  // weights per block, bytes per block
};

static Format format_of(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "GGUF block type ", type, " is not supported by the quantized kernels");
}

static inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Sub-block j (0..7) of a Q4_K / Q5_K block: 6-bit scale and minimum, packed in 12 bytes.
static inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// ------------------------------------------------------------------------------------------
// Plain C++: one row of blocks to floats.

static void dequantize_row(int64_t type, const uint8_t* w, float* y, int64_t K) {
  const Format f = format_of(type);
  for (int64_t b = 0; b < K / f.block; ++b, w += f.bytes, y += f.block) {
    switch (type) {
      case Q4_0:
      case Q4_1: {
        const float d = half(w);
        const float m = type == Q4_1 ? half(w + 2) : -8.0f * d;
        const uint8_t* qs = w + (type == Q4_1 ? 4 : 2);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * (qs[j] & 0x0F) + m;
          y[j + 16] = d * (qs[j] >> 4) + m;
        }
        break;
      }
      case Q5_0:
      case Q5_1: {
        const float d = half(w);
        const float m = type == Q5_1 ? half(w + 2) : -16.0f * d;
        const uint8_t* p = w + (type == Q5_1 ? 4 : 2);
        uint32_t qh;
        std::memcpy(&qh, p, 4);
        const uint8_t* qs = p + 4;
        for (int j = 0; j < 16; ++j) {
          const int lo = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
          const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          y[j] = d * lo + m;
          y[j + 16] = d * hi + m;
        }
        break;
      }
      case Q8_0: {
        const float d = half(w);
        const int8_t* qs = reinterpret_cast<const int8_t*>(w + 2);
        for (int j = 0; j < 32; ++j) y[j] = d * qs[j];
        break;
      }
      case Q4_K:
      case Q5_K: {
        const float d = half(w), dmin = half(w + 2);
        const uint8_t* scales = w + 4;
        const uint8_t* qh = w + 16;  // Q5_K only
        const uint8_t* qs = w + (type == Q5_K ? 48 : 16);
        for (int j = 0; j < 4; ++j) {
          uint8_t sc0, m0, sc1, m1;
          scale_min_k4(2 * j, scales, sc0, m0);
          scale_min_k4(2 * j + 1, scales, sc1, m1);
          for (int l = 0; l < 32; ++l) {
            int lo = qs[32 * j + l] & 0x0F, hi = qs[32 * j + l] >> 4;
            if (type == Q5_K) {
              lo |= ((qh[l] >> (2 * j)) & 1) << 4;
              hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            y[64 * j + l] = d * sc0 * lo - dmin * m0;
            y[64 * j + 32 + l] = d * sc1 * hi - dmin * m1;
          }
        }
        break;
      }
      case Q6_K: {
        const uint8_t* ql = w;
        const uint8_t* qh = w + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
        const float d = half(w + 208);
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8) {
          for (int l = 0; l < 32; ++l) {
            const int s = l / 16;
            const int q0 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q1 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[128 * h + l] = d * sc[s] * q0;
            y[128 * h + l + 32] = d * sc[s + 2] * q1;
            y[128 * h + l + 64] = d * sc[s + 4] * q2;
            y[128 * h + l + 96] = d * sc[s + 6] * q3;
          }
        }
        break;
      }
    }
  }
}

// One row group, plain C++: out[m, n] = x[m] . dequantized row n.
static void matmul_reference(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t type,
                             int64_t N, float* out, int64_t ldo) {
  const int64_t row_bytes = K / format_of(type).block * format_of(type).bytes;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      dequantize_row(type, w + n * row_bytes, row.data(), K);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += xm[k] * row[k];
        out[m * ldo + n] = acc;
      }
    }
  });
}

// Activations in blocks of 32, x = d * (128 q + r): q and r (M, K), and per block that d (the
// block's 8-bit scale divided by 128) and the exact sum of x.
struct Activations {
  int64_t M, K;
  std::vector<int8_t> q, r;
  std::vector<float> d, s;
  std::vector<float> dv;  // AVX-512 path: each block's d repeated 8 times (a pair of blocks fills a register)
  std::vector<uint8_t> qu, ru;  // AVX-512 path: q + 128 and r + 128 as unsigned bytes (for signed weights)
};

// The keys and values one query attends to: positions [start, end) of one head, position t's
// key at k + t * ks and value at v + t * vs, except that positions below `split` are read at
// k0 + t * ks (v0 + t * vs) instead: a prefix the rows of a batch share, kept once in the
// first row. T is the cache's element type, float or c10::Half.
template <class T>
struct Span {
  const T *k, *v, *k0, *v0;
  int64_t ks, vs, start, split, end;
  int64_t mid() const { return std::min(std::max(split, start), end); }  // where the row's own part begins
  const T* key(int64_t t) const { return (t < split ? k0 : k) + t * ks; }
  const T* value(int64_t t) const { return (t < split ? v0 : v) + t * vs; }
};

static inline float to_float(float x) { return x; }
static inline float to_float(c10::Half x) { return static_cast<float>(x); }

}  // namespace llmos

// ------------------------------------------------------------------------------------------
// The SIMD paths: the same source compiled twice, for AVX2 and for AVX-512 VNNI.

#define LLMOS_SIMD_NS avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "qmatmul_simd.inc"
#pragma GCC pop_options
#undef LLMOS_SIMD_NS

#define LLMOS_SIMD_NS vnni
#define LLMOS_VNNI 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include "qmatmul_simd.inc"
#pragma GCC pop_options
#undef LLMOS_VNNI
#undef LLMOS_SIMD_NS

namespace llmos {

enum Path : int64_t { REFERENCE = 0, AVX2 = 1, VNNI = 2 };

static int64_t best_path() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    return VNNI;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return AVX2;
  return REFERENCE;
}

static int64_t g_best = best_path();
static int64_t g_path = g_best;

// out (M, sum of rows) = x (M, K) @ [W_0; W_1; ...]^T: the groups (a fused q/k/v projection
// whose parts have different block types) share one quantization of x.
static at::Tensor qmm(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types) {
  TORCH_CHECK(weights.size() == types.size() && !weights.empty(), "qmm: one block type per weight group");
  TORCH_CHECK(x_in.dim() == 2, "qmm: x must be (M, K)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  int64_t N = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const Format f = format_of(types[i]);
    TORCH_CHECK(K % f.block == 0, "qmm: K = ", K, " is not a multiple of the block size ", f.block);
    TORCH_CHECK(weights[i].scalar_type() == at::kByte && weights[i].dim() == 2 && weights[i].is_contiguous() &&
                    weights[i].size(1) == K / f.block * f.bytes,
                "qmm: weight group ", i, " must be contiguous uint8 (rows, ", K / f.block * f.bytes, ")");
    N += weights[i].size(0);
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // one set of buffers per thread, kept between calls: a decode step makes over a hundred of
  // these products, and fresh vectors would each be allocated and zeroed. (Pass `a` on by
  // reference: a lambda run by the worker threads that named it would see their own copies.)
  thread_local Activations a;
  if (g_path != REFERENCE) {
    a.M = M;
    a.K = K;
    a.q.resize(M * K);
    a.r.resize(M * K);
    a.d.resize(M * K / 32);
    a.s.resize(M * K / 32);
    if (g_path == VNNI) {
      a.dv.resize(M * K / 4);
      a.qu.resize(M * K);
      a.ru.resize(M * K);
      vnni::quantize_activations(x.data_ptr<float>(), a);
    } else {
      avx2::quantize_activations(x.data_ptr<float>(), a);
    }
  }
  int64_t col = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const uint8_t* w = weights[i].data_ptr<uint8_t>();
    const int64_t n = weights[i].size(0);
    float* o = out.data_ptr<float>() + col;
    if (g_path == VNNI) vnni::matmul(a, w, types[i], n, o, N);
    else if (g_path == AVX2) avx2::matmul(a, w, types[i], n, o, N);
    else matmul_reference(x.data_ptr<float>(), M, K, w, types[i], n, o, N);
    col += n;
  }
  return out;
}

// Rows `ids` of a quantized matrix, as floats (an embedding lookup); ids = None: every row.
static at::Tensor dequantize(const at::Tensor& w, int64_t type, int64_t K, const c10::optional<at::Tensor>& ids) {
  const Format f = format_of(type);
  TORCH_CHECK(K % f.block == 0, "dequantize: K = ", K, " is not a multiple of the block size ", f.block);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.size(1) == K / f.block * f.bytes,
              "dequantize: the weight must be contiguous uint8 (rows, ", K / f.block * f.bytes, ")");
  const int64_t rows = w.size(0);
  at::Tensor idx = ids.has_value() ? ids->to(at::kLong).contiguous().view(-1) : at::arange(rows, at::kLong);
  const int64_t n = idx.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "dequantize: row ", ip[i], " is out of range (", rows, " rows)");
  at::Tensor out = at::empty({n, K}, at::kFloat);
  const uint8_t* base = w.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dequantize_row(type, base + ip[i] * w.size(1), o + i * K, K);
  });
  return out;
}

// y = x / rms(x) * w for `rows` rows of d values (y may be x).
static void rms_rows(float* y, const float* x, const float* w, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / d + eps);
    for (int64_t i = 0; i < d; ++i) y[r * d + i] = xr[i] * inv * w[i];
  }
}

// One query (D values) against a span: o = softmax(scale * q . k) . v. p is scratch space.
template <class T>
static void attend(const float* q, const Span<T>& s, int64_t D, float scale, float* o, std::vector<float>& p) {
  p.resize(s.end - s.start);
  float mx = -INFINITY;
  for (int64_t t = s.start; t < s.end; ++t) {
    const T* kt = s.key(t);
    float dot = 0.0f;
    for (int64_t j = 0; j < D; ++j) dot += q[j] * to_float(kt[j]);
    p[t - s.start] = dot * scale;
    mx = std::max(mx, p[t - s.start]);
  }
  float total = 0.0f;
  for (auto& x : p) total += (x = std::exp(x - mx));
  for (int64_t j = 0; j < D; ++j) o[j] = 0.0f;
  for (int64_t t = s.start; t < s.end; ++t) {
    const T* vt = s.value(t);
    const float w = p[t - s.start] / total;
    for (int64_t j = 0; j < D; ++j) o[j] += w * to_float(vt[j]);
  }
}

// out = act(gate) * up for B rows of gate | up (2F values each): SiLU, or GELU-tanh.
static void gate_activation(const float* gu, float* out, int64_t B, int64_t F, bool gelu) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < F; ++i) {
      const float g = gu[b * 2 * F + i], u = gu[b * 2 * F + F + i];
      const float a = gelu ? 0.5f * g * (1.0f + std::tanh(0.7978845608f * (g + 0.044715f * g * g * g)))
                           : g / (1.0f + std::exp(-g));
      out[b * F + i] = a * u;
    }
}

// The same three on the SIMD path when the CPU has one (its 256-bit code serves both), and the
// plain loops above for the reference path or a width that is not a multiple of 8.
static void rms_rows_best(float* y, const float* x, const float* w, int64_t rows, int64_t d, float eps) {
  if (g_path != REFERENCE && d % 8 == 0) return avx2::rms_rows(y, x, w, rows, d, eps);
  rms_rows(y, x, w, rows, d, eps);
}

template <class T>
static void attend_best(const float* q, const Span<T>& s, int64_t D, float scale, float* o, std::vector<float>& p) {
  if (g_path != REFERENCE && D % 8 == 0) return avx2::attend(q, s, D, scale, o, p);
  attend(q, s, D, scale, o, p);
}

// Work item i of B rows x H query heads, in the order that keeps one key/value head's cache
// in the CPU's caches while it is read: every query head of that head, for every row, in turn
// (with a shared prefix, the rows read the same prefix one after the other).
struct HeadOrder {
  int64_t B, H, Hkv;
  void operator()(int64_t i, int64_t& b, int64_t& h, int64_t& g) const {
    const int64_t per = H / Hkv;
    g = i / (B * per);
    b = (i / per) % B;
    h = g * per + i % per;
  }
};

static void gate_activation_best(const float* gu, float* out, int64_t B, int64_t F, bool gelu) {
  if (g_path != REFERENCE) return avx2::gate_activation(gu, out, B, F, gelu);
  gate_activation(gu, out, B, F, gelu);
}

// y = x / rms(x) * w over the last dimension, in one pass (inference: no autograd).
static at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(w.numel() == d, "rms_norm: weight has ", w.numel(), " entries for rows of ", d);
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    rms_rows_best(yp + r0 * d, xp + r0 * d, wp, r1 - r0, d, static_cast<float>(eps));
  });
  return y;
}

// Attention of one new token per row (decoding): q (B, H, 1, D) against k, v (B, Hkv, L, D),
// float32 or float16, the last dimension contiguous; H a multiple of Hkv (grouped-query
// attention). No mask: every one of the L cached positions is visible.
template <class T>
static void decode_attention_rows(const float* qp, const at::Tensor& k, const at::Tensor& v, int64_t B, int64_t H,
                                  int64_t D, float scale, float* op) {
  const T *kp = reinterpret_cast<const T*>(k.data_ptr()), *vp = reinterpret_cast<const T*>(v.data_ptr());
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2), L = k.size(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const HeadOrder order{B, H, k.size(1)};
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b, h, g;
      order(i, b, h, g);
      const T *kr = kp + b * ks0 + g * ks1, *vr = vp + b * vs0 + g * vs1;
      attend_best(qp + (b * H + h) * D, Span<T>{kr, vr, kr, vr, ks2, vs2, 0, 0, L}, D, scale, op + (b * H + h) * D, p);
    }
  });
}

static at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, "decode_attention: q must be float32");
  TORCH_CHECK((k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf) && v.scalar_type() == k.scalar_type(),
              "decode_attention: k and v must be both float32 or both float16");
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q (B, H, 1, D), k and v (B, Hkv, L, D)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need a contiguous last dimension");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % Hkv == 0, "decode_attention: shapes do not match");
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  if (k.scalar_type() == at::kHalf)
    decode_attention_rows<c10::Half>(q.data_ptr<float>(), k, v, B, H, D, static_cast<float>(scale), out.data_ptr<float>());
  else
    decode_attention_rows<float>(q.data_ptr<float>(), k, v, B, H, D, static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

// ------------------------------------------------------------------------------------------
// One transformer block for one new token per row, all in C++: what model.py's Block does for
// decoding, without the few dozen PyTorch operations (and their dispatch) per layer.
//
// x (B, C) -> x after the block. Row b's token sits at position pos[b]: its key and value are
// written into kc, vc (B, Hkv, max_len, D; float32 or float16) there, and it attends to
// positions [max(0, pos - window + 1), pos] (window 0: all of [0, pos]); those below `shared`
// are read from row 0, whose first `shared` positions every row holds too (candidates of one
// prompt), so that the prefix is read from memory once, not once per row. RoPE in the rotate-half layout,
// with model.py's tables (the sine's sign folded in). Optional: QK-norm, and the norms of each
// sublayer's output before the residual add (Gemma); gelu selects GELU-tanh over SiLU.

static void rope(float* v, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] + b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// decode_layer's attention: each row's new key and value (in qkv, after RoPE) into the caches
// at its position, then every query head of every row against its span of the caches.
template <class T>
static void cached_attention(const float* qkv, const at::Tensor& kc, const at::Tensor& vc, const int64_t* pos,
                             int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t window, int64_t shared, float scale,
                             float* out) {
  T *kcp = reinterpret_cast<T*>(kc.data_ptr()), *vcp = reinterpret_cast<T*>(vc.data_ptr());
  const int64_t L = kc.size(2), width = (H + 2 * Hkv) * D;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at_ = ((b * Hkv + g) * L + pos[b]) * D;
      const float *kn = qkv + b * width + (H + g) * D, *vn = qkv + b * width + (H + Hkv + g) * D;
      for (int64_t j = 0; j < D; ++j) kcp[at_ + j] = static_cast<T>(kn[j]), vcp[at_ + j] = static_cast<T>(vn[j]);
    }
  const HeadOrder order{B, H, Hkv};
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b, h, g;
      order(i, b, h, g);
      const int64_t end = pos[b] + 1, start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const T *kr = kcp + (b * Hkv + g) * L * D, *vr = vcp + (b * Hkv + g) * L * D;
      const T *k0 = kcp + g * L * D, *v0 = vcp + g * L * D;  // row 0's
      attend_best(qkv + b * width + h * D, Span<T>{kr, vr, k0, v0, D, D, start, b ? shared : 0, end}, D, scale,
                  out + (b * H + h) * D, p);
    }
  });
}

static at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& mlp_norm,
                               const c10::optional<at::Tensor>& post_attn_norm,
                               const c10::optional<at::Tensor>& post_mlp_norm, const c10::optional<at::Tensor>& q_norm,
                               const c10::optional<at::Tensor>& k_norm, at::TensorList wqkv, at::IntArrayRef tqkv,
                               at::TensorList wo, at::IntArrayRef to, at::TensorList w13, at::IntArrayRef t13,
                               at::TensorList w2, at::IntArrayRef t2, const at::Tensor& kc, const at::Tensor& vc,
                               const at::Tensor& pos_in, const at::Tensor& cos_t, const at::Tensor& sin_t,
                               int64_t H, int64_t Hkv, int64_t D, int64_t window, double eps_d, double scale_d,
                               bool gelu, int64_t shared) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decode_layer: x must be float32 (B, C)");
  TORCH_CHECK((kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kHalf) && vc.scalar_type() == kc.scalar_type() &&
                  kc.is_contiguous() && vc.is_contiguous() && kc.dim() == 4 && kc.size(1) == Hkv && kc.size(3) == D &&
                  vc.sizes() == kc.sizes(),
              "decode_layer: the caches must be contiguous float32 or float16 (B, Hkv, max_len, D)");
  TORCH_CHECK(shared >= 0 && shared <= kc.size(2), "decode_layer: shared = ", shared, " is outside the cache");
  const at::Tensor x = x_in.contiguous(), pos = pos_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = kc.size(2);
  TORCH_CHECK(kc.size(0) == B && pos.numel() == B, "decode_layer: one position per row of x and of the caches");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < L && pp[b] < cos_t.size(0), "decode_layer: position ", pp[b], " is outside the cache");
  const float eps = static_cast<float>(eps_d), scale = static_cast<float>(scale_d);

  at::Tensor h = at::empty({B, C}, x.options());
  rms_rows_best(h.data_ptr<float>(), x.data_ptr<float>(), attn_norm.data_ptr<float>(), B, C, eps);
  at::Tensor qkv = qmm(h, wqkv, tqkv);  // (B, (H + 2 Hkv) D)
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D, "decode_layer: the q/k/v projection has the wrong width");
  float* qp = qkv.data_ptr<float>();
  const float *cp = cos_t.data_ptr<float>(), *sp = sin_t.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qp + b * (H + 2 * Hkv) * D;
    if (q_norm.has_value()) rms_rows_best(row, row, q_norm->data_ptr<float>(), H, D, eps);
    if (k_norm.has_value()) rms_rows_best(row + H * D, row + H * D, k_norm->data_ptr<float>(), Hkv, D, eps);
    const float* c = cp + pp[b] * D;
    const float* s = sp + pp[b] * D;
    for (int64_t h2 = 0; h2 < H + Hkv; ++h2) rope(row + h2 * D, c, s, D);
  }
  at::Tensor att = at::empty({B, H * D}, x.options());
  if (kc.scalar_type() == at::kHalf)
    cached_attention<c10::Half>(qp, kc, vc, pp, B, H, Hkv, D, window, shared, scale, att.data_ptr<float>());
  else
    cached_attention<float>(qp, kc, vc, pp, B, H, Hkv, D, window, shared, scale, att.data_ptr<float>());
  at::Tensor out = qmm(att, wo, to);  // (B, C)
  float* op = out.data_ptr<float>();
  if (post_attn_norm.has_value()) rms_rows_best(op, op, post_attn_norm->data_ptr<float>(), B, C, eps);
  at::Tensor y = x.clone();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < B * C; ++i) yp[i] += op[i];
  rms_rows_best(h.data_ptr<float>(), yp, mlp_norm.data_ptr<float>(), B, C, eps);
  at::Tensor gu = qmm(h, w13, t13);  // (B, 2 F): gate, then up
  const int64_t F = gu.size(1) / 2;
  at::Tensor act = at::empty({B, F}, x.options());
  const float* gp = gu.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  gate_activation_best(gp, actp, B, F, gelu);
  at::Tensor down = qmm(act, w2, t2);
  float* dp = down.data_ptr<float>();
  if (post_mlp_norm.has_value()) rms_rows_best(dp, dp, post_mlp_norm->data_ptr<float>(), B, C, eps);
  for (int64_t i = 0; i < B * C; ++i) yp[i] += dp[i];
  return y;
}

// The columns of one row of logits x (V values) whose softmax probability is at least floor
// (> 0), and those probabilities (the SIMD paths' likely_columns, or this plain loop).
static void likely_columns_best(const float* x, int64_t V, float floor, std::vector<int64_t>& cols,
                                std::vector<float>& probs) {
  if (g_path != REFERENCE) return avx2::likely_columns(x, V, floor, cols, probs);
  const float mx = *std::max_element(x, x + V);
  if (!std::isfinite(mx)) return;
  double total = 0.0;
  for (int64_t j = 0; j < V; ++j) total += std::exp(x[j] - mx);
  const float sum = static_cast<float>(total);
  for (int64_t j = 0; j < V; ++j) {
    const float p = std::exp(x[j] - mx) / sum;
    if (p >= floor) cols.push_back(j), probs.push_back(p);
  }
}

// Top-p (nucleus) for each row of logits (B, V), looking only among the tokens whose probability
// is at least floor: a row whose such tokens hold mass p is settled, and keeps its most likely
// tokens while the mass before each is below `cut` (p, less a little slack: sampling.py says
// why). Returns the kept (rows, cols), row by row and each row's columns in order, and which
// rows are settled (the others need a lower floor).
static std::tuple<at::Tensor, at::Tensor, at::Tensor> nucleus(const at::Tensor& logits_in, double p, double cut,
                                                              double floor) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.device().is_cpu(),
              "nucleus: logits must be (rows, vocabulary), on the CPU");
  TORCH_CHECK(floor > 0.0, "nucleus: floor must be > 0");
  const at::Tensor x = logits_in.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  std::vector<std::vector<int64_t>> kept(B);
  at::Tensor settled = at::zeros({B}, at::kBool);
  bool* sp = settled.data_ptr<bool>();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cols, order;
    std::vector<float> probs;
    for (int64_t b = b0; b < b1; ++b) {
      cols.clear(), probs.clear();
      likely_columns_best(xp + b * V, V, static_cast<float>(floor), cols, probs);
      double mass = 0.0;
      for (float q : probs) mass += q;
      if (cols.empty() || mass < p) continue;
      order.resize(cols.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
      std::sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {  // most likely first
        return probs[i] > probs[j] || (probs[i] == probs[j] && cols[i] < cols[j]);
      });
      double before = 0.0;
      for (int64_t i : order) {
        if (before >= cut) break;
        kept[b].push_back(cols[i]);
        before += probs[i];
      }
      std::sort(kept[b].begin(), kept[b].end());
      sp[b] = true;
    }
  });
  int64_t n = 0;
  for (const auto& c : kept) n += static_cast<int64_t>(c.size());
  at::Tensor rows_t = at::empty({n}, at::kLong), cols_t = at::empty({n}, at::kLong);
  int64_t *rp = rows_t.data_ptr<int64_t>(), *cp = cols_t.data_ptr<int64_t>();
  for (int64_t b = 0, o = 0; b < B; ++b)
    for (int64_t c : kept[b]) rp[o] = b, cp[o] = c, ++o;
  return {rows_t, cols_t, settled};
}

// One token per row, drawn among that row's live tokens (rows, cols: by row, columns in order,
// as nucleus gives them) by inverse CDF with the row's uniform number u[b] in [0, 1): the
// softmax of those logits summed in column order (in double), and the first token whose
// running sum exceeds u times the total. A row without a finite logit among its tokens gets -1.
static at::Tensor draw_among(const at::Tensor& logits_in, const at::Tensor& rows_in, const at::Tensor& cols_in,
                             const at::Tensor& u_in) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.device().is_cpu(),
              "draw_among: logits must be (rows, vocabulary), on the CPU");
  const at::Tensor x = logits_in.to(at::kFloat).contiguous(), rows = rows_in.to(at::kLong).contiguous(),
                   cols = cols_in.to(at::kLong).contiguous(), u = u_in.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), V = x.size(1), n = rows.numel();
  TORCH_CHECK(cols.numel() == n && u.numel() == B, "draw_among: one column per row index, one number per row");
  const int64_t *rp = rows.data_ptr<int64_t>(), *cp = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < B && cp[i] >= 0 && cp[i] < V && (i == 0 || rp[i] >= rp[i - 1]),
                "draw_among: rows must be sorted and every (row, column) inside the logits");
  at::Tensor out = at::full({B}, -1, at::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  const float *xp = x.data_ptr<float>(), *up = u.data_ptr<float>();
  std::vector<double> cdf;
  for (int64_t i = 0; i < n;) {
    int64_t e = i;
    while (e < n && rp[e] == rp[i]) ++e;
    const float* row = xp + rp[i] * V;
    float mx = -INFINITY;
    for (int64_t k = i; k < e; ++k) mx = std::max(mx, row[cp[k]]);
    if (std::isfinite(mx)) {
      cdf.resize(e - i);  // summed in double: a flat row keeps hundreds of thousands of tokens
      double total = 0.0;
      for (int64_t k = i; k < e; ++k) total += (cdf[k - i] = std::exp(row[cp[k]] - mx));
      double run = 0.0;
      for (auto& c : cdf) c = (run += c / total);
      const double target = up[rp[i]] * cdf.back();
      const int64_t t = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
      op[rp[i]] = cp[i + std::min<int64_t>(t, e - i - 1)];
    }
    i = e;
  }
  return out;
}

static int64_t kernel_path() { return g_path; }

// Tests compare the paths: a path the CPU lacks falls back to the best one it has.
static int64_t set_kernel_path(int64_t path) {
  TORCH_CHECK(path >= REFERENCE && path <= VNNI, "set_kernel_path: 0 (reference), 1 (AVX2) or 2 (AVX-512 VNNI)");
  g_path = path <= g_best ? path : g_best;
  return g_path;
}

}  // namespace llmos

TORCH_LIBRARY(llmos, m) {
  m.def("qmm(Tensor x, Tensor[] weights, int[] types) -> Tensor", &llmos::qmm);
  m.def("dequantize(Tensor w, int type, int K, Tensor? ids=None) -> Tensor", &llmos::dequantize);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &llmos::rms_norm);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor", &llmos::decode_attention);
  m.def("decode_layer(Tensor x, Tensor attn_norm, Tensor mlp_norm, Tensor? post_attn_norm, Tensor? post_mlp_norm, "
        "Tensor? q_norm, Tensor? k_norm, Tensor[] wqkv, int[] tqkv, Tensor[] wo, int[] to, Tensor[] w13, int[] t13, "
        "Tensor[] w2, int[] t2, Tensor kc, Tensor vc, Tensor pos, Tensor cos, Tensor sin, int n_head, int n_kv_head, "
        "int head_dim, int window, float eps, float scale, bool gelu, int shared=0) -> Tensor", &llmos::decode_layer);
  m.def("nucleus(Tensor logits, float p, float cut, float floor) -> (Tensor, Tensor, Tensor)", &llmos::nucleus);
  m.def("draw_among(Tensor logits, Tensor rows, Tensor cols, Tensor u) -> Tensor", &llmos::draw_among);
  m.def("kernel_path() -> int", &llmos::kernel_path);
  m.def("set_kernel_path(int path) -> int", &llmos::set_kernel_path);
}
