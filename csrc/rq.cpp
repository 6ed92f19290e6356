// Residual quantization engine (CPU): see rq.h for the math. The kernels (rq_kernels.inc) are
// compiled for three instruction sets (rq_isa_{avx512,avx2,base}.cpp); this file picks one at
// run time from the CPU's features, so one build runs on every x86-64 CPU.
#include "rq.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "common.h"
#include "rq_isa.h"
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

inline bool parallel_worth(int64_t work) { return work >= (int64_t(1) << 23); }

enum class Isa { base, avx2, avx512 };

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The best path this CPU runs; RECBASE_ISA=base|avx2|avx512 asks for a lower one (tests, benches),
// never a higher one than the CPU has.
Isa detect_isa() {
  Isa best = !RQ_HAVE_X86_ISAS ? Isa::base : cpu_has_avx512() ? Isa::avx512 : cpu_has_avx2() ? Isa::avx2 : Isa::base;
  const char* want = std::getenv("RECBASE_ISA");
  if (want && *want) {
    const std::string w(want);
    Isa asked = w == "avx512" ? Isa::avx512 : w == "avx2" ? Isa::avx2 : Isa::base;
    if (w != "avx512" && w != "avx2" && w != "base") asked = best;  // unknown: ignored (info says which)
    if (asked < best) best = asked;
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

}  // namespace

const char* rq_isa_name() {
  switch (isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

#if RQ_HAVE_X86_ISAS
#define RQ_DISPATCH(fn, ...)                                        \
  switch (isa()) {                                                  \
    case Isa::avx512: return isa_avx512::fn(__VA_ARGS__);           \
    case Isa::avx2: return isa_avx2::fn(__VA_ARGS__);               \
    default: return isa_base::fn(__VA_ARGS__);                      \
  }
#else
#define RQ_DISPATCH(fn, ...) return isa_base::fn(__VA_ARGS__);
#endif

void rq_encode_greedy(const float* x, int64_t n, int64_t d, const float* codebooks, int64_t levels,
                      int64_t K, int64_t* codes, int threads) {
  RQ_DISPATCH(rq_encode_greedy, x, n, d, codebooks, levels, K, codes, threads)
}

void rq_encode_beam(const float* x, int64_t n, int64_t d, const float* codebooks, int64_t levels,
                    int64_t K, int64_t beam, int64_t* codes, int threads) {
  RQ_DISPATCH(rq_encode_beam, x, n, d, codebooks, levels, K, beam, codes, threads)
}

void rq_decode(const int64_t* codes, int64_t n, int64_t levels, const float* codebooks, int64_t K,
               int64_t d, float* out, int threads) {
  RQ_DISPATCH(rq_decode, codes, n, levels, codebooks, K, d, out, threads)
}

void nearest_centroid(const float* x, int64_t n, int64_t d, const float* centroids, int64_t K,
                      int64_t* assign, double* dist, int threads) {
  RQ_DISPATCH(nearest_centroid, x, n, d, centroids, K, assign, dist, threads)
}

KMeansResult kmeans(const float* x, int64_t n, int64_t d, int64_t k, int64_t niter, uint64_t seed,
                    int threads) {
  RQ_DISPATCH(kmeans, x, n, d, k, niter, seed, threads)
}

// ---------------------------------------------------------------------------------------------
// Python bindings (validation happens here, before any memory is touched)
// ---------------------------------------------------------------------------------------------
namespace {

// The kernels compare squared distances ||x||^2 - 2 x.c + ||c||^2 in float32: with every |value|
// <= B = sqrt(FLT_MAX / (4 d)) none of them can overflow, above it they become inf and every code
// compares equal (all zeros, silently). So values are refused beyond B, with NaN and Inf.
void check_values(const float* p, int64_t count, int64_t d, const char* name, int threads) {
  int64_t bad = 0;
  float peak = 0.0f;
#pragma omp parallel for num_threads(threads) if(parallel_worth(16 * count)) reduction(+ : bad) reduction(max : peak) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    if (std::isfinite(p[i])) peak = std::max(peak, std::fabs(p[i]));
    else bad += 1;
  }
  if (bad) fail(std::string(name) + ": contains " + std::to_string(bad) + " NaN or Inf values");
  const double limit = std::sqrt(double(std::numeric_limits<float>::max()) / (4.0 * double(d)));
  if (double(peak) > limit)
    fail(std::string(name) + ": expected values of magnitude <= " + std::to_string(limit) +
         " (float32 squared distances overflow beyond it for d=" + std::to_string(d) + "), got " +
         std::to_string(peak));
}

// libgomp exits the whole process when it cannot create the threads asked for.
constexpr int kMaxThreads = 1024;
// Lloyd iterations: the objective has niter + 1 entries and every iteration is a full pass, so a
// crafted niter (2^40) would run for days; FAISS uses 25, scikit-learn at most 300.
constexpr int64_t kMaxKMeansIters = 10000;

int check_threads(int threads) {
  if (threads < 0) fail("threads: expected >= 0 (0 = all cores), got " + std::to_string(threads));
  if (threads > kMaxThreads)
    fail("threads: expected at most " + std::to_string(kMaxThreads) + ", got " + std::to_string(threads));
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
  m.def("rq_isa", &rq_isa_name,
        "The instruction set the RQ kernels run with here: 'avx512', 'avx2' or 'base' (chosen at run "
        "time from the CPU; RECBASE_ISA=base|avx2 asks for a lower one).");
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
        check_values(x.data(), n * d, d, "x", t);
        check_values(cb.data(), s.L * s.K * s.d, s.d, "codebooks", t);
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
        check_values(cb.data(), s.L * s.K * s.d, s.d, "codebooks", t);
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
        if (niter < 0 || niter > kMaxKMeansIters)
          fail("niter: expected 0.." + std::to_string(kMaxKMeansIters) + ", got " + std::to_string(niter));
        const int t = check_threads(threads);
        check_values(x.data(), n * d, d, "x", t);
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
