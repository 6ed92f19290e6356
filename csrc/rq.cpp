// Residual quantization engine (CPU): see rq.h for the math.
#include "rq.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>

#include "common.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace recbase {

int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

namespace {

// Forking threads costs microseconds (milliseconds on a loaded machine, where a descheduled
// thread stalls every barrier): jobs under ~8M multiply-adds (or ~0.5M streamed floats, x16)
// run on the calling thread.
inline bool parallel_worth(int64_t work) { return work >= (int64_t(1) << 23); }

// ---------------------------------------------------------------------------------------------
// SIMD abstraction: one "vector" of kLanes floats plus the few ops the kernels need.
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRows = 8;  // micro-tile rows: 8 rows x 2 vectors = 16 accumulators of 32 zmm
using vf = __m512;
using vi = __m512i;
using vmask = __mmask16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vf vload(const float* p) { return _mm512_load_ps(p); }
inline vf vloadu(const float* p) { return _mm512_loadu_ps(p); }
inline void vstoreu(float* p, vf a) { _mm512_storeu_ps(p, a); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
inline vi viota(int base) {
  return _mm512_add_epi32(_mm512_set1_epi32(base),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline vi vloadi(const int32_t* p) { return _mm512_loadu_si512(p); }
inline void vstorei(int32_t* p, vi a) { _mm512_storeu_si512(p, a); }
// (best, idx) <- (d, id) where d < best (strict: the earlier, smaller index wins ties).
inline void vmin_update(vf& best, vi& idx, vf d, vi id) {
  vmask m = _mm512_cmp_ps_mask(d, best, _CMP_LT_OQ);
  best = _mm512_mask_mov_ps(best, m, d);
  idx = _mm512_mask_mov_epi32(idx, m, id);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kRows = 6;  // 6 x 2 = 12 accumulators of 16 ymm
using vf = __m256;
using vi = __m256i;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vf vload(const float* p) { return _mm256_load_ps(p); }
inline vf vloadu(const float* p) { return _mm256_loadu_ps(p); }
inline void vstoreu(float* p, vf a) { _mm256_storeu_ps(p, a); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vi viota(int base) {
  return _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vi vloadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void vstorei(int32_t* p, vi a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
inline void vmin_update(vf& best, vi& idx, vf d, vi id) {
  vf m = _mm256_cmp_ps(d, best, _CMP_LT_OQ);
  best = _mm256_blendv_ps(best, d, m);
  idx = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(id), m));
}
#else
// Portable fallback: a 4-lane struct the compiler can auto-vectorise.
constexpr int kLanes = 4;
constexpr int kRows = 4;
struct vf { float v[4]; };
struct vi { int32_t v[4]; };
inline vf vzero() { return vf{{0, 0, 0, 0}}; }
inline vf vset1(float a) { return vf{{a, a, a, a}}; }
inline vf vload(const float* p) { vf r; std::memcpy(r.v, p, 16); return r; }
inline vf vloadu(const float* p) { return vload(p); }
inline void vstoreu(float* p, vf a) { std::memcpy(p, a.v, 16); }
inline vf vfma(vf a, vf b, vf c) { for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline vf vsub(vf a, vf b) { for (int i = 0; i < 4; ++i) a.v[i] -= b.v[i]; return a; }
inline vf vadd(vf a, vf b) { for (int i = 0; i < 4; ++i) a.v[i] += b.v[i]; return a; }
inline vf vfnma(vf a, vf b, vf c) { for (int i = 0; i < 4; ++i) c.v[i] -= a.v[i] * b.v[i]; return c; }
inline vi viota(int base) { return vi{{base, base + 1, base + 2, base + 3}}; }
inline vi vloadi(const int32_t* p) { vi r; std::memcpy(r.v, p, 16); return r; }
inline void vstorei(int32_t* p, vi a) { std::memcpy(p, a.v, 16); }
inline void vmin_update(vf& best, vi& idx, vf d, vi id) {
  for (int i = 0; i < 4; ++i)
    if (d.v[i] < best.v[i]) { best.v[i] = d.v[i]; idx.v[i] = id.v[i]; }
}
#endif

constexpr int kVecs = 2;                  // vectors of codewords per micro-tile
constexpr int kBlock = kLanes * kVecs;    // codewords per packed panel
constexpr float kInf = std::numeric_limits<float>::infinity();

struct AlignedFree { void operator()(void* p) const { std::free(p); } };
template <typename T>
using aligned_buf = std::unique_ptr<T[], AlignedFree>;
template <typename T>
aligned_buf<T> aligned_alloc_n(size_t n) {
  size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::bad_alloc();
  return aligned_buf<T>(static_cast<T*>(p));
}

// Codebooks packed for the micro-kernel: per level and panel of kBlock codewords, a [d][kBlock]
// transposed panel (one aligned vector load per dimension), padded with zero codewords whose
// norm is +inf so they never win the argmin.
struct Packed {
  int64_t levels, K, d, panels;
  aligned_buf<float> data;   // [levels][panels][d][kBlock]
  aligned_buf<float> norms;  // [levels][panels * kBlock]
  const float* panel(int64_t l, int64_t p) const { return data.get() + ((l * panels + p) * d) * kBlock; }
  const float* norm(int64_t l, int64_t p) const { return norms.get() + (l * panels + p) * kBlock; }
};

Packed pack_codebooks(const float* cb, int64_t levels, int64_t K, int64_t d, int threads) {
  Packed pk{levels, K, d, (K + kBlock - 1) / kBlock, nullptr, nullptr};
  pk.data = aligned_alloc_n<float>(size_t(levels * pk.panels * d * kBlock));
  pk.norms = aligned_alloc_n<float>(size_t(levels * pk.panels * kBlock));
  const int64_t total = levels * pk.panels;
#pragma omp parallel for num_threads(threads) if(parallel_worth(total * d * kBlock)) schedule(static)
  for (int64_t lp = 0; lp < total; ++lp) {
    const int64_t l = lp / pk.panels, p = lp % pk.panels;
    float* dst = pk.data.get() + lp * d * kBlock;
    float* nrm = pk.norms.get() + lp * kBlock;
    const int64_t kn = std::min<int64_t>(kBlock, K - p * kBlock);  // live codewords
    const float* e0 = cb + (l * K + p * kBlock) * d;
    for (int64_t t = 0; t < kBlock; ++t) {
      if (t < kn) {
        const float* e = e0 + t * d;
        double s = 0;  // simd reduction: a scalar double chain would cost 4 cycles per element
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d; ++j) s += double(e[j]) * e[j];
        nrm[t] = float(s);
      } else {
        nrm[t] = kInf;
      }
    }
    // Transpose with sequential writes (kBlock read streams are prefetcher-friendly).
    for (int64_t j = 0; j < d; ++j) {
      float* row = dst + j * kBlock;
      for (int64_t t = 0; t < kn; ++t) row[t] = e0[t * d + j];
      for (int64_t t = kn; t < kBlock; ++t) row[t] = 0.f;
    }
  }
  return pk;
}

// acc[r][v] = sum_j res[r, j] * panel[j, v*kLanes : (v+1)*kLanes] for kRows rows of residuals.
inline void micro_dots(const float* __restrict res, int64_t ld, const float* __restrict panel,
                       int64_t d, vf acc[kRows][kVecs]) {
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = vzero();
  const float* rp[kRows];
  for (int r = 0; r < kRows; ++r) rp[r] = res + r * ld;
  for (int64_t j = 0; j < d; ++j) {
    const vf b0 = vload(panel + j * kBlock);
    const vf b1 = vload(panel + j * kBlock + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const vf a = vset1(rp[r][j]);
      acc[r][0] = vfma(a, b0, acc[r][0]);
      acc[r][1] = vfma(a, b1, acc[r][1]);
    }
  }
}

// Per-lane running argmin of (||e||^2 - 2 <r, e>) over the panels of one level, for a block of
// `rows` (multiple of kRows) residual rows. best_val/best_idx: [rows][kLanes].
void block_argmin(const float* res, int64_t rows, const Packed& pk, int64_t level, float* best_val,
                  int32_t* best_idx) {
  const int64_t d = pk.d;
  for (int64_t i = 0; i < rows * kLanes; ++i) { best_val[i] = kInf; best_idx[i] = 0; }
  const vf two = vset1(2.f);
  vf acc[kRows][kVecs];
  for (int64_t p = 0; p < pk.panels; ++p) {
    const float* panel = pk.panel(level, p);
    const float* nrm = pk.norm(level, p);
    const vf n0 = vload(nrm), n1 = vload(nrm + kLanes);
    const vi id0 = viota(int(p * kBlock)), id1 = viota(int(p * kBlock + kLanes));
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      micro_dots(res + r0 * d, d, panel, d, acc);
      for (int r = 0; r < kRows; ++r) {
        float* bv = best_val + (r0 + r) * kLanes;
        int32_t* bi = best_idx + (r0 + r) * kLanes;
        vf b = vloadu(bv);
        vi ib = vloadi(bi);
        vmin_update(b, ib, vfnma(two, acc[r][0], n0), id0);
        vmin_update(b, ib, vfnma(two, acc[r][1], n1), id1);
        vstoreu(bv, b);
        vstorei(bi, ib);
      }
    }
  }
}

// Full distance rows D[r, k] = ||e_k||^2 - 2 <r, e_k> (k < K) for `rows` residual rows.
void block_dists(const float* res, int64_t rows, const Packed& pk, int64_t level, float* dist,
                 int64_t ld_dist) {
  const int64_t d = pk.d;
  const vf two = vset1(2.f);
  vf acc[kRows][kVecs];
  float tmp[kBlock];
  for (int64_t p = 0; p < pk.panels; ++p) {
    const float* panel = pk.panel(level, p);
    const float* nrm = pk.norm(level, p);
    const vf n0 = vload(nrm), n1 = vload(nrm + kLanes);
    const int64_t kn = std::min<int64_t>(kBlock, pk.K - p * kBlock);
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      micro_dots(res + r0 * d, d, panel, d, acc);
      for (int r = 0; r < kRows; ++r) {
        vstoreu(tmp, vfnma(two, acc[r][0], n0));
        vstoreu(tmp + kLanes, vfnma(two, acc[r][1], n1));
        std::memcpy(dist + (r0 + r) * ld_dist + p * kBlock, tmp, size_t(kn) * sizeof(float));
      }
    }
  }
}

// Lane reduction: smallest value, then smallest index among equal values.
inline int32_t reduce_argmin(const float* bv, const int32_t* bi) {
  float best = bv[0];
  int32_t idx = bi[0];
  for (int t = 1; t < kLanes; ++t)
    if (bv[t] < best || (bv[t] == best && bi[t] < idx)) { best = bv[t]; idx = bi[t]; }
  return idx;
}

// ||a - b||^2 in float32 SIMD (two accumulators), for k-means++ sampling weights.
inline float sq_dist_f32(const float* a, const float* b, int64_t d) {
  vf acc0 = vzero(), acc1 = vzero();
  int64_t j = 0;
  for (; j + 2 * kLanes <= d; j += 2 * kLanes) {
    const vf t0 = vsub(vloadu(a + j), vloadu(b + j));
    const vf t1 = vsub(vloadu(a + j + kLanes), vloadu(b + j + kLanes));
    acc0 = vfma(t0, t0, acc0);
    acc1 = vfma(t1, t1, acc1);
  }
  for (; j + kLanes <= d; j += kLanes) {
    const vf t0 = vsub(vloadu(a + j), vloadu(b + j));
    acc0 = vfma(t0, t0, acc0);
  }
  float lanes[kLanes];
  vstoreu(lanes, vadd(acc0, acc1));
  float s = 0;
  for (int t = 0; t < kLanes; ++t) s += lanes[t];
  for (; j < d; ++j) s += (a[j] - b[j]) * (a[j] - b[j]);
  return s;
}

inline void sub_row(float* __restrict r, const float* __restrict e, int64_t d) {
  for (int64_t j = 0; j < d; ++j) r[j] -= e[j];
}

// Rows per thread-local block: keep the residual block around 128 KiB (L2) but >= 4 micro-tiles.
int64_t block_rows(int64_t d) {
  int64_t rows = (32768 + d - 1) / std::max<int64_t>(d, 1);
  rows = std::clamp<int64_t>(rows, 4 * kRows, 256);
  return (rows + kRows - 1) / kRows * kRows;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Encoding / decoding
// ---------------------------------------------------------------------------------------------
void rq_encode_greedy(const float* x, int64_t n, int64_t d, const float* codebooks, int64_t levels,
                      int64_t K, int64_t* codes, int threads) {
  if (n == 0) return;
  threads = resolve_threads(threads);
  const Packed pk = pack_codebooks(codebooks, levels, K, d, threads);
  const int64_t B = block_rows(d);
  const int64_t nblocks = (n + B - 1) / B;
  threads = int(std::min<int64_t>(threads, nblocks));
#pragma omp parallel num_threads(threads) if(parallel_worth(n * K * d * levels))
  {
    auto res = aligned_alloc_n<float>(size_t(B * d));
    auto bv = aligned_alloc_n<float>(size_t(B * kLanes));
    auto bi = aligned_alloc_n<int32_t>(size_t(B * kLanes));
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * B, m = std::min(B, n - i0);
      const int64_t rows = (m + kRows - 1) / kRows * kRows;
      std::memcpy(res.get(), x + i0 * d, size_t(m * d) * sizeof(float));
      std::memset(res.get() + m * d, 0, size_t((rows - m) * d) * sizeof(float));
      for (int64_t l = 0; l < levels; ++l) {
        block_argmin(res.get(), rows, pk, l, bv.get(), bi.get());
        const float* cb = codebooks + l * K * d;
        for (int64_t i = 0; i < m; ++i) {
          const int32_t c = reduce_argmin(bv.get() + i * kLanes, bi.get() + i * kLanes);
          codes[(i0 + i) * levels + l] = c;
          if (l + 1 < levels) sub_row(res.get() + i * d, cb + int64_t(c) * d, d);
        }
      }
    }
  }
}

void rq_encode_beam(const float* x, int64_t n, int64_t d, const float* codebooks, int64_t levels,
                    int64_t K, int64_t beam, int64_t* codes, int threads) {
  if (beam <= 1) return rq_encode_greedy(x, n, d, codebooks, levels, K, codes, threads);
  if (n == 0) return;
  threads = resolve_threads(threads);
  const Packed pk = pack_codebooks(codebooks, levels, K, d, threads);
  // Rows per chunk so that chunk * beam paths form whole micro-tiles.
  const int64_t chunk = std::max<int64_t>(1, 64 / beam);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t maxpaths = chunk * beam;
  const int64_t padded = (maxpaths + kRows - 1) / kRows * kRows;
  threads = int(std::min<int64_t>(threads, nchunks));
#pragma omp parallel num_threads(threads) if(parallel_worth(n * K * d * levels))
  {
    auto res = aligned_alloc_n<float>(size_t(padded * d));
    auto res_next = aligned_alloc_n<float>(size_t(padded * d));
    std::vector<float> dist(static_cast<size_t>(padded * K));
    std::vector<double> err(static_cast<size_t>(maxpaths)), err_next(static_cast<size_t>(maxpaths));
    std::vector<int64_t> pc(static_cast<size_t>(maxpaths * levels)), pc_next(static_cast<size_t>(maxpaths * levels));
    std::vector<int64_t> npaths(static_cast<size_t>(chunk));
    struct Cand { double err; int64_t path, code; };
    std::vector<Cand> cand;
#pragma omp for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t i0 = ch * chunk, m = std::min(chunk, n - i0);
      std::memset(res.get(), 0, size_t(padded * d) * sizeof(float));
      // Path (row i, beam b) lives at index i * beam + b; one live path per row at level 0.
      for (int64_t i = 0; i < m; ++i) {
        std::memcpy(res.get() + i * beam * d, x + (i0 + i) * d, size_t(d) * sizeof(float));
        double s = 0;
        for (int64_t j = 0; j < d; ++j) s += double(x[(i0 + i) * d + j]) * x[(i0 + i) * d + j];
        err[size_t(i * beam)] = s;
        npaths[size_t(i)] = 1;
      }
      for (int64_t l = 0; l < levels; ++l) {
        block_dists(res.get(), padded, pk, l, dist.data(), K);
        const float* cb = codebooks + l * K * d;
        std::memset(res_next.get(), 0, size_t(padded * d) * sizeof(float));
        for (int64_t i = 0; i < m; ++i) {
          cand.clear();
          for (int64_t b = 0; b < npaths[size_t(i)]; ++b) {
            const int64_t p = i * beam + b;
            for (int64_t k = 0; k < K; ++k)
              cand.push_back({err[size_t(p)] + double(dist[size_t(p * K + k)]), b, k});
          }
          const int64_t keep = std::min<int64_t>(beam, int64_t(cand.size()));
          auto less = [](const Cand& a, const Cand& b) {
            if (a.err != b.err) return a.err < b.err;
            if (a.path != b.path) return a.path < b.path;
            return a.code < b.code;
          };
          std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), less);
          for (int64_t b = 0; b < keep; ++b) {
            const int64_t src = i * beam + cand[size_t(b)].path, dst = i * beam + b;
            const float* e = cb + cand[size_t(b)].code * d;
            float* r = res_next.get() + dst * d;
            const float* rs = res.get() + src * d;
            double s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < d; ++j) {
              r[j] = rs[j] - e[j];
              s += double(r[j]) * r[j];
            }
            err_next[size_t(dst)] = s;  // exact ||r||^2 of the new path (no drift)
            for (int64_t q = 0; q < l; ++q) pc_next[size_t(dst * levels + q)] = pc[size_t(src * levels + q)];
            pc_next[size_t(dst * levels + l)] = cand[size_t(b)].code;
          }
          npaths[size_t(i)] = keep;
        }
        std::swap(res, res_next);
        std::swap(err, err_next);
        std::swap(pc, pc_next);
      }
      for (int64_t i = 0; i < m; ++i) {
        int64_t bestb = 0;
        for (int64_t b = 1; b < npaths[size_t(i)]; ++b)
          if (err[size_t(i * beam + b)] < err[size_t(i * beam + bestb)]) bestb = b;
        std::memcpy(codes + (i0 + i) * levels, pc.data() + (i * beam + bestb) * levels,
                    size_t(levels) * sizeof(int64_t));
      }
    }
  }
}

