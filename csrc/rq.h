// Residual quantization (RQ) engine: k-means, greedy/beam encoding and decoding.
//
// Math (as FAISS ResidualQuantizer / RQ-KMeans):
//   r_0 = x;  c_l = argmin_k ||r_l - e_{l,k}||^2 = argmin_k (||e_{l,k}||^2 - 2 <r_l, e_{l,k}>);
//   r_{l+1} = r_l - e_{l,c_l};  decode x_hat = sum_l e_{l,c_l}, hence ||x - x_hat||^2 = ||r_L||^2.
// Beam encoding keeps the `beam` partial code paths with the smallest ||r_{l+1}||^2 per level.
// k-means: Lloyd iterations minimising J = sum_i ||x_i - c_{a(i)}||^2 from k-means++ seeds.
//
// The CPU encoder is a blocked GEMM (rows of residuals x packed codeword panels) with a
// register-tiled FMA micro-kernel whose epilogue fuses the argmin, so no N x K distance
// matrix is ever stored; residual blocks stay in L1/L2 across all levels.
#pragma once
#include <cstdint>
#include <vector>

namespace recbase {

// Greedy RQ encoding. x: [n, d]; codebooks: [levels, K, d]; codes: [n, levels] (output).
void rq_encode_greedy(const float* x, int64_t n, int64_t d, const float* codebooks,
                      int64_t levels, int64_t K, int64_t* codes, int threads);

// Beam RQ encoding (beam >= 1); beam == 1 is equivalent to greedy up to distance ties.
void rq_encode_beam(const float* x, int64_t n, int64_t d, const float* codebooks,
                    int64_t levels, int64_t K, int64_t beam, int64_t* codes, int threads);

// x_hat[i] = sum_l codebooks[l, codes[i, l]]. Codes must already be range-checked.
void rq_decode(const int64_t* codes, int64_t n, int64_t levels, const float* codebooks,
               int64_t K, int64_t d, float* out, int threads);

// Nearest centroid per row (argmin_k ||x_i - c_k||^2) and, if dist != nullptr, the exact
// squared distance to it (float64 accumulation).
void nearest_centroid(const float* x, int64_t n, int64_t d, const float* centroids, int64_t K,
                      int64_t* assign, double* dist, int threads);

struct KMeansResult {
  std::vector<float> centroids;  // [k, d]
  std::vector<double> objective; // [niter + 1]: J after the assignment step of C_0..C_niter
};

// Lloyd k-means. Seeds: k-means++ on a random subsample of min(n, max(16 k, 4096)) rows.
// Empty clusters are repaired by splitting the largest cluster: its member farthest from its
// centroid becomes the empty cluster's only member, which never increases J.
// Deterministic for a fixed (seed); the result does not depend on `threads`.
KMeansResult kmeans(const float* x, int64_t n, int64_t d, int64_t k, int64_t niter,
                    uint64_t seed, int threads);

int resolve_threads(int threads);

#ifdef RECBASE_WITH_CUDA
// rq.cu. Fused greedy encode on device pointers: x [n, d], codebooks [levels, K, d],
// norms [levels, K] (= ||e||^2), codes [n, levels] int64; runs on `stream` (cudaStream_t).
int cuda_device_count();
void rq_encode_cuda(const float* x, const float* codebooks, const float* norms, int64_t* codes,
                    int64_t n, int64_t d, int64_t levels, int64_t K, void* stream);
#endif

}  // namespace recbase
