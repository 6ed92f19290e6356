// Fused greedy residual-quantization encoder (CUDA); math in rq.h.
//
// One thread block owns a tile of TM rows. Their residuals live in shared memory for all levels;
// per level the codebook streams through shared memory in [64 codewords x 32 dims] tiles, each
// thread accumulates <r, e> for RPT rows x 4 codewords in registers, the epilogue turns them into
// ||e||^2 - 2 <r, e> and keeps a running (min, argmin); a half-warp shuffle reduces the argmin per
// row, then the residual is updated in shared memory. No N x K distance matrix is materialised.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <stdexcept>
#include <string>

#include "rq.h"

namespace recbase {
namespace {

constexpr int kThreads = 256;
constexpr int kTX = 16;                           // threads along codewords (a half warp)
constexpr int kTY = kThreads / kTX;               // threads along rows
constexpr int kCodesPerThread = 4;
constexpr int kTK = kTX * kCodesPerThread;        // codewords per shared tile
constexpr int kTD = 32;                           // dimensions per shared tile
constexpr int kLdE = kTD + 1;                     // +1: conflict-free column reads

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("rq_encode_cuda: ") + what + ": " + cudaGetErrorString(e));
}

template <int RPT>
__global__ void __launch_bounds__(kThreads, 2)  // min 2 blocks/SM: ~80 registers, no spills
rq_encode_kernel(const float* __restrict__ x, const float* __restrict__ cb,
                 const float* __restrict__ norms, int64_t* __restrict__ codes, int64_t n, int d,
                 int levels, int K, int ld_res) {
  constexpr int TM = kTY * RPT;
  extern __shared__ float smem[];
  float* res = smem;                                            // [TM][ld_res]
  float* es = res + TM * ld_res;                                // [kTK][kLdE]
  int* code_s = reinterpret_cast<int*>(es + kTK * kLdE);        // [TM]
  const int tid = threadIdx.x, tx = tid % kTX, ty = tid / kTX;
  const int64_t row0 = int64_t(blockIdx.x) * TM;

  // Residual tile r_0 = x; rows past n and columns past d are zero.
  for (int idx = tid; idx < TM * ld_res; idx += kThreads) {
    const int r = idx / ld_res, j = idx % ld_res;
    const int64_t row = row0 + r;
    res[idx] = (row < n && j < d) ? x[row * d + j] : 0.f;
  }
  __syncthreads();

  for (int l = 0; l < levels; ++l) {
    const float* cbl = cb + int64_t(l) * K * d;
    const float* nl = norms + int64_t(l) * K;
    float best[RPT];
    int bidx[RPT];
#pragma unroll
    for (int r = 0; r < RPT; ++r) { best[r] = FLT_MAX; bidx[r] = 0; }

    for (int k0 = 0; k0 < K; k0 += kTK) {
      float acc[RPT][kCodesPerThread];
#pragma unroll
      for (int r = 0; r < RPT; ++r)
#pragma unroll
        for (int q = 0; q < kCodesPerThread; ++q) acc[r][q] = 0.f;

      for (int d0 = 0; d0 < d; d0 += kTD) {
        // Codebook tile, coalesced along d; out-of-range entries are zero.
        for (int idx = tid; idx < kTK * kTD; idx += kThreads) {
          const int kk = idx / kTD, dd = idx % kTD;
          const int k = k0 + kk, j = d0 + dd;
          es[kk * kLdE + dd] = (k < K && j < d) ? cbl[int64_t(k) * d + j] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int dd = 0; dd < kTD; ++dd) {
          float rv[RPT];
#pragma unroll
          for (int r = 0; r < RPT; ++r) rv[r] = res[(ty + r * kTY) * ld_res + d0 + dd];
#pragma unroll
          for (int q = 0; q < kCodesPerThread; ++q) {
            const float ev = es[(tx + q * kTX) * kLdE + dd];
#pragma unroll
            for (int r = 0; r < RPT; ++r) acc[r][q] = fmaf(rv[r], ev, acc[r][q]);
          }
        }
        __syncthreads();
      }
      // Epilogue: codewords are visited in increasing order, so strict < keeps the lowest index.
#pragma unroll
      for (int q = 0; q < kCodesPerThread; ++q) {
        const int k = k0 + tx + q * kTX;
        if (k < K) {
          const float nk = nl[k];
#pragma unroll
          for (int r = 0; r < RPT; ++r) {
            const float dist = fmaf(-2.f, acc[r][q], nk);
            if (dist < best[r]) { best[r] = dist; bidx[r] = k; }
          }
        }
      }
    }
    // Argmin across the 16 lanes sharing a row (xor offsets < 16 stay inside the half warp).
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
#pragma unroll
      for (int off = kTX / 2; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best[r], off);
        const int oi = __shfl_xor_sync(0xffffffffu, bidx[r], off);
        if (ov < best[r] || (ov == best[r] && oi < bidx[r])) { best[r] = ov; bidx[r] = oi; }
      }
      if (tx == 0) code_s[ty + r * kTY] = bidx[r];
    }
    __syncthreads();
    for (int r = tid; r < TM; r += kThreads) {
      const int64_t row = row0 + r;
      if (row < n) codes[row * levels + l] = code_s[r];
    }
    if (l + 1 < levels) {
      for (int idx = tid; idx < TM * d; idx += kThreads) {
        const int r = idx / d, j = idx % d;
        res[r * ld_res + j] -= cbl[int64_t(code_s[r]) * d + j];
      }
    }
    __syncthreads();
  }
}

