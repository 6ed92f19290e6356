// The residual-quantization kernels, once per instruction set (rq_kernels.inc compiled by
// rq_isa_{avx512,avx2,base}.cpp); rq.cpp dispatches to one at run time.
#pragma once

#include "rq.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RQ_HAVE_X86_ISAS 1
#else
#define RQ_HAVE_X86_ISAS 0
#endif

namespace recbase {

#define RQ_DECLARE_ISA(ns)                                                                          \
  namespace ns {                                                                                    \
  void rq_encode_greedy(const float* x, int64_t n, int64_t d, const float* codebooks, int64_t levels, \
                        int64_t K, int64_t* codes, int threads);                                    \
  void rq_encode_beam(const float* x, int64_t n, int64_t d, const float* codebooks, int64_t levels,   \
                      int64_t K, int64_t beam, int64_t* codes, int threads);                        \
  void rq_decode(const int64_t* codes, int64_t n, int64_t levels, const float* codebooks, int64_t K,  \
                 int64_t d, float* out, int threads);                                               \
  void nearest_centroid(const float* x, int64_t n, int64_t d, const float* centroids, int64_t K,     \
                        int64_t* assign, double* dist, int threads);                                \
  KMeansResult kmeans(const float* x, int64_t n, int64_t d, int64_t k, int64_t niter, uint64_t seed,  \
                      int threads);                                                                 \
  }

RQ_DECLARE_ISA(isa_base)
#if RQ_HAVE_X86_ISAS
RQ_DECLARE_ISA(isa_avx2)
RQ_DECLARE_ISA(isa_avx512)
#endif
#undef RQ_DECLARE_ISA

// "avx512", "avx2" or "base": the kernels this process runs.
const char* rq_isa_name();

}  // namespace recbase
