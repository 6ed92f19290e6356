// Residual quantization kernels for AVX2 + FMA (Haswell / Zen and newer), chosen at run time by rq.cpp only
// on CPUs that have it. The target pragma comes after every include (rq_isa_prelude.h).
#include "rq_isa_prelude.h"

#if RQ_HAVE_X86_ISAS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define RQ_ISA isa_avx2
#define RQ_SIMD 256
namespace recbase {
namespace RQ_ISA {
#include "rq_kernels.inc"
}  // namespace RQ_ISA
}  // namespace recbase

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
