// Fused flash attention for XLA:CPU, registered through the XLA FFI (see cpu_flash.py).
//
// Why: at small head dims XLA:CPU runs each attention matmul far below peak and every softmax stage is a
// separate pass over memory. Here one query row at a time (16 rows, one per vector lane, in the forward for
// heads of 16 dims or fewer) meets a 64-key tile that stays in registers/L1 across the score, mask, exp, sum
// and the P·V / gradient products.
//
// Layouts (row-major): q [B,T,H,D], k/v [B,S,K,D] (GQA: query head h uses KV head h / (H/K)),
// q_idx/q_seg [B,T], k_idx/k_seg [B,S] int32, sliding [1] int32. Key j is visible from query i iff
// k_idx <= q_idx, q_seg == k_seg != 0, and (window < 0 || !sliding || q_idx - window < k_idx): the rule of
// visibility in mask.py. Key tiles that no row of a query tile can see (by min/max slot index) are skipped,
// which for causal self-attention skips the upper triangle. Rows that see no key give out 0 and lse +inf.
// Scores are q·k·scale, soft-capped as HF does (cap·tanh(s/cap), before the mask) when the cap is > 0.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int BK = 64;  // keys per tile
constexpr int BQ = 64;  // query rows per work item (tile-skipping granularity)
constexpr float NEG = -0.7f * std::numeric_limits<float>::max();

// 16-float vectors (GCC/Clang vector extensions: one zmm on AVX-512, two ymm on AVX2, four q on NEON).
// Work along the keys of a tile is done on these; work along the head dim is plain loops over D.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int NV = BK / 16;