void rq_decode(const int64_t* codes, int64_t n, int64_t levels, const float* codebooks, int64_t K,
               int64_t d, float* out, int threads) {
  threads = resolve_threads(threads);
#pragma omp parallel for num_threads(threads) if(parallel_worth(16 * n * d * levels)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* o = out + i * d;
    std::memset(o, 0, size_t(d) * sizeof(float));
    for (int64_t l = 0; l < levels; ++l) {
      const float* e = codebooks + (l * K + codes[i * levels + l]) * d;
      for (int64_t j = 0; j < d; ++j) o[j] += e[j];
    }
  }
}

void nearest_centroid(const float* x, int64_t n, int64_t d, const float* centroids, int64_t K,
                      int64_t* assign, double* dist, int threads) {
  if (n == 0) return;
  threads = resolve_threads(threads);
  rq_encode_greedy(x, n, d, centroids, 1, K, assign, threads);
  if (dist) {
#pragma omp parallel for num_threads(threads) if(parallel_worth(16 * n * d)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* a = x + i * d;
      const float* c = centroids + assign[i] * d;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) {
        const double t = double(a[j]) - double(c[j]);
        s += t * t;
      }
      dist[i] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// k-means
// ---------------------------------------------------------------------------------------------
namespace {

double sq_dist(const float* a, const float* b, int64_t d) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) {
    const double t = double(a[j]) - double(b[j]);
    s += t * t;
  }
  return s;
}

