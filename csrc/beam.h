// Trie-constrained beam step: one decode level of beam search over a ConceptTrie's CSR arrays.
//
// Math: for user b, beam w (trie state s = states[b,w] >= 0) and each child node v of s,
// i.e. v in [offsets[s], offsets[s+1]), candidate score = scores[b,w] + log_probs[b*W+w, codes[v]].
// Keep the best `num_beams` candidates per user by (score desc, w*K + code asc); dead beams
// (state -1) have no candidates; missing slots get score -inf, parent/token/state -1.
// Cost O(sum of children) per user: the children's scores are gathered into one cached buffer;
// a threshold from a strided sample pre-filters them (exact: it falls back to all candidates if
// fewer than num_beams pass) and nth_element + sort rank the survivors. Never a vocabulary mask.
#pragma once
#include <cstdint>

namespace recbase {

// CPU: threads over users when work_estimate (total children of live states) is large.
// States must lie in [-1, num_nodes) with in-range offsets (checked by the caller); child codes
// outside [0, K) are skipped and counted: the return value (0 = ok). With `bad_values`, the
// candidates' log-probs that are NaN or +inf (a broken model) are counted there.
int64_t constrained_beam_step_cpu(const float* log_probs, const float* beam_scores,
                                  const int64_t* states, const int64_t* offsets,
                                  const int64_t* codes, int64_t num_nodes, int64_t batch,
                                  int64_t width, int64_t codebook_size, int64_t num_beams,
                                  float* out_scores, int64_t* out_parent, int64_t* out_token,
                                  int64_t* out_state, int64_t work_estimate,
                                  int64_t* bad_values = nullptr);

#ifdef RECBASE_WITH_CUDA
// CUDA: one thread block per user; all pointers are device pointers; `stream` is a cudaStream_t.
// Returns a CUDA error string, empty on success. Out-of-range states/codes count as dead.
const char* constrained_beam_step_cuda(const float* log_probs, const float* beam_scores,
                                       const int64_t* states, const int64_t* offsets,
                                       const int64_t* codes, int64_t num_nodes, int64_t batch,
                                       int64_t width, int64_t codebook_size, int64_t num_beams,
                                       float* out_scores, int64_t* out_parent,
                                       int64_t* out_token, int64_t* out_state, void* stream);
#endif

}  // namespace recbase
