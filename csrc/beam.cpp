// Trie-constrained beam step, CPU engine + Python bindings (see beam.h).
#include "beam.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "common.h"

namespace recbase {

namespace {
// A candidate packed in one integer so that "better" is a plain unsigned compare:
// high 32 bits = the score mapped to an order-preserving uint32, low 32 bits = ~key, where
// key = w * K + code (smaller key wins ties: the deterministic order of results).
// Sorting and nth_element on 8-byte integers run about twice as fast as on a struct.
inline uint32_t ordered_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float from_ordered_bits(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint64_t pack(float score, uint32_t key) {
  return (static_cast<uint64_t>(ordered_bits(score)) << 32) | static_cast<uint32_t>(~key);
}

// Exact top-`keep` of n scored candidates, best first, into `out` (needs room for n).
// A threshold t taken from a strided sample is a safe pre-filter whenever at least `keep`
// candidates reach it: the keep-th best then also reaches t, so no member of the top is lost
// (ties at t included). Too few survivors (rare) fall back to all candidates.
size_t select_best(const float* vals, const uint32_t* keys, size_t n, size_t keep,
                   uint64_t* out, std::vector<float>& sample) {
  float t = -std::numeric_limits<float>::infinity();
  const size_t S = std::min(n, std::max<size_t>(256, 4 * keep));
  const size_t r = 2 * keep * S / std::max<size_t>(n, 1) + 8;  // ~2 keep survivors expected
  if (n > 4 * keep + 64 && 2 * r < S) {
    sample.resize(S);
    for (size_t i = 0; i < S; ++i) sample[i] = vals[i * n / S];
    std::nth_element(sample.begin(), sample.begin() + (r - 1), sample.end(), std::greater<float>());
    t = sample[r - 1];
  }
  size_t m = 0;
  for (size_t i = 0; i < n; ++i) {  // branchless compaction
    out[m] = pack(vals[i], keys[i]);
    m += !(vals[i] < t);
  }
  if (m < keep && m < n) {  // the sample was unlucky: take everyone
    for (size_t i = 0; i < n; ++i) out[i] = pack(vals[i], keys[i]);
    m = n;
  }
  if (m > keep) {
    std::nth_element(out, out + (keep - 1), out + m, std::greater<uint64_t>());
    m = keep;
  }
  std::sort(out, out + m, std::greater<uint64_t>());
  return m;
}
}  // namespace

int64_t constrained_beam_step_cpu(const float* log_probs, const float* beam_scores,
                                  const int64_t* states, const int64_t* offsets,
                                  const int64_t* codes, int64_t num_nodes, int64_t B, int64_t W,
                                  int64_t K, int64_t num_beams, float* out_scores,
                                  int64_t* out_parent, int64_t* out_token, int64_t* out_state,
                                  int64_t work_estimate, int64_t* bad_values) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float pos_inf = std::numeric_limits<float>::infinity();
  int64_t bad_codes = 0, bad_lp = 0;
  // Threads only pay off (and only behave on a busy machine) when there is real work.
#pragma omp parallel reduction(+ : bad_codes, bad_lp) if (work_estimate > 16384 && B > 1)
  {
    // Per user: gather every valid child's score (and key w * K + code) into one buffer that
    // stays in cache, then select the best num_beams from it.
    std::vector<float> vals, sample;
    std::vector<uint32_t> keys;
    std::vector<uint64_t> best;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      size_t n = 0;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t s = states[b * W + w];
        if (s < 0 || s >= num_nodes) continue;  // dead beam (range validated by the caller)
        const int64_t first = std::max<int64_t>(offsets[s], 0);
        const int64_t last = std::min<int64_t>(offsets[s + 1], num_nodes);
        const int64_t count = last - first;
        if (count <= 0) continue;
        // The children read scattered entries of the beam's log-prob row, which the hardware
        // prefetcher cannot predict: fetch a later beam's row while this one is processed.
        if (w + 2 < W) {
          const char* next = reinterpret_cast<const char*>(log_probs + (b * W + w + 2) * K);
          for (int64_t byte = 0; byte < K * 4; byte += 64) __builtin_prefetch(next + byte);
        }
        if (vals.size() < n + count) {
          vals.resize(2 * (n + count));
          keys.resize(2 * (n + count));
        }
        const float base = beam_scores[b * W + w];
        const float* __restrict row = log_probs + (b * W + w) * K;
        const int64_t* __restrict cc = codes + first;
        float* __restrict v = vals.data() + n;
        uint32_t* __restrict k = keys.data() + n;
        const uint32_t key0 = static_cast<uint32_t>(w * K);
        int64_t out_of_range = 0;
        for (int64_t j = 0; j < count; ++j)
          out_of_range += (static_cast<uint64_t>(cc[j]) >= static_cast<uint64_t>(K));
        if (out_of_range) {  // malformed trie arrays or a smaller codebook: reported, skipped
          int64_t m = 0;
          for (int64_t j = 0; j < count; ++j) {
            if (cc[j] < 0 || cc[j] >= K) { ++bad_codes; continue; }
            bad_lp += std::isnan(row[cc[j]]) || row[cc[j]] == pos_inf;
            const float x = base + row[cc[j]];
            v[m] = std::isnan(x) ? neg_inf : x;
            k[m++] = key0 + static_cast<uint32_t>(cc[j]);
          }
          n += m;
          continue;
        }
        int64_t bad_here = 0;
        for (int64_t j = 0; j < count; ++j) {
          const float lp = row[cc[j]];
          bad_here += std::isnan(lp) || lp == pos_inf;
          const float x = base + lp;
          v[j] = std::isnan(x) ? neg_inf : x;  // NaN ranks as -inf
          k[j] = key0 + static_cast<uint32_t>(cc[j]);
        }
        bad_lp += bad_here;
        n += count;
      }
      if (best.size() < n) best.resize(n);
      const size_t kept = n ? select_best(vals.data(), keys.data(), n,
                                          static_cast<size_t>(num_beams), best.data(), sample)
                            : 0;
      for (int64_t r = 0; r < num_beams; ++r) {
        const int64_t o = b * num_beams + r;
        if (r < static_cast<int64_t>(kept)) {
          const int64_t key = static_cast<uint32_t>(~static_cast<uint32_t>(best[r]));
          const int64_t w = key / K, code = key % K;
          // The child node: children are sorted by code in tries built here; search, and fall
          // back to a scan for hand-made arrays.
          const int64_t s = states[b * W + w];
          const int64_t first = std::max<int64_t>(offsets[s], 0);
          const int64_t last = std::min<int64_t>(offsets[s + 1], num_nodes);
          const int64_t* it = std::lower_bound(codes + first, codes + last, code);
          if (it == codes + last || *it != code) it = std::find(codes + first, codes + last, code);
          out_scores[o] = from_ordered_bits(static_cast<uint32_t>(best[r] >> 32));
          out_parent[o] = w;
          out_token[o] = code;
          out_state[o] = it - codes;
        } else {
          out_scores[o] = neg_inf;
          out_parent[o] = -1;
          out_token[o] = -1;
          out_state[o] = -1;
        }
      }
    }
  }
  if (bad_values) *bad_values = bad_lp;
  return bad_codes;
}