// k-means++ seeding over the rows `idx` of x; returns k centroid rows.
std::vector<float> kmeanspp(const float* x, int64_t d, const std::vector<int64_t>& idx, int64_t k,
                            std::mt19937_64& rng, int threads) {
  const int64_t m = int64_t(idx.size());
  std::vector<float> c(static_cast<size_t>(k * d));
  std::vector<double> d2(static_cast<size_t>(m), std::numeric_limits<double>::infinity());
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  int64_t pick = int64_t(unif(rng) * double(m));
  pick = std::min(pick, m - 1);
  for (int64_t c_i = 0; c_i < k; ++c_i) {
    std::memcpy(c.data() + c_i * d, x + idx[size_t(pick)] * d, size_t(d) * sizeof(float));
    if (c_i + 1 == k) break;
    const float* ce = c.data() + c_i * d;
#pragma omp parallel for num_threads(threads) if(parallel_worth(m * d)) schedule(static)
    for (int64_t i = 0; i < m; ++i)
      d2[size_t(i)] = std::min(d2[size_t(i)], double(sq_dist_f32(x + idx[size_t(i)] * d, ce, d)));
    double total = 0;
    for (int64_t i = 0; i < m; ++i) total += d2[size_t(i)];
    const double u = unif(rng);
    if (!(total > 0)) {  // all remaining points coincide with centroids: pick uniformly
      pick = std::min<int64_t>(int64_t(u * double(m)), m - 1);
      continue;
    }
    const double target = u * total;
    double run = 0;
    pick = -1;
    for (int64_t i = 0; i < m; ++i) {
      run += d2[size_t(i)];
      if (run > target && d2[size_t(i)] > 0) { pick = i; break; }
    }
    if (pick < 0)  // rounding at the very end of the scan: take the last positive-weight point
      for (int64_t i = m - 1; i >= 0; --i)
        if (d2[size_t(i)] > 0) { pick = i; break; }
  }
  return c;
}

}  // namespace