static inline v16 vload(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
static inline v16i vload(const int32_t* p) {
  v16i x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
static inline v16 splat(float x) { return v16{} + x; }
// Horizontal sum/max/or as butterflies of lane shuffles that stay in registers (a scalar loop would be 16
// dependent steps; splitting through memory stalls on store forwarding): every lane ends with the result.
#if defined(__clang__)
#define JAXTUNE_SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define JAXTUNE_SHUFFLE(x, ...) __builtin_shuffle(x, v16i{__VA_ARGS__})
#endif
template <typename V, typename Op>
static inline V butterfly(V x, Op op) {
  x = op(x, JAXTUNE_SHUFFLE(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  x = op(x, JAXTUNE_SHUFFLE(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  x = op(x, JAXTUNE_SHUFFLE(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return op(x, JAXTUNE_SHUFFLE(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
}
static inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
static inline float hsum(v16 x) { return butterfly(x, [](v16 a, v16 b) { return a + b; })[0]; }
static inline v16 hmax_lanes(v16 x) { return butterfly(x, vmax); }
static inline bool hany(v16i x) { return butterfly(x, [](v16i a, v16i b) { return a | b; })[0] != 0; }
// exp of 16 floats: Cephes' expf polynomial (~1 ulp) after rounding x·log2(e) with the 1.5·2^23 trick.
// Inputs are clamped to [-87, 88]: below -87 it returns ~1e-38 instead of 0, which no softmax sum notices.
static inline v16 vexp(v16 x) {
  x = vmax(x, splat(-87.0f));
  x = x < 88.0f ? x : splat(88.0f);
  const v16 magic = splat(12582912.0f);
  const v16 n = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh of 16 floats as 1 - 2/(exp(2x) + 1): exact at both tails through vexp's clamping; near 0 its absolute
// error (~1e-7) is far below what a softmax over capped scores notices.
static inline v16 vtanh(v16 x) { return 1.0f - 2.0f / (vexp(x + x) + 1.0f); }
// HF's logit soft-cap, cap·tanh(x/cap), for cap > 0 (callers test for 0, no cap, outside their loops' math).
static inline v16 vcap(v16 x, float cap) { return vtanh(x * (1.0f / cap)) * cap; }

struct Shape {
  int64_t B, T, S, H, K, D, G;
};

struct Mask {
  const int32_t *q_idx, *k_idx, *q_seg, *k_seg;
  int64_t window;
  bool sliding;
  // Per (b, key tile): min/max slot index and whether any key is in a segment.
  std::vector<int32_t> kmin, kmax;
  std::vector<char> kany;

  void tiles(const Shape& s) {
    const int64_t nkb = (s.S + BK - 1) / BK;
    kmin.assign(s.B * nkb, 0);
    kmax.assign(s.B * nkb, 0);
    kany.assign(s.B * nkb, 0);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t kb = 0; kb < nkb; ++kb) {
        int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
        char any = 0;
        for (int64_t j = kb * BK; j < std::min<int64_t>(s.S, (kb + 1) * BK); ++j) {
          lo = std::min(lo, k_idx[b * s.S + j]);
          hi = std::max(hi, k_idx[b * s.S + j]);
          any |= k_seg[b * s.S + j] != 0;
        }
        kmin[b * nkb + kb] = lo;
        kmax[b * nkb + kb] = hi;
        kany[b * nkb + kb] = any;
      }
  }

  // Can any row with slot indices in [qlo, qhi] see key tile kb of row b?
  bool reachable(int64_t b, int64_t kb, int64_t nkb, int32_t qlo, int32_t qhi) const {
    const int64_t t = b * nkb + kb;
    if (!kany[t] || kmin[t] > qhi) return false;
    if (window >= 0 && sliding && static_cast<int64_t>(kmax[t]) <= qlo - window) return false;
    return true;
  }
};

// One key tile, copied out of the strided [B,S,K,D] layout: kt/vt transposed [D][BK] for products
// vectorised over keys, kb/vb as [BK][D] for products vectorised over the head dim. Padding keys carry
// segment 0 (invisible) and zero values.
template <int D>
struct KeyTile {
  alignas(64) float kt[D][BK];
  alignas(64) float vt[D][BK];
  alignas(64) float kb[BK][D];
  alignas(64) float vb[BK][D];
  alignas(64) int32_t idx[BK];
  alignas(64) int32_t seg[BK];
  int cols;
  int32_t lo, hi, uniform;  // min/max slot index of the keys; the segment all BK keys share (0: mixed)

  // `forward` needs kt and vb; `forward_rows` (kb, vb) and the backward (all four) load `all`.
  void load(const float* k, const float* v, const Mask& m, const Shape& s, int64_t b, int64_t kh, int64_t s0,
            bool all) {
    cols = static_cast<int>(std::min<int64_t>(BK, s.S - s0));
    for (int j = 0; j < BK; ++j) {
      const bool in = j < cols;
      const float* kr = k + ((b * s.S + s0 + j) * s.K + kh) * D;
      const float* vr = v + ((b * s.S + s0 + j) * s.K + kh) * D;
      for (int d = 0; d < D; ++d) {
        kt[d][j] = in ? kr[d] : 0.0f;
        vb[j][d] = in ? vr[d] : 0.0f;
        if (all) vt[d][j] = vb[j][d];
        if (all) kb[j][d] = kt[d][j];
      }
      idx[j] = in ? m.k_idx[b * s.S + s0 + j] : 0;
      seg[j] = in ? m.k_seg[b * s.S + s0 + j] : 0;
    }
    lo = *std::min_element(idx, idx + cols);
    hi = *std::max_element(idx, idx + cols);
    uniform = std::all_of(seg, seg + BK, [&](int32_t x) { return x == seg[0]; }) ? seg[0] : 0;
  }

  // o += p·M for one row: dq += dS·K in the backward (M = kt or kb) and, rescaled by `corr`, o = o·corr + p·V
  // in `forward` (M = vb). Below 16 dims (the backward only: narrow forwards run `forward_rows`) it
  // accumulates along the keys, 16 lanes per dim, summed once at the end (`o` holds D vectors); wider heads
  // accumulate along the dims.
  void pv_keys(v16* o, const float* p, const float (&m)[D][BK]) const {
    for (int d = 0; d < D; ++d) {
      v16 x = o[d];
      for (int c = 0; c < NV; ++c) x += vload(&p[c * 16]) * vload(&m[d][c * 16]);
      o[d] = x;
    }
  }
  void pv_dims(float* o, float corr, const float* p, const float (&m)[BK][D]) const {
    static_assert(D % 16 == 0, "pv_dims needs a multiple of 16 dims");
    v16 x[D / 16];
    for (int c = 0; c < D / 16; ++c) x[c] = vload(&o[c * 16]) * corr;
    for (int j = 0; j < cols; ++j) {
      const v16 pj = splat(p[j]);
      for (int c = 0; c < D / 16; ++c) x[c] += pj * vload(&m[j][c * 16]);
    }
    std::memcpy(o, x, sizeof(x));
  }

  // Scores of one query row (pre-scaled) against the tile, soft-capped by `cap` (> 0); `vis` holds the
  // visibility mask (all ones or zero per lane). Returns whether any key is visible.
  bool scores(const float* qs, int32_t qi, int32_t qg, const Mask& m, float cap, v16* sc, v16i* vis) const {
    for (int c = 0; c < NV; ++c) sc[c] = v16{};
    for (int d = 0; d < D; ++d) {
      const v16 qd = splat(qs[d]);
      for (int c = 0; c < NV; ++c) sc[c] += qd * vload(&kt[d][c * 16]);
    }
    if (cap > 0.0f)
      for (int c = 0; c < NV; ++c) sc[c] = vcap(sc[c], cap);
    const bool win = m.window >= 0 && m.sliding;
    // Keys with slot > qi - window are in the window; clamp so the bound fits in int32.
    const int32_t lo = static_cast<int32_t>(std::max<int64_t>(static_cast<int64_t>(qi) - m.window,
                                                                std::numeric_limits<int32_t>::min()));
    v16i any = v16i{};
    for (int c = 0; c < NV; ++c) {
      const v16i ki = vload(&idx[c * 16]), ks = vload(&seg[c * 16]);
      v16i ok = (ki <= qi) & (ks == qg) & (ks != 0);
      if (win) ok &= ki > lo;
      vis[c] = ok;
      any |= ok;
    }
    return hany(any);
  }
};

// Runs fn(item) for item in [0, n) on the caller and up to `threads - 1` tasks of XLA's intra-op pool (the
// pool that runs every other op of the step, so the kernel never oversubscribes the cores; a helper that
// starts late finds no work left). The caller waits only for items a helper has taken.
// JAXTUNE_CPU_ATTENTION_THREADS caps `threads` (default: the pool's size).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  static const int cap = [] {
    const char* env = std::getenv("JAXTUNE_CPU_ATTENTION_THREADS");
    return env ? std::max(1, std::atoi(env)) : std::numeric_limits<int>::max();
  }();
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto w = std::make_shared<Work>();
  auto run = [w, n](F& f) {
    for (int64_t i; (i = w->next.fetch_add(1)) < n;) {
      f(i);
      w->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::min<int64_t>({std::max<int64_t>(1, pool.num_threads()), cap, n});
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run, &fn] { run(fn); });
  run(fn);
  while (w->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <int D>
void forward(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k, const float* v,
             const Mask& m, float scale, float cap, float* out, float* lse) {
  const int64_t nqb = (s.T + BQ - 1) / BQ, nkb = (s.S + BK - 1) / BK;
  // One work item per (b, KV head, query tile): each key tile loaded serves the tile's rows of all G heads.
  parallel_for(pool, s.B * s.K * nqb, [&](int64_t item) {
    const int64_t qb = item % nqb, kh = (item / nqb) % s.K, b = item / (nqb * s.K);
    const int64_t t0 = qb * BQ, G = s.G;
    const int rows = static_cast<int>(std::min<int64_t>(BQ, s.T - t0));
    std::vector<float> qs(rows * G * D), acc(rows * G * D, 0.0f), mx(rows * G, NEG), l(rows * G, 0.0f);
    alignas(64) float p[BK];
    v16 sc[NV];
    v16i vis[NV];
    int32_t qlo = std::numeric_limits<int32_t>::max(), qhi = std::numeric_limits<int32_t>::min();
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + ((b * s.T + t0 + r) * s.H + kh * G) * D;  // the G heads are adjacent
      for (int64_t x = 0; x < G * D; ++x) qs[r * G * D + x] = qr[x] * scale;
      qlo = std::min(qlo, m.q_idx[b * s.T + t0 + r]);
      qhi = std::max(qhi, m.q_idx[b * s.T + t0 + r]);
    }
    KeyTile<D> tile;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      if (!m.reachable(b, kb, nkb, qlo, qhi)) continue;
      tile.load(k, v, m, s, b, kh, kb * BK, false);
      for (int r = 0; r < rows; ++r) {
        const int32_t qi = m.q_idx[b * s.T + t0 + r], qg = m.q_seg[b * s.T + t0 + r];
        if (qg == 0) continue;  // padding sees no key: skip its scores too
        for (int64_t g = 0; g < G; ++g) {
          const int64_t rg = r * G + g;
          if (!tile.scores(&qs[rg * D], qi, qg, m, cap, sc, vis)) continue;
          v16 top16 = splat(mx[rg]);
          for (int c = 0; c < NV; ++c) top16 = vmax(top16, vis[c] ? sc[c] : splat(NEG));
          const v16 top_lanes = hmax_lanes(top16);
          const float top = top_lanes[0];
          v16 sum16 = v16{};
          for (int c = 0; c < NV; ++c) {
            const v16 e = vis[c] ? vexp(sc[c] - top_lanes) : v16{};
            std::memcpy(&p[c * 16], &e, sizeof(e));
            sum16 += e;
          }
          const float corr = std::exp(mx[rg] - top);
          tile.pv_dims(&acc[rg * D], corr, p, tile.vb);
          l[rg] = l[rg] * corr + hsum(sum16);
          mx[rg] = top;
        }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t rg = r * G + g, h = kh * G + g;
        float* orow = out + ((b * s.T + t0 + r) * s.H + h) * D;
        const bool seen = mx[rg] > 0.5f * NEG;
        for (int d = 0; d < D; ++d) orow[d] = seen ? acc[rg * D + d] / l[rg] : 0.0f;
        lse[(b * s.H + h) * s.T + t0 + r] = seen ? mx[rg] + std::log(l[rg]) : std::numeric_limits<float>::infinity();
      }
  });
}

// The forward for narrow heads (D <= 16): 16 query rows per vector, one lane each, so that the row max,
// the softmax sum and the output accumulate lane-wise and no horizontal reduction or scalar exp runs per
// tile; keys are walked one at a time with their K/V values broadcast. (Rows along the keys, as `forward`
// does, spends most of its time on per-row reductions when a row's dot product is only 8 wide.)
template <int D>
void forward_rows(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k, const float* v,
                  const Mask& m, float scale, float cap, float* out, float* lse) {
  constexpr int R = 16, NR = BQ / R;
  const int64_t nqb = (s.T + BQ - 1) / BQ, nkb = (s.S + BK - 1) / BK;
  const bool win = m.window >= 0 && m.sliding;
  parallel_for(pool, s.B * s.K * nqb, [&](int64_t item) {
    const int64_t qb = item % nqb, kh = (item / nqb) % s.K, b = item / (nqb * s.K);
    const int64_t t0 = qb * BQ, G = s.G;
    const int rows = static_cast<int>(std::min<int64_t>(BQ, s.T - t0));
    // Per group of R rows: slot indices and segments (padding lanes: segment 0, sees nothing), the range of
    // their slot indices (lo > hi: all padding, skipped), and the segment all R rows share (0 if mixed).
    // Per (group, head): q transposed and scaled, running max, sum and output, all lane-wise.
    std::vector<v16i> qidx(NR), qseg(NR);
    std::vector<int32_t> glo(NR), ghi(NR), guni(NR);
    std::vector<v16> qt(NR * G * D), acc(NR * G * D, v16{}), mx(NR * G, splat(NEG)), l(NR * G, v16{});
    for (int gr = 0; gr < NR; ++gr) {
      int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
      for (int r = 0; r < R; ++r) {
        const int64_t t = gr * R + r;
        const bool in = t < rows;
        qidx[gr][r] = in ? m.q_idx[b * s.T + t0 + t] : 0;
        qseg[gr][r] = in ? m.q_seg[b * s.T + t0 + t] : 0;
        if (in && qseg[gr][r] != 0) lo = std::min(lo, qidx[gr][r]), hi = std::max(hi, qidx[gr][r]);
        for (int64_t g = 0; g < G; ++g)
          for (int d = 0; d < D; ++d)
            qt[(gr * G + g) * D + d][r] = in ? q[((b * s.T + t0 + t) * s.H + kh * G + g) * D + d] * scale : 0.0f;
      }
      glo[gr] = lo, ghi[gr] = hi;
      guni[gr] = qseg[gr][0];
      for (int r = 1; r < R; ++r) guni[gr] = qseg[gr][r] == guni[gr] ? guni[gr] : 0;
    }
    KeyTile<D> tile;
    alignas(64) v16 sc[BK];
    for (int64_t kb = 0; kb < nkb; ++kb) {
      bool loaded = false;
      for (int gr = 0; gr < NR && gr * R < rows; ++gr) {
        if (glo[gr] > ghi[gr] || !m.reachable(b, kb, nkb, glo[gr], ghi[gr])) continue;
        if (!loaded) tile.load(k, v, m, s, b, kh, kb * BK, true), loaded = true;  // kb, vb: by key
        // Every key visible from every row of the group (below the diagonal, one segment, inside any
        // window): the mask is skipped.
        const bool all = tile.uniform != 0 && tile.uniform == guni[gr] && tile.hi <= glo[gr] &&
                         !(win && static_cast<int64_t>(tile.lo) <= static_cast<int64_t>(ghi[gr]) - m.window);
        const v16i lo_win = qidx[gr] - static_cast<int32_t>(std::min<int64_t>(m.window, 1 << 30));
        for (int64_t g = 0; g < G; ++g) {
          const v16* qg = &qt[(gr * G + g) * D];
          v16 top = mx[gr * G + g];
          for (int j = 0; j < tile.cols; ++j) {
            v16 x = v16{};
            for (int d = 0; d < D; ++d) x += qg[d] * tile.kb[j][d];
            if (cap > 0.0f) x = vcap(x, cap);
            if (!all) {
              v16i ok = (tile.idx[j] <= qidx[gr]) & (qseg[gr] == tile.seg[j]) & (tile.seg[j] != 0);
              if (win) ok &= tile.idx[j] > lo_win;
              x = ok ? x : splat(NEG);
            }
            sc[j] = x;
            top = vmax(top, x);
          }
          v16* o = &acc[(gr * G + g) * D];
          const v16 corr = vexp(mx[gr * G + g] - top);
          v16 sum = v16{};
          for (int d = 0; d < D; ++d) o[d] *= corr;
          for (int j = 0; j < tile.cols; ++j) {
            const v16 p = sc[j] > 0.5f * NEG ? vexp(sc[j] - top) : v16{};
            sum += p;
            for (int d = 0; d < D; ++d) o[d] += p * tile.vb[j][d];
          }
          l[gr * G + g] = l[gr * G + g] * corr + sum;
          mx[gr * G + g] = top;
        }
      }
    }
    for (int gr = 0; gr < NR; ++gr)
      for (int64_t g = 0; g < G; ++g)
        for (int r = 0; r < R && gr * R + r < rows; ++r) {
          const int64_t t = t0 + gr * R + r, h = kh * G + g, rg = gr * G + g;
          const bool seen = mx[rg][r] > 0.5f * NEG;
          float* orow = out + ((b * s.T + t) * s.H + h) * D;
          for (int d = 0; d < D; ++d) orow[d] = seen ? acc[rg * D + d][r] / l[rg][r] : 0.0f;
          lse[(b * s.H + h) * s.T + t] = seen ? mx[rg][r] + std::log(l[rg][r]) : std::numeric_limits<float>::infinity();
        }
  });
}

// Narrow heads run rows in lanes, wider ones keys in lanes, where `forward` keeps its accumulators in
// registers (docs/benchmarks.md has the comparison).
template <int D>
void forward_any(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k, const float* v,
                 const Mask& m, float scale, float cap, float* out, float* lse) {
  if constexpr (D <= 16)
    forward_rows<D>(pool, s, q, k, v, m, scale, cap, out, lse);
  else
    forward<D>(pool, s, q, k, v, m, scale, cap, out, lse);
}

template <int D>
void backward(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k, const float* v,
              const Mask& m, float scale, float cap, const float* out, const float* lse, const float* dout,
              float* dq, float* dk, float* dv) {
  const int64_t nkb = (s.S + BK - 1) / BK, nqb = (s.T + BQ - 1) / BQ;
  // One work item per (b, KV head): it owns dq of its G query heads and dk/dv of its KV head, so no
  // accumulation is shared between threads.
  parallel_for(pool, s.B * s.K, [&](int64_t item) {
    const int64_t b = item / s.K, kh = item % s.K;
    std::vector<float> delta(s.G * s.T);
    std::vector<v16> dqv(D < 16 ? s.T * s.G * D : 0, v16{});  // dq = dS·K, accumulated like the forward's P·V
    std::vector<int32_t> qlo(nqb, std::numeric_limits<int32_t>::max()), qhi(nqb, std::numeric_limits<int32_t>::min());
    for (int64_t t = 0; t < s.T; ++t) {
      qlo[t / BQ] = std::min(qlo[t / BQ], m.q_idx[b * s.T + t]);
      qhi[t / BQ] = std::max(qhi[t / BQ], m.q_idx[b * s.T + t]);
      for (int64_t g = 0; g < s.G; ++g) {
        const int64_t off = ((b * s.T + t) * s.H + kh * s.G + g) * D;
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += dout[off + d] * out[off + d];
        delta[g * s.T + t] = acc;
        std::memset(dq + off, 0, D * sizeof(float));
      }
    }
    KeyTile<D> tile;
    // dk/dv of the tile accumulate transposed ([D][BK]) so their updates run along the keys.
    constexpr int GB = 8;
    alignas(64) float dkt[D][BK], dvt[D][BK], ds[BK], qsb[GB][D];
    v16 sc[NV], pvb[GB][NV], dsb[GB][NV];
    const float* dob[GB];
    v16i vis[NV];
    for (int64_t kb = 0; kb < nkb; ++kb) {
      tile.load(k, v, m, s, b, kh, kb * BK, true);
      std::memset(dkt, 0, sizeof(dkt));
      std::memset(dvt, 0, sizeof(dvt));
      for (int64_t qb = 0; qb < nqb; ++qb) {
        if (!m.reachable(b, kb, nkb, qlo[qb], qhi[qb])) continue;
        // (row, head) pairs are buffered GB at a time and their dk/dv contributions summed before the
        // accumulators are loaded and stored: one load/store per GB products instead of per pair.
        int n = 0;
        auto flush = [&] {
          for (int d = 0; d < D; ++d)
            for (int c = 0; c < NV; ++c) {
              v16 a = vload(&dvt[d][c * 16]), bk = vload(&dkt[d][c * 16]);
              for (int i = 0; i < n; ++i) {
                a += pvb[i][c] * dob[i][d];
                bk += dsb[i][c] * qsb[i][d];
              }
              std::memcpy(&dvt[d][c * 16], &a, sizeof(v16));
              std::memcpy(&dkt[d][c * 16], &bk, sizeof(v16));
            }
          n = 0;
        };
        for (int64_t t = qb * BQ; t < std::min<int64_t>(s.T, (qb + 1) * BQ); ++t) {
          const int32_t qi = m.q_idx[b * s.T + t], qg = m.q_seg[b * s.T + t];
          for (int64_t g = 0; g < s.G; ++g) {
            const int64_t h = kh * s.G + g, off = ((b * s.T + t) * s.H + h) * D;
            const float row_lse = lse[(b * s.H + h) * s.T + t];
            if (!std::isfinite(row_lse)) continue;
            float* qs = qsb[n];
            for (int d = 0; d < D; ++d) qs[d] = q[off + d] * scale;
            if (!tile.scores(qs, qi, qg, m, cap, sc, vis)) continue;
            const float* dor = dout + off;
            v16 dp[NV] = {};
            for (int d = 0; d < D; ++d) {
              const v16 od = splat(dor[d]);
              for (int c = 0; c < NV; ++c) dp[c] += od * vload(&tile.vt[d][c * 16]);
            }
            const float dl = delta[g * s.T + t];
            for (int c = 0; c < NV; ++c) {
              pvb[n][c] = vis[c] ? vexp(sc[c] - row_lse) : v16{};
              dsb[n][c] = pvb[n][c] * (dp[c] - dl);
              // Through the cap: d(cap·tanh(x/cap))/dx = 1 - tanh², and tanh = capped score / cap.
              if (cap > 0.0f) dsb[n][c] *= 1.0f - sc[c] * sc[c] * (1.0f / (cap * cap));
              std::memcpy(&ds[c * 16], &dsb[n][c], sizeof(v16));
            }
            dob[n] = dor;
            if constexpr (D < 16)
              tile.pv_keys(&dqv[(t * s.G + g) * D], ds, tile.kt);
            else
              tile.pv_dims(dq + off, 1.0f, ds, tile.kb);
            if (++n == GB) flush();
          }
        }
        flush();
      }
      for (int j = 0; j < tile.cols; ++j) {
        const int64_t off = ((b * s.S + kb * BK + j) * s.K + kh) * D;
        for (int d = 0; d < D; ++d) dk[off + d] = dkt[d][j], dv[off + d] = dvt[d][j];
      }
    }
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t g = 0; g < s.G; ++g) {
        float* row = dq + ((b * s.T + t) * s.H + kh * s.G + g) * D;
        for (int d = 0; d < D; ++d) row[d] = (D < 16 ? hsum(dqv[(t * s.G + g) * D + d]) : row[d]) * scale;
      }
  });
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], kd[2] ? qd[2] / kd[2] : 0};
}

ffi::Error check(const Shape& s) {
  if (s.K == 0 || s.H % s.K != 0) return ffi::Error::InvalidArgument("query heads must be a multiple of KV heads");
  return ffi::Error::Success();
}

Mask mask_of(const Shape& s, ffi::Buffer<ffi::S32>& q_idx, ffi::Buffer<ffi::S32>& k_idx, ffi::Buffer<ffi::S32>& q_seg,
             ffi::Buffer<ffi::S32>& k_seg, ffi::Buffer<ffi::S32>& sliding, int64_t window) {
  Mask m{q_idx.typed_data(), k_idx.typed_data(), q_seg.typed_data(), k_seg.typed_data(), window,
         sliding.typed_data()[0] != 0};
  m.tiles(s);
  return m;
}

// Head dims with a specialised kernel (the loops over D unroll); the Python side only calls with these.
#define JAXTUNE_HEAD_DIMS(X) X(8) X(16) X(32) X(64) X(96) X(128) X(256)

ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
               ffi::Buffer<ffi::S32> q_idx, ffi::Buffer<ffi::S32> k_idx, ffi::Buffer<ffi::S32> q_seg,
               ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::S32> sliding, ffi::ResultBuffer<ffi::F32> out,
               ffi::ResultBuffer<ffi::F32> lse, int64_t window, float scale, float softcap) {
  const Shape s = shape_of(q, k);
  if (auto e = check(s); e.failure()) return e;
  const Mask m = mask_of(s, q_idx, k_idx, q_seg, k_seg, sliding, window);
#define JAXTUNE_FWD(N) \
  if (s.D == N) return forward_any<N>(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), m, scale, softcap, out->typed_data(), lse->typed_data()), ffi::Error::Success();
  JAXTUNE_HEAD_DIMS(JAXTUNE_FWD)
#undef JAXTUNE_FWD
  return ffi::Error::InvalidArgument("unsupported head_dim for the CPU flash kernel");
}

ffi::Error Bwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
               ffi::Buffer<ffi::S32> q_idx, ffi::Buffer<ffi::S32> k_idx, ffi::Buffer<ffi::S32> q_seg,
               ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::S32> sliding, ffi::Buffer<ffi::F32> out,
               ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
               ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, int64_t window, float scale,
               float softcap) {
  const Shape s = shape_of(q, k);
  if (auto e = check(s); e.failure()) return e;
  const Mask m = mask_of(s, q_idx, k_idx, q_seg, k_seg, sliding, window);
#define JAXTUNE_BWD(N)                                                                                   \
  if (s.D == N)                                                                                          \
    return backward<N>(pool, s, q.typed_data(), k.typed_data(), v.typed_data(), m, scale, softcap,      \
                       out.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(),          \
                       dk->typed_data(), dv->typed_data()),                                              \
           ffi::Error::Success();
  JAXTUNE_HEAD_DIMS(JAXTUNE_BWD)
#undef JAXTUNE_BWD
  return ffi::Error::InvalidArgument("unsupported head_dim for the CPU flash kernel");
}

}  // namespace

// What both handlers start with: XLA's intra-op thread pool, then q, k, v, q_idx, k_idx, q_seg, k_seg, sliding.
static auto BindAttentionInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneFlashFwd, Fwd,
                              BindAttentionInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneFlashBwd, Bwd,
                              BindAttentionInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
