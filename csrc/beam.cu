// Trie-constrained beam step, CUDA engine (see beam.h for the math).
//
// One thread block per user. The block enumerates the user's candidates (children of each live
// beam's trie state, flattened over beams through a prefix sum of child counts in shared memory)
// and extracts the top `num_beams` in `num_beams` rounds: round r takes, with a block-wide
// argmax, the best candidate strictly worse than the one taken in round r-1 under the total order
// (score desc, key = w*K + code asc). O(num_beams * candidates / threads) per block, no scratch
// memory, deterministic, identical to the CPU engine's order.
#ifdef RECBASE_WITH_CUDA
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "beam.h"

namespace recbase {
namespace {

constexpr int kThreads = 256;

struct Pick {
  float score;
  long long key;   // w * K + code; -1 when no candidate
  long long node;  // child node id; -1 when no candidate
};

__device__ __forceinline__ bool pick_better(const Pick& a, const Pick& b) {
  if (a.node < 0) return false;
  if (b.node < 0) return true;
  return a.score > b.score || (a.score == b.score && a.key < b.key);
}

__device__ __forceinline__ Pick warp_best(Pick p) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    Pick o;
    o.score = __shfl_down_sync(0xffffffffu, p.score, delta);
    o.key = __shfl_down_sync(0xffffffffu, p.key, delta);
    o.node = __shfl_down_sync(0xffffffffu, p.node, delta);
    if (pick_better(o, p)) p = o;
  }
  return p;
}

__global__ void constrained_beam_step_kernel(const float* __restrict__ log_probs,
                                             const float* __restrict__ beam_scores,
                                             const int64_t* __restrict__ states,
                                             const int64_t* __restrict__ offsets,
                                             const int64_t* __restrict__ codes, int64_t num_nodes,
                                             int64_t W, int64_t K, int64_t num_beams,
                                             float* __restrict__ out_scores,
                                             int64_t* __restrict__ out_parent,
                                             int64_t* __restrict__ out_token,
                                             int64_t* __restrict__ out_state) {
  extern __shared__ long long smem_ll[];  // long long: 8-byte alignment of the dynamic block
  // Layout: prefix[W+1] (int64), first_child[W] (int64), base[W] (float).
  long long* prefix = smem_ll;
  long long* first_child = prefix + (W + 1);
  float* base = reinterpret_cast<float*>(first_child + W);
  __shared__ Pick warp_picks[kThreads / 32];
  __shared__ Pick chosen;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  for (int64_t w = tid; w < W; w += blockDim.x) {
    const int64_t s = states[b * W + w];
    long long count = 0, first = 0;
    if (s >= 0 && s < num_nodes) {
      first = offsets[s];
      const long long last = offsets[s + 1];
      if (first >= 0 && last <= num_nodes && last > first) count = last - first;
    }
    prefix[w + 1] = count;  // turned into an inclusive prefix sum below
    first_child[w] = first;
    base[w] = beam_scores[b * W + w];
  }
  __syncthreads();
  if (tid == 0) {
    prefix[0] = 0;
    for (int64_t w = 0; w < W; ++w) prefix[w + 1] += prefix[w];
  }
  __syncthreads();
  const long long total = prefix[W];

  float last_score = INFINITY;
  long long last_key = -1;
  for (int64_t r = 0; r < num_beams; ++r) {
    Pick best{-INFINITY, -1, -1};
    for (long long i = tid; i < total; i += blockDim.x) {
      // Beam of flat candidate i: last w with prefix[w] <= i.
      int64_t lo = 0, hi = W;  // invariant: prefix[lo] <= i < prefix[hi]
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) >> 1;
        if (prefix[mid] <= i) lo = mid; else hi = mid;
      }
      const long long node = first_child[lo] + (i - prefix[lo]);
      const long long c = codes[node];
      if (c < 0 || c >= K) continue;
      float sc = base[lo] + log_probs[(b * W + lo) * K + c];
      if (isnan(sc)) sc = -INFINITY;
      const long long key = lo * K + c;
      const bool eligible = sc < last_score || (sc == last_score && key > last_key);
      const Pick cand{sc, key, node};
      if (eligible && pick_better(cand, best)) best = cand;
    }
    best = warp_best(best);
    if ((tid & 31) == 0) warp_picks[tid >> 5] = best;
    __syncthreads();
    if (tid < 32) {
      Pick p = tid < (blockDim.x >> 5) ? warp_picks[tid] : Pick{-INFINITY, -1, -1};
      p = warp_best(p);
      if (tid == 0) chosen = p;
    }
    __syncthreads();
    const Pick p = chosen;
    if (p.node < 0) {  // no candidate left: pad the remaining slots
      for (int64_t q = r + tid; q < num_beams; q += blockDim.x) {
        out_scores[b * num_beams + q] = -INFINITY;
        out_parent[b * num_beams + q] = -1;
        out_token[b * num_beams + q] = -1;
        out_state[b * num_beams + q] = -1;
      }
      break;
    }
    if (tid == 0) {
      out_scores[b * num_beams + r] = p.score;
      out_parent[b * num_beams + r] = p.key / K;
      out_token[b * num_beams + r] = p.key % K;
      out_state[b * num_beams + r] = p.node;
    }
    last_score = p.score;
    last_key = p.key;
    __syncthreads();  // `chosen` and `warp_picks` are rewritten next round
  }
}

}  // namespace

const char* constrained_beam_step_cuda(const float* log_probs, const float* beam_scores,
                                       const int64_t* states, const int64_t* offsets,
                                       const int64_t* codes, int64_t num_nodes, int64_t batch,
                                       int64_t width, int64_t codebook_size, int64_t num_beams,
                                       float* out_scores, int64_t* out_parent,
                                       int64_t* out_token, int64_t* out_state, void* stream) {
  if (batch == 0) return "";
  const size_t smem = static_cast<size_t>(width + 1) * sizeof(long long) +
                      static_cast<size_t>(width) * sizeof(long long) +
                      static_cast<size_t>(width) * sizeof(float);
  auto s = static_cast<cudaStream_t>(stream);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(constrained_beam_step_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  constrained_beam_step_kernel<<<static_cast<unsigned>(batch), kThreads, smem, s>>>(
      log_probs, beam_scores, states, offsets, codes, num_nodes, width, codebook_size, num_beams,
      out_scores, out_parent, out_token, out_state);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace recbase
#endif  // RECBASE_WITH_CUDA