KMeansResult kmeans(const float* x, int64_t n, int64_t d, int64_t k, int64_t niter, uint64_t seed,
                    int threads) {
  threads = resolve_threads(threads);
  std::mt19937_64 rng(seed);
  // Seeding subsample (partial Fisher-Yates): k-means++ costs O(m k d) in k sequential steps;
  // m = max(16k, 4096) keeps it well below one Lloyd iteration on large inputs while still
  // giving every cluster ~16 candidate points.
  const int64_t m = std::min<int64_t>(n, std::max<int64_t>(16 * k, 4096));
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  if (m < n) {
    for (int64_t i = 0; i < m; ++i) {
      std::uniform_int_distribution<int64_t> pickd(i, n - 1);
      std::swap(perm[size_t(i)], perm[size_t(pickd(rng))]);
    }
    perm.resize(size_t(m));
    std::sort(perm.begin(), perm.end());
  }
  KMeansResult out;
  out.centroids = kmeanspp(x, d, perm, k, rng, threads);
  float* C = out.centroids.data();

  std::vector<int64_t> assign(static_cast<size_t>(n));
  std::vector<double> dist(static_cast<size_t>(n));
  std::vector<double> sums(static_cast<size_t>(k * d));
  std::vector<int64_t> counts(static_cast<size_t>(k));
  auto objective = [&]() {
    nearest_centroid(x, n, d, C, k, assign.data(), dist.data(), threads);
    double J = 0;
    for (int64_t i = 0; i < n; ++i) J += dist[size_t(i)];  // fixed order: thread-independent
    return J;
  };
  out.objective.push_back(objective());
  for (int64_t it = 0; it < niter; ++it) {
    // Update step: per-cluster means. Parallel over dimension slices so each sum is
    // accumulated in row order (deterministic for any thread count).
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) counts[size_t(assign[size_t(i)])]++;
    std::fill(sums.begin(), sums.end(), 0.0);
    const int64_t slices = std::min<int64_t>(d, int64_t(threads) * 4);
#pragma omp parallel for num_threads(threads) if(parallel_worth(16 * n * d)) schedule(static)
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t j0 = s * d / slices, j1 = (s + 1) * d / slices;
      for (int64_t i = 0; i < n; ++i) {
        double* dst = sums.data() + assign[size_t(i)] * d;
        const float* src = x + i * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
      }
    }
    // Empty-cluster repair: split the largest cluster by moving its member farthest from the
    // cluster mean into the empty cluster (a singleton; J cannot increase).
    for (int64_t c = 0; c < k; ++c) {
      if (counts[size_t(c)] > 0) continue;
      const int64_t big = int64_t(std::max_element(counts.begin(), counts.end()) - counts.begin());
      const double nb = double(counts[size_t(big)]);
      std::vector<double> mean(static_cast<size_t>(d));
      for (int64_t j = 0; j < d; ++j) mean[size_t(j)] = sums[size_t(big * d + j)] / nb;
      int64_t far = -1;
      double fard = -1;
      for (int64_t i = 0; i < n; ++i) {
        if (assign[size_t(i)] != big) continue;
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d; ++j) {
          const double t = double(x[i * d + j]) - mean[size_t(j)];
          s += t * t;
        }
        if (s > fard) { fard = s; far = i; }
      }
      assign[size_t(far)] = c;
      counts[size_t(big)]--;
      counts[size_t(c)] = 1;
      for (int64_t j = 0; j < d; ++j) {
        sums[size_t(big * d + j)] -= x[far * d + j];
        sums[size_t(c * d + j)] = x[far * d + j];
      }
    }
    for (int64_t c = 0; c < k; ++c) {
      const double inv = 1.0 / double(counts[size_t(c)]);
      for (int64_t j = 0; j < d; ++j) C[c * d + j] = float(sums[size_t(c * d + j)] * inv);
    }
    out.objective.push_back(objective());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Python bindings (validation happens here, before any memory is touched)