size_t smem_bytes(int tm, int ld_res) {
  return (size_t(tm) * ld_res + size_t(kTK) * kLdE) * sizeof(float) + size_t(tm) * sizeof(int);
}

template <int RPT>
void launch(const float* x, const float* cb, const float* norms, int64_t* codes, int64_t n, int d,
            int levels, int K, int ld_res, size_t bytes, cudaStream_t stream) {
  constexpr int TM = kTY * RPT;
  check_cuda(cudaFuncSetAttribute(rq_encode_kernel<RPT>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "cudaFuncSetAttribute");
  const int64_t blocks = (n + TM - 1) / TM;
  if (blocks > INT_MAX) throw std::invalid_argument("rq_encode_cuda: x has too many rows");
  rq_encode_kernel<RPT><<<unsigned(blocks), kThreads, bytes, stream>>>(x, cb, norms, codes, n, d,
                                                                       levels, K, ld_res);
  check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return count;
}

void rq_encode_cuda(const float* x, const float* codebooks, const float* norms, int64_t* codes,
                    int64_t n, int64_t d, int64_t levels, int64_t K, void* stream) {
  if (n == 0) return;
  if (d > (INT_MAX / 64) || K > INT_MAX / 2 || levels > INT_MAX)
    throw std::invalid_argument("rq_encode_cuda: d, K or levels too large");
  int dev = 0, max_smem = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  // Row stride: d rounded up to whole dimension tiles, +1 so the two rows read by one warp
  // fall into different banks.
  const int ld_res = int((d + kTD - 1) / kTD * kTD + 1);
  auto s = static_cast<cudaStream_t>(stream);
  if (smem_bytes(2 * kTY, ld_res) <= size_t(max_smem))
    launch<2>(x, codebooks, norms, codes, n, int(d), int(levels), int(K), ld_res,
              smem_bytes(2 * kTY, ld_res), s);
  else if (smem_bytes(kTY, ld_res) <= size_t(max_smem))
    launch<1>(x, codebooks, norms, codes, n, int(d), int(levels), int(K), ld_res,
              smem_bytes(kTY, ld_res), s);
  else
    throw std::invalid_argument("rq_encode_cuda: d=" + std::to_string(d) +
                                " is too large for the shared-memory residual tile");
}

}  // namespace recbase