namespace {
struct StepResult {
  py::array_t<float> scores;
  py::array_t<int64_t> parent, token, state;
  int64_t width = 0;  // beams per user of the input (W)
  int64_t bad_values = 0;
};

// Validates the CPU arrays (before any memory is read through them), runs the step without the
// GIL, and refuses child codes outside [0, K).
StepResult run_step_cpu(const py::handle& lp_obj, const py::handle& sc_obj, const py::handle& st_obj,
                        const py::handle& off_obj, const py::handle& codes_obj, int64_t num_beams) {
  auto log_probs = checked<float>(lp_obj, "log_probs", 2);
  auto scores = checked<float>(sc_obj, "beam_scores", 2);
  auto states = checked<int64_t>(st_obj, "states", 2);
  auto offsets = checked<int64_t>(off_obj, "offsets", 1);
  auto codes = checked<int64_t>(codes_obj, "codes", 1);
  const int64_t B = scores.shape(0), W = scores.shape(1), K = log_probs.shape(1);
  const int64_t n = codes.shape(0);
  if (num_beams < 1) fail("num_beams: expected >= 1, got " + std::to_string(num_beams));
  if (W * K >= (int64_t{1} << 32))  // candidate keys w * K + code are 32-bit
    fail("beam_scores/log_probs: beams * codebook size must be < 2^32, got " +
         std::to_string(W) + " * " + std::to_string(K));
  if (states.shape(0) != B || states.shape(1) != W)
    fail("states: expected shape " + shape_str(scores) + " (like beam_scores), got " +
         shape_str(states));
  if (log_probs.shape(0) != B * W)
    fail("log_probs: expected " + std::to_string(B * W) + " rows (batch * beams), got " +
         shape_str(log_probs));
  if (offsets.shape(0) != n + 1)
    fail("offsets: expected length len(codes) + 1 = " + std::to_string(n + 1) + ", got " +
         std::to_string(offsets.shape(0)));
  const int64_t* st = states.data();
  const int64_t* off = offsets.data();
  const int64_t* cd = codes.data();
  int64_t work = 0;
  for (int64_t i = 0; i < B * W; ++i) {
    const int64_t s = st[i];
    if (s < -1 || s >= n)
      fail("states: node " + std::to_string(s) + " outside [-1, num_nodes=" + std::to_string(n) +
           "): states from another trie?");
    if (s < 0) continue;
    if (off[s] < 0 || off[s] > off[s + 1] || off[s + 1] > n)
      fail("offsets: malformed children range of node " + std::to_string(s));
    work += off[s + 1] - off[s];
  }
  StepResult r{py::array_t<float>({B, num_beams}), py::array_t<int64_t>({B, num_beams}),
               py::array_t<int64_t>({B, num_beams}), py::array_t<int64_t>({B, num_beams}), W};
  float* os = r.scores.mutable_data();
  int64_t* op = r.parent.mutable_data();
  int64_t* ot = r.token.mutable_data();
  int64_t* ox = r.state.mutable_data();
  int64_t bad_codes;
  {
    py::gil_scoped_release release;
    bad_codes = constrained_beam_step_cpu(log_probs.data(), scores.data(), st, off, cd, n, B, W, K,
                                          num_beams, os, op, ot, ox, work, &r.bad_values);
  }
  if (bad_codes)
    fail("codes: " + std::to_string(bad_codes) + " child codes outside [0, K=" + std::to_string(K) +
         ") (log_probs width): trie of another codebook?");
  return r;
}
}  // namespace