// ---------------------------------------------------------------------------------------------
namespace {

void check_finite(const float* p, int64_t count, const char* name, int threads) {
  int64_t bad = 0;
#pragma omp parallel for num_threads(threads) if(parallel_worth(16 * count)) reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i < count; ++i) bad += std::isfinite(p[i]) ? 0 : 1;
  if (bad) fail(std::string(name) + ": contains " + std::to_string(bad) + " NaN or Inf values");
}

int check_threads(int threads) {
  if (threads < 0) fail("threads: expected >= 0 (0 = all cores), got " + std::to_string(threads));
  return resolve_threads(threads);
}

struct CodebookShape { int64_t L, K, d; };

CodebookShape check_codebooks(const py::array_t<float>& cb) {
  CodebookShape s{cb.shape(0), cb.shape(1), cb.shape(2)};
  if (s.L < 1) fail("codebooks: expected at least 1 level, got shape " + shape_str(cb));
  if (s.K < 1) fail("codebooks: expected at least 1 codeword per level (K >= 1), got shape " + shape_str(cb));
  if (s.d < 1) fail("codebooks: expected dimension d >= 1, got shape " + shape_str(cb));
  if (s.K > std::numeric_limits<int32_t>::max() / 2) fail("codebooks: K is too large");
  return s;
}

}  // namespace

