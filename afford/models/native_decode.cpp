// afford's native forward: a whole forward of a CPU fp32 Llama-family model (prefill, decode, verify, a
// prompt chunk) as ONE call from Python, on afford's own kernels: a tiled matrix-vector product, RMSNorm,
// RoPE, SiLU x up, and paged attention that reads each sequence's K/V in place through its block table.
//
// Exact by construction. Every output element is computed by one routine whose order of operations
// depends only on that element's own inputs -- never on how many rows the forward feeds, which rows sit
// beside it, which thread runs it, or where a sequence's blocks lie in the pool. A token's logits are
// therefore bitwise the same whether it decodes alone, in a batch of 8, or as one row of a speculative
// verify (tests/test_native.py). Library GEMMs cannot promise that: they pick kernels and blockings by
// the number of rows. Against the Python path (torch's operators, the reference and the fallback) the
// logits agree to fp32 rounding, not bitwise.
//
// Why it is faster: no per-operator dispatch or allocation (a small model's decode step was ~50 ATen
// calls), attention without gathers or a strided pool view, elementwise work fused into the producing
// loop (bias, residual add, SiLU x up), and each weight row read once per tile of rows.
// Built on first use by torch.utils.cpp_extension (afford/models/native.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// ---- 8 floats at a time: AVX2 + FMA where the compiler targets them, else the same lanes in C++ ----
#if defined(__AVX2__) && defined(__FMA__)
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float a) { return _mm256_set1_ps(a); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vdiv(V a, V b) { return _mm256_div_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
inline V vround(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// keeps a loaded vector in a register (GCC otherwise folds the load into every FMA that uses it, which
// makes the matrix tiles load-bound)
inline void in_register(V& a) { __asm__("" : "+x"(a)); }
inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
inline V vpow2i(V n) {                                    // 2^n for integral n in [-126, 127]
  __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(i, 23));
}
#else
struct V { float l[8]; };
#define AFFORD_LANES(expr) V r; for (int i = 0; i < 8; ++i) r.l[i] = (expr); return r
inline V vzero() { AFFORD_LANES(0.f); }
inline V vset(float a) { AFFORD_LANES(a); }
inline V vload(const float* p) { AFFORD_LANES(p[i]); }
inline void vstore(float* p, V a) { for (int i = 0; i < 8; ++i) p[i] = a.l[i]; }
inline V vfma(V a, V b, V c) { AFFORD_LANES(std::fma(a.l[i], b.l[i], c.l[i])); }
inline V vadd(V a, V b) { AFFORD_LANES(a.l[i] + b.l[i]); }
inline V vsub(V a, V b) { AFFORD_LANES(a.l[i] - b.l[i]); }
inline V vmul(V a, V b) { AFFORD_LANES(a.l[i] * b.l[i]); }
inline V vdiv(V a, V b) { AFFORD_LANES(a.l[i] / b.l[i]); }
inline V vmax(V a, V b) { AFFORD_LANES(a.l[i] > b.l[i] ? a.l[i] : b.l[i]); }
inline V vmin(V a, V b) { AFFORD_LANES(a.l[i] < b.l[i] ? a.l[i] : b.l[i]); }
inline V vround(V a) { AFFORD_LANES(std::nearbyint(a.l[i])); }
inline V vpow2i(V n) { AFFORD_LANES(std::ldexp(1.f, static_cast<int>(n.l[i]))); }
inline void in_register(V&) {}
inline void prefetch(const float* p) { __builtin_prefetch(p); }
#undef AFFORD_LANES
#endif

inline float hsum(V a) {
  float t[8];
  vstore(t, a);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// e^x, 8 lanes (Cephes' range reduction and degree-5 polynomial, ~2 ulp); x clamped to [-87, 88]
inline V vexp(V x) {
  x = vmax(vset(-87.f), x);
  x = vmin(vset(88.f), x);
  V n = vround(vmul(x, vset(1.44269504088896341f)));
  V r = vsub(vsub(x, vmul(n, vset(0.693359375f))), vmul(n, vset(-2.12194440e-4f)));
  V p = vset(1.9875691500E-4f);
  p = vfma(p, r, vset(1.3981999507E-3f));
  p = vfma(p, r, vset(8.3334519073E-3f));
  p = vfma(p, r, vset(4.1665795894E-2f));
  p = vfma(p, r, vset(1.6666665459E-1f));
  p = vfma(p, r, vset(5.0000001201E-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return vmul(p, vpow2i(n));
}

// w . x over n floats in a fixed order: four 8-lane accumulators over 32-float steps, then 8-float steps
// into the first, the accumulators summed pairwise, the lanes pairwise, then the scalar tail
inline float dot(const float* w, const float* x, int64_t n) {
  V a[4] = {vzero(), vzero(), vzero(), vzero()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int c = 0; c < 4; ++c) a[c] = vfma(vload(w + i + 8 * c), vload(x + i + 8 * c), a[c]);
  for (; i + 8 <= n; i += 8) a[0] = vfma(vload(w + i), vload(x + i), a[0]);
  float s = hsum(vadd(vadd(a[0], a[1]), vadd(a[2], a[3])));
  for (; i < n; ++i) s = std::fma(w[i], x[i], s);
  return s;
}

// q . k[j] for 8 rows k[0..7] of n floats: one 8-lane FMA chain per row over the 8-float steps, the
// lanes summed pairwise (the same tree for every lane of the result), then the scalar tail. Score j's
// order depends only on q and k[j], never on the other seven rows (a missing row can be any readable
// row; its score is ignored).
inline void scores8(const float* q, const float* const* k, int64_t n, float* out) {
  V a[8];
  for (int j = 0; j < 8; ++j) a[j] = vzero();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    V qv = vload(q + i);
    in_register(qv);
    for (int j = 0; j < 8; ++j) a[j] = vfma(qv, vload(k[j] + i), a[j]);
  }
#if defined(__AVX2__) && defined(__FMA__)
  // lane j of the result: ((a_j[0] + a_j[1]) + (a_j[2] + a_j[3])) + ((a_j[4] + a_j[5]) + (a_j[6] + a_j[7]))
  const V h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const V h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const V h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  // h0123 = [s0lo s1lo s2lo s3lo | s0hi s1hi s2hi s3hi], h4567 likewise for rows 4..7
  const V lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
  vstore(out, vadd(lo, hi));
#else
  for (int j = 0; j < 8; ++j) {
    const float* t = a[j].l;
    out[j] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
#endif
  for (int j = 0; j < 8; ++j)
    for (int64_t d = i; d < n; ++d) out[j] = std::fma(q[d], k[j][d], out[j]);
}

// ---- the matrix product: y (N, out) = x (N, in) W^T, W stored as panels of 16 output columns ----
// panels (P, in, 16): panel p holds columns 16p..16p+15 of W^T, so a panel streams contiguously. Every
// output is ONE chain of fused multiply-adds over k = 0..in-1, whatever tile computes it: the tiles below
// differ only in how many chains they run side by side (rows x columns), never in any chain's order.
constexpr int64_t CW = 16;

at::Tensor pack_panels(const at::Tensor& w) {                         // (out, in) -> (ceil(out/16), in, 16)
  const int64_t out = w.size(0), np = (out + CW - 1) / CW;
  at::Tensor padded = at::zeros({np * CW, w.size(1)}, w.options());
  padded.slice(0, 0, out).copy_(w);
  return padded.view({np, CW, w.size(1)}).transpose(1, 2).contiguous();
}

// Each k step reads one 64-byte line of each of the NP panels. The hardware prefetcher alone leaves the
// tiles waiting on memory, most of all the multi-row ones (one line per 5 rows x 2 FMAs), so a tile asks
// for the line PREFETCH_LINES / NP steps ahead: about 8 KiB in flight whatever the tile (measured: 0.5-4
// KiB were slower, 12 KiB no faster; the target's 5-row verify products now cost 1.1-1.4x one row's
// instead of 1.65-2x; BENCHMARKS.md, issue #12). A prefetch past the end of the matrix is a hint, never a
// fault.
constexpr int64_t PREFETCH_LINES = 128;

// Weights as stored: fp32, or bf16 (the upper half of an fp32; widening it is exact). A model whose
// weights are all bf16 values -- the bundled ones are stored in bf16 -- keeps its panels in bf16: half
// the bytes to stream per forward, and every product is the same fp32 FMA chain over the same values, so
// the logits are bitwise those of the fp32 panels (tests/test_native.py).
using bf16 = uint16_t;
inline V wload(const float* p) { return vload(p); }
#if defined(__AVX2__) && defined(__FMA__)
inline V wload(const bf16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#else
inline V wload(const bf16* p) {
  V r;
  for (int i = 0; i < 8; ++i) {
    const uint32_t b = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&r.l[i], &b, 4);
  }
  return r;
}
#endif

// RT rows x NP panels of chains; results into acc (RT, NP * 16)
template <int RT, int NP, typename W>
inline void tile(const float* const* x, int64_t in, const W* panel, int64_t pstride, float* acc) {
  V a[RT][2 * NP];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < 2 * NP; ++c) a[r][c] = vzero();
  for (int64_t k = 0; k < in; ++k) {
    // the same bytes ahead whatever the weight type (a bf16 panel line is half as long)
    if (sizeof(W) == 4 || k % 2 == 0)
      for (int p = 0; p < NP; ++p)
        prefetch(reinterpret_cast<const float*>(panel + p * pstride + (k + PREFETCH_LINES * 4 / sizeof(W) / NP) * CW));
    if constexpr (NP == 1) {                 // two named registers: an array would be kept on the stack too
      V w0 = wload(panel + k * CW), w1 = wload(panel + k * CW + 8);
      in_register(w0);
      in_register(w1);
      for (int r = 0; r < RT; ++r) {
        const V xb = vset(x[r][k]);
        a[r][0] = vfma(xb, w0, a[r][0]);
        a[r][1] = vfma(xb, w1, a[r][1]);
      }
    } else {
      V w[2 * NP];
      for (int p = 0; p < NP; ++p) {
        w[2 * p] = wload(panel + p * pstride + k * CW);
        w[2 * p + 1] = wload(panel + p * pstride + k * CW + 8);
        in_register(w[2 * p]);
        in_register(w[2 * p + 1]);
      }
      for (int r = 0; r < RT; ++r) {
        const V xb = vset(x[r][k]);
        for (int c = 0; c < 2 * NP; ++c) a[r][c] = vfma(xb, w[c], a[r][c]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < 2 * NP; ++c) vstore(acc + r * NP * CW + c * 8, a[r][c]);
}

// y = x W^T (+ bias) (+ y when accumulate: the residual add). Threads split the panels; each thread takes
// its panels in chunks that stay in L2 and runs every row tile over a chunk, so W streams from memory
// once per forward and each x tile stays in L1.
template <typename W>
void linear(const float* x, int64_t N, int64_t in, const W* P, int64_t out, const float* bias, float* y,
            bool accumulate) {
  const int64_t np = (out + CW - 1) / CW, pstride = in * CW, bytes = pstride * static_cast<int64_t>(sizeof(W));
  const int64_t chunk = std::max<int64_t>(4, (256 << 10) / bytes);      // panels per L2 chunk
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / bytes);       // >= 64 KiB of W per task
  at::parallel_for(0, np, grain, [&](int64_t p0, int64_t p1) {
    float acc[6 * 4 * CW];
    for (int64_t c0 = p0; c0 < p1; c0 += chunk) {
      const int64_t c1 = std::min(p1, c0 + chunk);
      for (int64_t r0 = 0; r0 < N; r0 += 6) {
        const int64_t R = std::min<int64_t>(6, N - r0);
        const float* xs[6];
        for (int64_t r = 0; r < 6; ++r) xs[r] = x + std::min(r0 + r, N - 1) * in;
        for (int64_t p = c0; p < c1;) {
          const W* pan = P + p * pstride;
          int64_t n = 1;
          if (R == 1 && p + 4 <= c1) { tile<1, 4>(xs, in, pan, pstride, acc); n = 4; }
          else if (R == 2 && p + 2 <= c1) { tile<2, 2>(xs, in, pan, pstride, acc); n = 2; }
          else switch (R) {
            case 1: tile<1, 1>(xs, in, pan, pstride, acc); break;
            case 2: tile<2, 1>(xs, in, pan, pstride, acc); break;
            case 3: tile<3, 1>(xs, in, pan, pstride, acc); break;
            case 4: tile<4, 1>(xs, in, pan, pstride, acc); break;
            case 5: tile<5, 1>(xs, in, pan, pstride, acc); break;
            default: tile<6, 1>(xs, in, pan, pstride, acc); break;
          }
          const int64_t j0 = p * CW, j1 = std::min(out, (p + n) * CW);
          for (int64_t r = 0; r < R; ++r)
            for (int64_t j = j0; j < j1; ++j) {
              const float v = acc[r * n * CW + (j - j0)] + (bias ? bias[j] : 0.f);
              float& dst = y[(r0 + r) * out + j];
              dst = accumulate ? dst + v : v;
            }
          p += n;
        }
      }
    }
  });
}

// h = x / sqrt(mean(x^2) + eps) * w, per row
void rms_norm(const float* x, int64_t N, int64_t n, const float* w, double eps, float* h) {
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * n;
    const float ss = dot(xr, xr, n);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) h[r * n + i] = (xr[i] * inv) * w[i];
  }
}

// a (N, I) = silu(gu[:, :I]) * gu[:, I:]
void silu_mul(const float* gu, int64_t N, int64_t I, float* a) {
  for (int64_t r = 0; r < N; ++r) {
    const float* g = gu + r * 2 * I;
    const float* u = g + I;
    float* o = a + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const V gv = vload(g + i);
      vstore(o + i, vmul(vdiv(gv, vadd(vset(1.f), vexp(vsub(vzero(), gv)))), vload(u + i)));
    }
    for (; i < I; ++i) {
      float e[8] = {-g[i]};
      vstore(e, vexp(vload(e)));
      o[i] = g[i] / (1.f + e[0]) * u[i];
    }
  }
}

// RoPE (HF's rotate-half) in place on the first `heads` heads of each row of qkv (N, stride)
void rope(float* qkv, int64_t N, int64_t stride, int64_t heads, int64_t D, const float* cos, const float* sin,
          const int64_t* pos) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < N; ++r) {
    const float* c = cos + pos[r] * D;
    const float* s = sin + pos[r] * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = qkv + r * stride + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// the index of the largest value (the first of equal ones; a NaN counts as largest, as torch.argmax)
int64_t argmax(const float* x, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  if (n >= 8) {                          // the maximum 8 lanes at a time, then its first index; NaNs: below
    V m = vload(x), nan = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
    int64_t i = 8;
    for (; i + 8 <= n; i += 8) {
      const V v = vload(x + i);
      m = vmax(m, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float t[8], top;
    vstore(t, m);
    top = *std::max_element(t, t + 8);
    bool any_nan = _mm256_movemask_ps(nan) != 0;
    for (; i < n; ++i) any_nan |= std::isnan(x[i]), top = std::max(top, x[i]);
    if (!any_nan) {
      const V tv = vset(top);
      for (i = 0; i + 8 <= n; i += 8)
        if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(vload(x + i), tv, _CMP_EQ_OQ)))
          return i + __builtin_ctz(hit);
      for (; i < n; ++i)
        if (x[i] == top) return i;
    }
  }
#endif
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (!std::isnan(x[best]) && (x[i] > x[best] || std::isnan(x[i]))) best = i;
  return best;
}

// logits.argmax(-1).tolist() for (R, V) fp32 logits, without torch's reduction machinery (~50 us for
// 5 x 4096 on this CPU, a tenth of a speculative step's Python)
std::vector<int64_t> argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0 && logits.device().is_cpu(),
              "argmax_rows: (R, V) float32 CPU logits with V > 0");
  const at::Tensor x = logits.contiguous();
  std::vector<int64_t> out(x.size(0));
  for (int64_t r = 0; r < x.size(0); ++r) out[r] = argmax(x.data_ptr<float>() + r * x.size(1), x.size(1));
  return out;
}

// softmax(x)[arg] where x[arg] is the maximum: 1 / sum_v exp(x_v - x_arg) (the exit test of a sorted draft)
float top_prob(const float* x, int64_t n, int64_t arg) {
  const float m = x[arg];
  V acc = vzero();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = vadd(acc, vexp(vsub(vload(x + i), vset(m))));
  float sum = hsum(acc);
  for (; i < n; ++i) sum += std::exp(x[i] - m);
  return 1.f / sum;
}

// Wall time per kind of work inside the forward, when switched on (benchmarks/decode_profile.py)
enum Part { MATMUL, ATTENTION, ELEMENTWISE, HEAD, NPARTS };
struct Profile {
  bool on = false;
  std::array<double, NPARTS> seconds{};
  int64_t forwards = 0;
};
struct Timed {                    // adds the scope's wall time to one part of the profile
  Profile& p;
  Part part;
  std::chrono::steady_clock::time_point t0;
  bool on;
  Timed(Profile& p_, Part part_) : p(p_), part(part_), on(p_.on) { if (on) t0 = std::chrono::steady_clock::now(); }
  ~Timed() {
    if (on) p.seconds[part] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

struct Linear {
  at::Tensor panels, bias;   // pack_panels(W) in fp32 or bf16; bias (out,) fp32 or undefined
  int64_t out_ = 0;
  int64_t out() const { return out_; }
  int64_t in() const { return panels.size(1); }
  void operator()(const float* x, int64_t N, float* y, bool accumulate = false) const {
    const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
    if (panels.scalar_type() == at::kBFloat16)
      linear(x, N, in(), reinterpret_cast<const bf16*>(panels.data_ptr<at::BFloat16>()), out_, b, y, accumulate);
    else
      linear(x, N, in(), panels.data_ptr<float>(), out_, b, y, accumulate);
  }
};

struct Layer {
  at::Tensor norm1, norm2;
  Linear qkv, o, gate_up, down;
  at::Tensor k_pool, v_pool;   // (slots, KV, D)
};

class NativeDecoder {
 public:
  NativeDecoder(at::Tensor embed, at::Tensor rope_cos, at::Tensor rope_sin, at::Tensor final_norm,
                std::vector<at::Tensor> head, std::vector<std::vector<at::Tensor>> layers, int64_t heads,
                int64_t kv_heads, int64_t head_dim, double eps, int64_t block_size)
      : embed_(std::move(embed)), cos_(std::move(rope_cos)), sin_(std::move(rope_sin)),
        final_norm_(std::move(final_norm)), H_(heads), KV_(kv_heads), D_(head_dim), eps_(eps), bs_(block_size) {
    head_ = linear_of(head, 0);
    for (auto& t : layers) {
      // norm1, norm2, (weight, bias) for each of qkv, o, gate_up, down, then k_pool, v_pool; gate_up and down
      // empty in every layer: attention halves only (attn_half; the FFN runs elsewhere, afford/afd/)
      TORCH_CHECK(t.size() == 12, "a layer is 12 tensors, got ", t.size());
      const bool has_ffn = t[6].numel() > 0;
      TORCH_CHECK(layers_.empty() || has_ffn == ffn_, "native forward: every layer has its FFN or none does");
      ffn_ = has_ffn;
      layers_.push_back(Layer{t[0], t[1], linear_of(t, 2), linear_of(t, 4), has_ffn ? linear_of(t, 6) : Linear{},
                              has_ffn ? linear_of(t, 8) : Linear{}, t[10], t[11]});
    }
    TORCH_CHECK(KV_ > 0 && H_ % KV_ == 0 && H_ / KV_ <= 64, "native forward: 1 to 64 query heads per K/V head");
    TORCH_CHECK(D_ % 2 == 0 && cos_.dim() == 2 && cos_.size(1) == D_ && sin_.sizes() == cos_.sizes(),
                "native forward: RoPE tables (positions, head_dim) with an even head_dim");
    TORCH_CHECK(!layers_.empty(), "native forward: a model with no layers");
    slots_ = layers_[0].k_pool.size(0);
    const int64_t hidden = embed_.size(1);
    for (const Layer& L : layers_) {
      TORCH_CHECK(L.qkv.out() == (H_ + 2 * KV_) * D_ && L.qkv.in() == hidden && L.o.in() == H_ * D_ &&
                  L.o.out() == hidden && (!ffn_ || (L.gate_up.in() == hidden && L.gate_up.out() == 2 * layers_[0].down.in() &&
                  L.down.out() == hidden)), "native forward: a layer's weight shapes do not fit the config");
      for (const at::Tensor* pool : {&L.k_pool, &L.v_pool})
        TORCH_CHECK(pool->scalar_type() == at::kFloat && pool->is_contiguous() && pool->dim() == 3 &&
                    pool->size(0) == slots_ && pool->size(1) == KV_ && pool->size(2) == D_ && slots_ % bs_ == 0,
                    "native forward: K/V pools (slots, kv_heads, head_dim), fp32, contiguous, whole blocks");
      for (const Linear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down})
        TORCH_CHECK(!lin->bias.defined() || lin->bias.numel() == lin->out(), "native forward: a bias of the wrong size");
    }
    TORCH_CHECK(head_.in() == hidden && final_norm_.numel() == hidden, "native forward: LM head / final norm shapes");
    for (const auto* t : {&embed_, &cos_, &sin_, &final_norm_})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, "native forward: fp32 contiguous tensors");
  }

  // One forward over N flattened tokens (ids, positions, slots: (N,) long): sequence i feeds q_lens[i]
  // tokens and its block table is tables[i]; each token attends to its sequence's positions 0..its own
  // (the K/V of every fed token is written to its slot first). rows: the flat token indices that need
  // logits (empty: all). Returns logits (R, V) float32.
  at::Tensor step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                  const std::vector<int64_t>& q_lens, const std::vector<std::vector<int64_t>>& tables,
                  const at::Tensor& rows) {
    c10::InferenceMode guard;
    const int64_t N = ids.numel();
    const std::vector<const int64_t*> tok_table = token_tables(ids, positions, slots, q_lens, tables, rows);
    std::vector<int64_t> sel(rows.data_ptr<int64_t>(), rows.data_ptr<int64_t>() + rows.numel());
    if (sel.empty())
      for (int64_t r = 0; r < N; ++r) sel.push_back(r);
    at::Tensor logits = at::empty({static_cast<int64_t>(sel.size()), head_.out()}, at::kFloat);
    forward(ids.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), N, tok_table, sel,
            logits.data_ptr<float>());
    return logits;
  }

  // A multi-exit model's partial forward (S2D): layers [lo, hi) over the N tokens a ForwardBatch describes,
  // their residual stream entering as x (N, hidden) -- or, with lo == 0, embedded from ids. Returns the
  // residual stream after layer hi - 1 (N, hidden) and the logits (R, V) of the flat rows `rows` through
  // the final norm and head (R = 0: none). A token's values are those of the whole forward's.
  std::vector<at::Tensor> segment(const at::Tensor& ids, const at::Tensor& x_in, const at::Tensor& positions,
                                  const at::Tensor& slots, const std::vector<int64_t>& q_lens,
                                  const std::vector<std::vector<int64_t>>& tables, int64_t lo, int64_t hi,
                                  const at::Tensor& rows) {
    c10::InferenceMode guard;
    const int64_t N = ids.numel(), hidden = embed_.size(1), L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(0 <= lo && lo <= hi && hi <= L, "segment: layers [", lo, ", ", hi, ") of ", L);
    const std::vector<const int64_t*> tok_table = token_tables(ids, positions, slots, q_lens, tables, rows);
    at::Tensor x = at::empty({N, hidden}, at::kFloat);
    if (lo == 0) {
      embed(ids.data_ptr<int64_t>(), N, x.data_ptr<float>());
    } else {
      TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(0) == N && x_in.size(1) == hidden,
                  "segment: x is the (N, hidden) fp32 residual stream of the fed tokens");
      x.copy_(x_in);
    }
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r)
      TORCH_CHECK(pos[r] < cos_.size(0) && slot[r] >= 0 && slot[r] < slots_, "segment: position ", pos[r], " / slot ", slot[r],
                  " outside the RoPE table / K/V pool");
    run_layers(x.data_ptr<float>(), N, pos, slot, tok_table, lo, hi);
    std::vector<int64_t> sel(rows.data_ptr<int64_t>(), rows.data_ptr<int64_t>() + rows.numel());
    at::Tensor logits = at::empty({static_cast<int64_t>(sel.size()), head_.out()}, at::kFloat);
    if (!sel.empty()) head(x.data_ptr<float>(), N, sel, logits.data_ptr<float>());
    return {x, logits};
  }

  // A greedy draft of ks[i] tokens per sequence in one call: forward 0 is `step` (sequence i feeds
  // q_lens[i] tokens, the last at position p_i) and gives each sequence its first token (the argmax); then
  // forward j feeds sequence i's token j - 1 at position p_i + j (slot from its table, whose blocks the
  // caller allocated), while j < ks[i]. Returns the drafted tokens per sequence.
  std::vector<std::vector<int64_t>> draft_greedy(const at::Tensor& ids, const at::Tensor& positions,
                                                 const at::Tensor& slots, const std::vector<int64_t>& q_lens,
                                                 const std::vector<std::vector<int64_t>>& tables,
                                                 const std::vector<int64_t>& ks) {
    c10::InferenceMode guard;
    const int64_t B = static_cast<int64_t>(q_lens.size()), V = head_.out();
    TORCH_CHECK(static_cast<int64_t>(ks.size()) == B, "draft_greedy: one k per sequence");
    for (int64_t q : q_lens) TORCH_CHECK(q >= 1, "draft_greedy: every sequence feeds at least one token");
    std::vector<int64_t> last(B);                                  // flat index of each sequence's last token
    int64_t at_ = 0;
    for (int64_t i = 0; i < B; ++i) last[i] = (at_ += q_lens[i]) - 1;
    at::Tensor first = step(ids, positions, slots, q_lens, tables, at::tensor(last));
    std::vector<std::vector<int64_t>> out(B);
    std::vector<int64_t> id, pos, slot, base(B);
    const int64_t* p0 = positions.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      base[i] = p0[last[i]];
      if (ks[i] > 0) out[i].push_back(argmax(first.data_ptr<float>() + i * V, V));
    }
    std::vector<float> logits;
    std::vector<const int64_t*> tok_table;
    std::vector<int64_t> who, sel;
    for (int64_t j = 1;; ++j) {
      id.clear(), pos.clear(), slot.clear(), tok_table.clear(), who.clear(), sel.clear();
      for (int64_t i = 0; i < B; ++i) {
        if (ks[i] <= j) continue;
        const int64_t p = base[i] + j;
        TORCH_CHECK(p / bs_ < static_cast<int64_t>(tables[i].size()), "draft_greedy: position ", p,
                    " has no block (allocate the blocks of all k forwards first)");
        id.push_back(out[i].back()), pos.push_back(p), slot.push_back(tables[i][p / bs_] * bs_ + p % bs_);
        tok_table.push_back(tables[i].data()), who.push_back(i), sel.push_back(static_cast<int64_t>(sel.size()));
      }
      if (who.empty()) break;
      const int64_t n = static_cast<int64_t>(who.size());
      logits.resize(n * V);
      forward(id.data(), pos.data(), slot.data(), n, tok_table, sel, logits.data());
      for (int64_t r = 0; r < n; ++r) out[who[r]].push_back(argmax(&logits[r * V], V));
    }
    return out;
  }

  // S2D: greedy drafts of ks[i] tokens per sequence from a multi-exit model whose segment s is layers
  // bounds[s]..bounds[s + 1] - 1 (the final norm and head shared by every exit). Round 0 feeds the tokens
  // the batch describes (sequence i's q_lens[i] tokens from position fills[i][0]), round j its draft j - 1.
  // A token stops at the first segment s < S - 1 whose top probability exceeds thresholds[s], at `fixed`
  // (>= 0), or at the last (probe: always at the last). Before segment s + 1 runs for a token, the
  // positions of its sequence not yet through it (fills[i][s + 1]..) go with it, entering from `resid`
  // (slots, hidden): each position's residual stream after the deepest segment it went through, at its
  // slot. Returns the drafts, each draft's exit, the updated fills and (probe) per draft and segment it
  // reached the argmax and the top probability.
  std::tuple<std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>,
             std::vector<std::vector<float>>>
  draft_exits(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
              const std::vector<int64_t>& q_lens, const std::vector<std::vector<int64_t>>& tables,
              const std::vector<int64_t>& ks, std::vector<std::vector<int64_t>> fills,
              const std::vector<int64_t>& bounds, const std::vector<double>& thresholds, int64_t fixed, bool probe,
              at::Tensor resid) {
    c10::InferenceMode guard;
    const int64_t B = static_cast<int64_t>(q_lens.size()), S = static_cast<int64_t>(bounds.size()) - 1;
    const int64_t V = head_.out(), hidden = embed_.size(1), L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(S >= 1 && bounds[0] == 0 && bounds[S] == L, "draft_exits: bounds from 0 to the ", L, " layers");
    for (int64_t s = 0; s < S; ++s) TORCH_CHECK(bounds[s] < bounds[s + 1], "draft_exits: increasing bounds");
    TORCH_CHECK(static_cast<int64_t>(ks.size()) == B && static_cast<int64_t>(fills.size()) == B,
                "draft_exits: one k and one fill vector per sequence");
    TORCH_CHECK(static_cast<int64_t>(thresholds.size()) == S - 1 && fixed < S, "draft_exits: S - 1 thresholds");
    TORCH_CHECK(resid.scalar_type() == at::kFloat && resid.is_contiguous() && resid.dim() == 2 &&
                resid.size(0) == slots_ && resid.size(1) == hidden, "draft_exits: resid is (slots, hidden) fp32");
    for (int64_t i = 0; i < B; ++i) {
      TORCH_CHECK(ks[i] >= 1 && q_lens[i] >= 1 && static_cast<int64_t>(fills[i].size()) == S,
                  "draft_exits: every sequence feeds a token, drafts one, and has S fills");
      for (int64_t s = 1; s < S; ++s) TORCH_CHECK(fills[i][s] <= fills[i][s - 1], "draft_exits: fills not sorted");
    }
    const std::vector<const int64_t*> tt0 = token_tables(ids, positions, slots, q_lens, tables, at::empty({0}, at::kLong));
    float* R = resid.data_ptr<float>();
    const int64_t max_pos = cos_.size(0);
    std::vector<std::vector<int64_t>> out(B), ex(B);
    std::vector<std::vector<float>> info(B);
    std::vector<int64_t> p(B);                                  // the position each sequence predicts from
    std::vector<int64_t> id, pos, slot, who, sel;
    std::vector<const int64_t*> tt;
    std::vector<float> x, logits;
    auto slot_of = [&](int64_t i, int64_t q) {
      TORCH_CHECK(q >= 0 && q < max_pos && q / bs_ < static_cast<int64_t>(tables[i].size()), "draft_exits: position ",
                  q, " has no block (allocate the blocks of all k forwards first)");
      return tables[i][q / bs_] * bs_ + q % bs_;
    };
    for (int64_t j = 0;; ++j) {
      id.clear(), pos.clear(), slot.clear(), tt.clear(), who.clear(), sel.clear();
      if (j == 0) {
        const int64_t N = ids.numel();
        id.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + N);
        pos.assign(positions.data_ptr<int64_t>(), positions.data_ptr<int64_t>() + N);
        slot.assign(slots.data_ptr<int64_t>(), slots.data_ptr<int64_t>() + N);
        tt = tt0;
        for (int64_t i = 0, at_ = 0; i < B; ++i) {
          at_ += q_lens[i];
          who.push_back(i), sel.push_back(at_ - 1), p[i] = pos[at_ - 1];
          TORCH_CHECK(pos[at_ - q_lens[i]] == fills[i][0], "draft_exits: sequence ", i, " feeds from position ",
                      pos[at_ - q_lens[i]], " but its first layers hold ", fills[i][0]);
        }
      } else {
        for (int64_t i = 0; i < B; ++i) {
          if (ks[i] <= j) continue;
          p[i] += 1;
          id.push_back(out[i].back()), pos.push_back(p[i]), slot.push_back(slot_of(i, p[i]));
          tt.push_back(tables[i].data()), who.push_back(i), sel.push_back(static_cast<int64_t>(sel.size()));
        }
      }
      if (who.empty()) break;
      int64_t N = static_cast<int64_t>(id.size());
      for (int64_t r = 0; r < N; ++r)
        TORCH_CHECK(pos[r] < max_pos && slot[r] >= 0 && slot[r] < slots_, "draft_exits: position / slot out of range");
      x.resize(N * hidden);
      embed(id.data(), N, x.data());
      for (int64_t s = 0;; ++s) {
        run_layers(x.data(), N, pos.data(), slot.data(), tt, bounds[s], bounds[s + 1]);
        if (s < S - 1)                                          // the stream after segment s, at each slot
          for (int64_t r = 0; r < N; ++r) std::memcpy(R + slot[r] * hidden, &x[r * hidden], hidden * sizeof(float));
        for (int64_t i : who) fills[i][s] = p[i] + 1;
        const int64_t b = static_cast<int64_t>(who.size());
        // no head where no token can stop: before a fixed exit, or at a threshold of 1 (never cleared)
        const bool decide = probe || s == S - 1 || s == fixed || (fixed < 0 && thresholds[s] < 1.0);
        if (decide) {
          logits.resize(b * V);
          head(x.data(), N, sel, logits.data());
        }
        std::vector<int64_t> next;
        for (int64_t r = 0; r < b && !decide; ++r) next.push_back(who[r]);
        for (int64_t r = 0; r < b && decide; ++r) {
          const int64_t i = who[r];
          const float* l = &logits[r * V];
          const int64_t top = argmax(l, V);
          const bool last = s == S - 1 || s == fixed;
          float conf = 0.f;
          if (probe || (!last && fixed < 0)) conf = top_prob(l, V, top);
          if (probe) {
            if (s == 0) info[i].resize((out[i].size() + 1) * S * 2, -1.f);
            info[i][out[i].size() * S * 2 + s * 2] = static_cast<float>(top);
            info[i][out[i].size() * S * 2 + s * 2 + 1] = conf;
          }
          if (last || (!probe && fixed < 0 && conf > thresholds[s])) {
            out[i].push_back(top), ex[i].push_back(s);
          } else {
            next.push_back(i);
          }
        }
        if (next.empty()) break;
        // segment s + 1 for the sequences going on: their positions not through it yet, from their residuals
        id.clear(), pos.clear(), slot.clear(), tt.clear(), sel.clear();
        for (int64_t i : next) {
          for (int64_t q = fills[i][s + 1]; q <= p[i]; ++q) pos.push_back(q), slot.push_back(slot_of(i, q)), tt.push_back(tables[i].data());
          sel.push_back(static_cast<int64_t>(pos.size()) - 1);
        }
        who = next;
        N = static_cast<int64_t>(pos.size());
        x.resize(N * hidden);
        for (int64_t r = 0; r < N; ++r) std::memcpy(&x[r * hidden], R + slot[r] * hidden, hidden * sizeof(float));
      }
    }
    return {out, ex, fills, info};
  }

 private:
  void check_table(const std::vector<int64_t>& table) const {
    for (int64_t b : table)
      TORCH_CHECK(b >= 0 && b < slots_ / bs_, "native forward: block ", b, " outside the K/V pool");
  }

  // ids, positions, slots (N,), the per-sequence query lengths and tables checked; each token's block table
  std::vector<const int64_t*> token_tables(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& slots,
                                           const std::vector<int64_t>& q_lens,
                                           const std::vector<std::vector<int64_t>>& tables, const at::Tensor& rows) const {
    const int64_t N = ids.numel();
    for (const at::Tensor* x : {&ids, &positions, &slots, &rows})
      TORCH_CHECK(x->scalar_type() == at::kLong && x->is_contiguous() && x->dim() == 1,
                  "native forward: ids, positions, slots and rows are contiguous 1-D long tensors");
    TORCH_CHECK(positions.numel() == N && slots.numel() == N, "native forward: ", N, " ids but ",
                positions.numel(), " positions and ", slots.numel(), " slots");
    TORCH_CHECK(tables.size() == q_lens.size(), "native forward: one block table per sequence");
    TORCH_CHECK(std::accumulate(q_lens.begin(), q_lens.end(), int64_t{0}) == N,
                "native forward: the query lengths do not sum to the ", N, " tokens fed");
    std::vector<const int64_t*> tok_table(N);
    const int64_t* pos = positions.data_ptr<int64_t>();
    int64_t t = 0;
    for (size_t s = 0; s < q_lens.size(); ++s) {
      TORCH_CHECK(q_lens[s] >= 0, "native forward: a negative query length");
      check_table(tables[s]);
      for (int64_t j = 0; j < q_lens[s]; ++j, ++t) {
        TORCH_CHECK(pos[t] >= 0 && pos[t] / bs_ < static_cast<int64_t>(tables[s].size()), "native forward: position ",
                    pos[t], " of sequence ", s, " has no block in its table (allocate blocks before the forward)");
        tok_table[t] = tables[s].data();
      }
    }
    const int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows.numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < N, "native forward: logits row ", r[i], " of ", N, " tokens");
    return tok_table;
  }

  void embed(const int64_t* id, int64_t N, float* x) const {
    const int64_t hidden = embed_.size(1), vocab = embed_.size(0);
    const float* E = embed_.data_ptr<float>();
    for (int64_t r = 0; r < N; ++r) {
      TORCH_CHECK(id[r] >= 0 && id[r] < vocab, "native forward: token id ", id[r], " outside the vocabulary");
      std::memcpy(x + r * hidden, E + id[r] * hidden, hidden * sizeof(float));
    }
  }

  // the forward itself over raw inputs; logits of the flat rows `sel` into out (|sel|, V)
  void forward(const int64_t* id, const int64_t* pos, const int64_t* slot, int64_t N,
               const std::vector<const int64_t*>& tok_table, const std::vector<int64_t>& sel, float* out) {
    const int64_t hidden = embed_.size(1), max_pos = cos_.size(0);
    for (int64_t r : sel) TORCH_CHECK(r >= 0 && r < N, "native forward: logits row ", r, " of ", N, " tokens");
    for (int64_t r = 0; r < N; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < max_pos, "native forward: position ", pos[r], " beyond the RoPE table");
      TORCH_CHECK(slot[r] >= 0 && slot[r] < slots_, "native forward: slot ", slot[r], " outside the K/V pool");
    }
    std::vector<float> x(N * hidden);
    embed(id, N, x.data());
    prof_.forwards += prof_.on;
    run_layers(x.data(), N, pos, slot, tok_table, 0, static_cast<int64_t>(layers_.size()));
    head(x.data(), N, sel, out);
  }

  // layers [lo, hi) on the residual stream x (N, hidden), in place; every fed token's K/V written to its slot
  void run_layers(float* xp, int64_t N, const int64_t* pos, const int64_t* slot,
                  const std::vector<const int64_t*>& tok_table, int64_t lo, int64_t hi) {
    TORCH_CHECK(ffn_, "native forward: this decoder holds attention halves only (attn_half)");
    const int64_t hidden = embed_.size(1), qkv_w = (H_ + 2 * KV_) * D_, I = layers_.empty() ? 0 : layers_[0].down.in();
    std::vector<float> h(N * hidden), qkv(N * qkv_w), att(N * H_ * D_), gu(N * 2 * I), act(N * I);
    for (int64_t li = lo; li < hi; ++li) {
      const Layer& L = layers_[li];
      attention_half(L, xp, N, pos, slot, tok_table, h.data(), qkv.data(), att.data());
      { Timed t(prof_, MATMUL); L.gate_up(h.data(), N, gu.data()); }
      { Timed t(prof_, ELEMENTWISE); silu_mul(gu.data(), N, I, act.data()); }
      { Timed t(prof_, MATMUL); L.down(act.data(), N, xp, /*accumulate=*/true); }     // x += down(act)
    }
  }

  // x += o(attention(norm1(x))) (the K/V of the N tokens written to their slots first), then h = norm2(x):
  // what the FFN half takes. Scratch: qkv (N, (H + 2 KV) D), att (N, H D).
  void attention_half(const Layer& L, float* xp, int64_t N, const int64_t* pos, const int64_t* slot,
                      const std::vector<const int64_t*>& tok_table, float* h, float* qkv, float* att) {
    const int64_t hidden = embed_.size(1), qkv_w = (H_ + 2 * KV_) * D_;
    { Timed t(prof_, ELEMENTWISE); rms_norm(xp, N, hidden, L.norm1.data_ptr<float>(), eps_, h); }
    { Timed t(prof_, MATMUL); L.qkv(h, N, qkv); }
    float* kp = L.k_pool.data_ptr<float>();
    float* vp = L.v_pool.data_ptr<float>();
    {
      Timed t(prof_, ELEMENTWISE);
      rope(qkv, N, qkv_w, H_ + KV_, D_, cos_.data_ptr<float>(), sin_.data_ptr<float>(), pos);
      for (int64_t r = 0; r < N; ++r) {
        std::memcpy(kp + slot[r] * KV_ * D_, &qkv[r * qkv_w + H_ * D_], KV_ * D_ * sizeof(float));
        std::memcpy(vp + slot[r] * KV_ * D_, &qkv[r * qkv_w + (H_ + KV_) * D_], KV_ * D_ * sizeof(float));
      }
    }
    { Timed t(prof_, ATTENTION); attention(qkv, qkv_w, N, pos, tok_table, kp, vp, att); }
    { Timed t(prof_, MATMUL); L.o(att, N, xp, /*accumulate=*/true); }                  // x += o(att)
    { Timed t(prof_, ELEMENTWISE); rms_norm(xp, N, hidden, L.norm2.data_ptr<float>(), eps_, h); }
  }

 public:
  // Attention-FFN disaggregation (afford/afd/): layer li's attention half over the N tokens a ForwardBatch
  // describes. x (N, hidden) fp32, the residual stream entering the layer, becomes x + o(attention(norm1(x)))
  // in place; returns norm2 of it (N, hidden), what the FFN workers take. The same kernels as `step`.
  at::Tensor attn_half(at::Tensor x, const at::Tensor& positions, const at::Tensor& slots,
                       const std::vector<int64_t>& q_lens, const std::vector<std::vector<int64_t>>& tables,
                       int64_t li) {
    c10::InferenceMode guard;
    const int64_t N = positions.numel(), hidden = embed_.size(1), L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(0 <= li && li < L, "attn_half: layer ", li, " of ", L);
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(0) == N &&
                x.size(1) == hidden, "attn_half: x is the contiguous (N, hidden) fp32 CPU residual stream of the fed tokens");
    // token_tables validates positions, slots and tables (positions stand in for the ids: only N is read)
    const std::vector<const int64_t*> tok_table = token_tables(positions, positions, slots, q_lens, tables,
                                                               at::empty({0}, at::kLong));
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r)
      TORCH_CHECK(pos[r] < cos_.size(0) && slot[r] >= 0 && slot[r] < slots_, "attn_half: position ", pos[r],
                  " / slot ", slot[r], " outside the RoPE table / K/V pool");
    at::Tensor h = at::empty({N, hidden}, at::kFloat);
    std::vector<float> qkv(N * (H_ + 2 * KV_) * D_), att(N * H_ * D_);
    attention_half(layers_[li], x.data_ptr<float>(), N, pos, slot, tok_table, h.data_ptr<float>(), qkv.data(), att.data());
    return h;
  }

 private:

  // the final norm and the LM head on the rows `sel` of the residual stream x (N, hidden): out (|sel|, V)
  void head(const float* x, int64_t N, const std::vector<int64_t>& sel, float* out) {
    const int64_t hidden = embed_.size(1), R = static_cast<int64_t>(sel.size());
    for (int64_t r : sel) TORCH_CHECK(r >= 0 && r < N, "native forward: logits row ", r, " of ", N, " tokens");
    std::vector<float> h(R * hidden);
    Timed t(prof_, HEAD);
    for (int64_t r = 0; r < R; ++r) {
      rms_norm(x + sel[r] * hidden, 1, hidden, final_norm_.data_ptr<float>(), eps_, &h[r * hidden]);
    }
    head_(h.data(), R, out);
  }

 public:
  // per-part wall seconds since profiling was switched on (and the forwards counted), then reset
  std::map<std::string, double> take_profile() {
    std::map<std::string, double> out{{"matmul", prof_.seconds[MATMUL]}, {"attention", prof_.seconds[ATTENTION]},
                                      {"elementwise", prof_.seconds[ELEMENTWISE]}, {"head", prof_.seconds[HEAD]},
                                      {"forwards", static_cast<double>(prof_.forwards)}};
    prof_.seconds.fill(0.0);
    prof_.forwards = 0;
    return out;
  }
  void set_profiling(bool on) { prof_.on = on; }

 private:

  // softmax(q k^T / sqrt(D)) v per token and head, reading K/V rows through the token's block table. A
  // task is up to GROUP consecutive tokens of one sequence (a verify, a prompt chunk) and one K/V head:
  // the G query heads of each of its tokens score each 8-row block of K together (the block read once
  // for all of them). A token's scores, softmax and output are computed the same way whatever tokens
  // share its task.
  static constexpr int64_t GROUP = 8;
  void attention(const float* qkv, int64_t qkv_w, int64_t N, const int64_t* pos,
                 const std::vector<const int64_t*>& tok_table, const float* kp, const float* vp, float* out) const {
    const int64_t G = H_ / KV_, KVD = KV_ * D_;
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    std::vector<int64_t> first{0};                     // task groups: [first[i], first[i + 1])
    for (int64_t r = 1; r < N; ++r)
      if (tok_table[r] != tok_table[r - 1] || r - first.back() == GROUP) first.push_back(r);
    first.push_back(N);
    const int64_t groups = static_cast<int64_t>(first.size()) - 1;
    at::parallel_for(0, groups * KV_, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> sc, zero(D_, 0.f);
      std::vector<int64_t> row;                        // each position's K/V row offset in the pool
      std::vector<const float*> q;
      std::vector<int64_t> qn;                         // each query's number of positions (its token's pos + 1)
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t gi = task / KV_, g = task % KV_, r0 = first[gi], r1 = first[gi + 1];
        const int64_t* table = tok_table[r0];
        int64_t n = 0;
        q.clear(), qn.clear();
        for (int64_t r = r0; r < r1; ++r) {
          n = std::max(n, pos[r] + 1);
          for (int64_t j = 0; j < G; ++j) q.push_back(qkv + r * qkv_w + (g * G + j) * D_), qn.push_back(pos[r] + 1);
        }
        const int64_t Q = static_cast<int64_t>(q.size());
        sc.resize(Q * n);
        row.resize(n);
        for (int64_t b = 0, p = 0; p < n; ++b)                 // block by block: no division per position
          for (int64_t o = 0, base = table[b] * bs_; o < bs_ && p < n; ++o, ++p) row[p] = (base + o) * KVD + g * D_;
        for (int64_t p0 = 0; p0 < n; p0 += 8) {               // scores, 8 positions at a time
          const float* k[8];
          for (int j = 0; j < 8; ++j) k[j] = p0 + j < n ? kp + row[p0 + j] : zero.data();
          float s8[8];
          for (int64_t i = 0; i < Q; ++i) {
            if (qn[i] <= p0) continue;
            scores8(q[i], k, D_, s8);
            for (int64_t j = 0; j < 8 && p0 + j < qn[i]; ++j) sc[i * n + p0 + j] = s8[j] * scale;
          }
        }
        for (int64_t i = 0; i < Q; ++i) {
          const int64_t r = r0 + i / G, h = g * G + i % G, m_n = qn[i];
          float* e = &sc[i * n];                                   // softmax of query i's row
          float m = -INFINITY;
          for (int64_t p = 0; p < m_n; ++p) m = std::max(m, e[p]);
          V sum = vzero();
          int64_t p = 0;
          for (; p + 8 <= m_n; p += 8) {
            const V v = vexp(vsub(vload(e + p), vset(m)));
            vstore(e + p, v);
            sum = vadd(sum, v);
          }
          float tail = 0.f;
          for (; p < m_n; ++p) {
            float one[8] = {e[p] - m};
            vstore(one, vexp(vload(one)));
            e[p] = one[0];
            tail += one[0];
          }
          const float inv = 1.f / (hsum(sum) + tail);
          // out = inv * sum_p e_p v_p, 64 dims at a time in registers (one FMA chain per element, p ascending)
          float* o = out + (r * H_ + h) * D_;
          int64_t d0 = 0;
          for (; d0 + 64 <= D_; d0 += 64) {
            V a[8];
            for (int c = 0; c < 8; ++c) a[c] = vzero();
            for (int64_t p2 = 0; p2 < m_n; ++p2) {
              const V ev = vset(e[p2]);
              const float* v = vp + row[p2] + d0;
              for (int c = 0; c < 8; ++c) a[c] = vfma(ev, vload(v + 8 * c), a[c]);
            }
            for (int c = 0; c < 8; ++c) vstore(o + d0 + 8 * c, vmul(a[c], vset(inv)));
          }
          for (; d0 + 8 <= D_; d0 += 8) {
            V a = vzero();
            for (int64_t p2 = 0; p2 < m_n; ++p2) a = vfma(vset(e[p2]), vload(vp + row[p2] + d0), a);
            vstore(o + d0, vmul(a, vset(inv)));
          }
          for (; d0 < D_; ++d0) {
            float a = 0.f;
            for (int64_t p2 = 0; p2 < m_n; ++p2) a = std::fma(e[p2], vp[row[p2] + d0], a);
            o[d0] = a * inv;
          }
        }
      }
    });
  }

  static Linear linear_of(const std::vector<at::Tensor>& t, size_t at) {
    TORCH_CHECK(t[at].dim() == 2 && (t[at].scalar_type() == at::kFloat || t[at].scalar_type() == at::kBFloat16),
                "native forward: fp32 or bf16 weights");
    TORCH_CHECK(!t[at + 1].numel() || t[at + 1].scalar_type() == at::kFloat, "native forward: fp32 biases");
    return Linear{pack_panels(t[at]), t[at + 1].numel() ? t[at + 1].contiguous() : at::Tensor(), t[at].size(0)};
  }

  at::Tensor embed_, cos_, sin_, final_norm_;
  Linear head_;
  std::vector<Layer> layers_;
  int64_t H_, KV_, D_;
  double eps_;
  int64_t bs_;
  int64_t slots_ = 0;
  bool ffn_ = true;            // false: attention halves only (no FFN weights here)
  Profile prof_;
};

