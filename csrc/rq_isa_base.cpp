// Residual quantization kernels for any x86-64 (or other) CPU: the portable 4-lane path.
#include "rq_isa_prelude.h"

#define RQ_ISA isa_base
#define RQ_SIMD 0
namespace recbase {
namespace RQ_ISA {
#include "rq_kernels.inc"
}  // namespace RQ_ISA
}  // namespace recbase