void bind_rq(py::module_& m) {
  m.def(
      "rq_encode",
      [](const py::object& x_obj, const py::object& cb_obj, int64_t beam_size, int threads) {
        auto x = checked<float>(x_obj, "x", 2);
        auto cb = checked<float>(cb_obj, "codebooks", 3);
        const auto s = check_codebooks(cb);
        const int64_t n = x.shape(0), d = x.shape(1);
        if (d != s.d)
          fail("x: expected dimension " + std::to_string(s.d) + " to match codebooks " +
               shape_str(cb) + ", got x of shape " + shape_str(x));
        if (beam_size < 1) fail("beam_size: expected >= 1, got " + std::to_string(beam_size));
        const int t = check_threads(threads);
        check_finite(x.data(), n * d, "x", t);
        check_finite(cb.data(), s.L * s.K * s.d, "codebooks", t);
        py::array_t<int64_t> codes({n, s.L});
        {
          py::gil_scoped_release nogil;
          rq_encode_beam(x.data(), n, d, cb.data(), s.L, s.K, beam_size, codes.mutable_data(), t);
        }
        return codes;
      },
      py::arg("x"), py::arg("codebooks"), py::arg("beam_size") = 1, py::arg("threads") = 0,
      "Residual-quantization codes int64[N, L] of x float32[N, d] under codebooks float32[L, K, d]\n"
      "(greedy when beam_size == 1, else beam search over partial code paths).");

  m.def(
      "rq_decode",
      [](const py::object& codes_obj, const py::object& cb_obj, int threads) {
        auto codes = checked<int64_t>(codes_obj, "codes", 2);
        auto cb = checked<float>(cb_obj, "codebooks", 3);
        const auto s = check_codebooks(cb);
        const int64_t n = codes.shape(0);
        if (codes.shape(1) != s.L)
          fail("codes: expected " + std::to_string(s.L) + " levels (columns) to match codebooks " +
               shape_str(cb) + ", got codes of shape " + shape_str(codes));
        const int t = check_threads(threads);
        const int64_t* c = codes.data();
        for (int64_t i = 0; i < n * s.L; ++i)
          if (c[i] < 0 || c[i] >= s.K)
            fail("codes: expected values in [0, " + std::to_string(s.K) + "), got " +
                 std::to_string(c[i]) + " at row " + std::to_string(i / s.L) + ", level " +
                 std::to_string(i % s.L));
        py::array_t<float> out({n, s.d});
        {
          py::gil_scoped_release nogil;
          rq_decode(c, n, s.L, cb.data(), s.K, s.d, out.mutable_data(), t);
        }
        return out;
      },
      py::arg("codes"), py::arg("codebooks"), py::arg("threads") = 0,
      "Reconstruction float32[N, d] = sum over levels of codebooks[l, codes[:, l]].");

  m.def(
      "kmeans",
      [](const py::object& x_obj, int64_t k, int64_t niter, uint64_t seed, int threads) {
        auto x = checked<float>(x_obj, "x", 2);
        const int64_t n = x.shape(0), d = x.shape(1);
        if (k < 1) fail("k: expected >= 1 codewords, got " + std::to_string(k));
        if (d < 1) fail("x: expected dimension d >= 1, got shape " + shape_str(x));
        if (n < k)
          fail("x: fewer vectors than codewords: k-means needs at least k=" + std::to_string(k) +
               " rows, got " + std::to_string(n));
        if (niter < 0) fail("niter: expected >= 0, got " + std::to_string(niter));
        const int t = check_threads(threads);
        check_finite(x.data(), n * d, "x", t);
        KMeansResult r;
        {
          py::gil_scoped_release nogil;
          r = kmeans(x.data(), n, d, k, niter, seed, t);
        }
        py::array_t<float> cent({k, d});
        std::memcpy(cent.mutable_data(), r.centroids.data(), r.centroids.size() * sizeof(float));
        py::array_t<double> obj(py::ssize_t(r.objective.size()));
        std::memcpy(obj.mutable_data(), r.objective.data(), r.objective.size() * sizeof(double));
        return py::make_tuple(cent, obj);
      },
      py::arg("x"), py::arg("k"), py::arg("niter") = 25, py::arg("seed") = 0, py::arg("threads") = 0,
      "Lloyd k-means with k-means++ seeding: (centroids float32[k, d], objective float64[niter+1]),\n"
      "objective[t] = sum_i min_c ||x_i - C_t[c]||^2 for the centroids after t iterations.");

#ifdef RECBASE_WITH_CUDA
  m.def("cuda_device_count", []() { return cuda_device_count(); });
  m.def(
      "rq_encode_cuda",
      [](uintptr_t x, uintptr_t codebooks, uintptr_t norms, uintptr_t codes, int64_t n, int64_t d,
         int64_t levels, int64_t K, uintptr_t stream) {
        if (n < 0 || d < 1 || levels < 1 || K < 1)
          fail("rq_encode_cuda: expected n >= 0, d >= 1, levels >= 1, K >= 1");
        if (n == 0) return;
        if (!x || !codebooks || !norms || !codes) fail("rq_encode_cuda: null device pointer");
        py::gil_scoped_release nogil;
        rq_encode_cuda(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(codebooks),
                       reinterpret_cast<const float*>(norms), reinterpret_cast<int64_t*>(codes), n,
                       d, levels, K, reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("codebooks"), py::arg("norms"), py::arg("codes"), py::arg("n"),
      py::arg("d"), py::arg("levels"), py::arg("K"), py::arg("stream"),
      "Fused greedy RQ encode on device pointers (validated by recbase.ops.rq).");
#else
  m.def("cuda_device_count", []() { return 0; });
#endif
}

}  // namespace recbase