void bind_beam(py::module_& m) {
  m.def(
      "constrained_beam_step",
      [](const py::handle& lp, const py::handle& sc, const py::handle& st, const py::handle& off,
         const py::handle& codes, int64_t num_beams) {
        StepResult r = run_step_cpu(lp, sc, st, off, codes, num_beams);
        return py::make_tuple(r.scores, r.parent, r.token, r.state);
      },
      py::arg("log_probs"), py::arg("beam_scores"), py::arg("states"), py::arg("offsets"),
      py::arg("codes"), py::arg("num_beams"),
      "One trie-constrained beam step on CPU arrays; returns (scores, parent, token, state).");
  m.def(
      "beam_search_level",
      [](const py::handle& lp, const py::handle& sc, const py::handle& st, const py::handle& off,
         const py::handle& codes, int64_t num_beams) {
        // One level of the search driver: the step, then the bookkeeping the next level needs --
        // each new beam's parent row (b * W + parent; a dead slot points at its user's first row)
        // and its token (0 for a dead slot), so no tensor work runs between native calls.
        StepResult r = run_step_cpu(lp, sc, st, off, codes, num_beams);
        const int64_t B = r.scores.shape(0), W = r.width;
        py::array_t<int64_t> rows(B * num_beams), tokens(B * num_beams);
        const int64_t* parent = r.parent.data();
        const int64_t* token = r.token.data();
        int64_t* ro = rows.mutable_data();
        int64_t* to = tokens.mutable_data();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < num_beams; ++j) {
            const int64_t i = b * num_beams + j;
            ro[i] = b * W + std::max<int64_t>(parent[i], 0);
            to[i] = std::max<int64_t>(token[i], 0);
          }
        return py::make_tuple(r.scores, rows, tokens, r.state, r.bad_values);
      },
      py::arg("log_probs"), py::arg("beam_scores"), py::arg("states"), py::arg("offsets"),
      py::arg("codes"), py::arg("num_beams"),
      "One level of the CPU beam-search driver: (scores, parent rows, tokens, states, number of "
      "NaN / +inf log-probs among the candidates).");
#ifdef RECBASE_WITH_CUDA
  m.def(
      "constrained_beam_step_cuda",
      [](uintptr_t log_probs, uintptr_t beam_scores, uintptr_t states, uintptr_t offsets,
         uintptr_t codes, int64_t num_nodes, int64_t batch, int64_t width, int64_t K,
         int64_t num_beams, uintptr_t out_scores, uintptr_t out_parent, uintptr_t out_token,
         uintptr_t out_state, uintptr_t stream) {
        if (batch < 0 || width < 0 || K < 1 || num_beams < 1 || num_nodes < 1)
          fail("constrained_beam_step_cuda: invalid sizes");
        const char* err = constrained_beam_step_cuda(
            reinterpret_cast<const float*>(log_probs), reinterpret_cast<const float*>(beam_scores),
            reinterpret_cast<const int64_t*>(states), reinterpret_cast<const int64_t*>(offsets),
            reinterpret_cast<const int64_t*>(codes), num_nodes, batch, width, K, num_beams,
            reinterpret_cast<float*>(out_scores), reinterpret_cast<int64_t*>(out_parent),
            reinterpret_cast<int64_t*>(out_token), reinterpret_cast<int64_t*>(out_state),
            reinterpret_cast<void*>(stream));
        if (err && err[0]) throw std::runtime_error(std::string("constrained_beam_step_cuda: ") + err);
      },
      "One trie-constrained beam step on device pointers (validated by the Python caller).");
#endif
}

}  // namespace recbase