// x (N, in) W^T (+ bias) with the forward's kernel, W as pack_panels(W) of `out` columns (for the tests)
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& panels, int64_t out, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == CW && x.size(1) == panels.size(1) &&
              out <= panels.size(0) * CW, "linear: x (N, in), panels (ceil(out / 16), in, 16)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && (panels.scalar_type() == at::kFloat || panels.scalar_type() == at::kBFloat16),
              "linear: fp32 x, fp32 or bf16 panels");
  at::Tensor xc = x.contiguous(), y = at::empty({x.size(0), out}, at::kFloat);
  const Linear lin{panels.contiguous(), bias.has_value() ? bias->contiguous() : at::Tensor(), out};
  pybind11::gil_scoped_release release;
  lin(xc.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<NativeDecoder>(m, "NativeDecoder")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                          std::vector<std::vector<at::Tensor>>, int64_t, int64_t, int64_t, double, int64_t>())
      .def("step", &NativeDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("draft_greedy", &NativeDecoder::draft_greedy, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("segment", &NativeDecoder::segment, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("draft_exits", &NativeDecoder::draft_exits, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("attn_half", &NativeDecoder::attn_half, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_profiling", &NativeDecoder::set_profiling)
      .def("take_profile", &NativeDecoder::take_profile);
  m.def("pack_panels", &pack_panels);
  m.def("argmax_rows", &argmax_rows);
  m.def("linear", &linear_op, pybind11::arg("x"), pybind11::arg("panels"), pybind11::arg("out"),
        pybind11::arg("bias") = pybind11::none());
}
