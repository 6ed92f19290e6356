// Trie-constrained beam step, CPU engine + Python bindings (see beam.h).
#include "beam.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace recbase {

namespace {
struct Candidate {
  float score;
  int64_t key;   // w * K + code: the deterministic tie-break (smaller first)
  int64_t node;  // child node id
};
// a is better than b: higher score, then smaller key (the deterministic order of results).
inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.key < b.key);
}
}  // namespace

int64_t constrained_beam_step_cpu(const float* log_probs, const float* beam_scores,
                                  const int64_t* states, const int64_t* offsets,
                                  const int64_t* codes, int64_t num_nodes, int64_t B, int64_t W,
                                  int64_t K, int64_t num_beams, float* out_scores,
                                  int64_t* out_parent, int64_t* out_token, int64_t* out_state,
                                  int64_t work_estimate) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  int64_t bad_codes = 0;
  // Threads only pay off (and only behave on a busy machine) when there is real work.
#pragma omp parallel reduction(+ : bad_codes) if (work_estimate > 65536 && B > 1)
  {
    // Kept candidates in an unsorted pool; when it overflows, nth_element trims it to the best
    // `num_beams` and their worst becomes the entry threshold. Candidates arrive mostly below the
    // threshold, so the common path is one vectorised compare per 8 scores and no heap update.
    const size_t cap = static_cast<size_t>(2 * num_beams + 16);
    std::vector<Candidate> pool;
    pool.reserve(cap);
    bool have_threshold = false;
    Candidate threshold{neg_inf, 0, 0};
    std::vector<float> buf;
    auto trim = [&]() {
      std::nth_element(pool.begin(), pool.begin() + (num_beams - 1), pool.end(), better);
      pool.resize(num_beams);
      threshold = pool[num_beams - 1];
      have_threshold = true;
    };
    auto insert = [&](float sc, int64_t key, int64_t node) {
      if (std::isnan(sc)) sc = neg_inf;
      const Candidate c{sc, key, node};
      if (have_threshold && !better(c, threshold)) return;  // full order: ties go by key
      pool.push_back(c);
      if (pool.size() >= cap) trim();
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      pool.clear();
      have_threshold = false;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t s = states[b * W + w];
        if (s < 0 || s >= num_nodes) continue;  // dead beam (range validated by the caller)
        const int64_t first = std::max<int64_t>(offsets[s], 0);
        const int64_t last = std::min<int64_t>(offsets[s + 1], num_nodes);
        const int64_t count = last - first;
        if (count <= 0) continue;
        const float base = beam_scores[b * W + w];
        const float* row = log_probs + (b * W + w) * K;
        const int64_t* cc = codes + first;
        // Pass 1 (vectorises): range check of the codes, then gather scores.
        if (static_cast<int64_t>(buf.size()) < count + 8) buf.resize(count + 8);
        float* __restrict sc = buf.data();
        const int64_t* __restrict ccr = cc;
        const float* __restrict rowr = row;
        int64_t out_of_range = 0;
        for (int64_t j = 0; j < count; ++j)
          out_of_range += (static_cast<uint64_t>(ccr[j]) >= static_cast<uint64_t>(K));
        if (out_of_range) {  // malformed trie arrays or a smaller codebook: reported, skipped
          for (int64_t j = 0; j < count; ++j) {
            if (cc[j] < 0 || cc[j] >= K) { ++bad_codes; continue; }
            insert(base + row[cc[j]], w * K + cc[j], first + j);
          }
          continue;
        }
        for (int64_t j = 0; j < count; ++j) sc[j] = base + rowr[ccr[j]];
        for (int64_t j = count; j < count + 8; ++j) sc[j] = neg_inf;  // padding, never inserted
        // Pass 2: once a threshold exists, most blocks of 8 have no score that reaches it.
        for (int64_t j = 0; j < count; j += 8) {
          if (have_threshold) {
            const float t = threshold.score;
            int any = 0;
            for (int q = 0; q < 8; ++q) any |= sc[j + q] >= t;
            if (!any) continue;
          }
          const int64_t end = std::min<int64_t>(j + 8, count);
          for (int64_t q = j; q < end; ++q) insert(sc[q], w * K + cc[q], first + q);
        }
      }
      if (static_cast<int64_t>(pool.size()) > num_beams) trim();
      std::sort(pool.begin(), pool.end(), better);  // best first
      const std::vector<Candidate>& heap = pool;
      const int64_t kept = static_cast<int64_t>(heap.size());
      for (int64_t r = 0; r < num_beams; ++r) {
        const int64_t o = b * num_beams + r;
        if (r < kept) {
          out_scores[o] = heap[r].score;
          out_parent[o] = heap[r].key / K;
          out_token[o] = heap[r].key % K;
          out_state[o] = heap[r].node;
        } else {
          out_scores[o] = neg_inf;
          out_parent[o] = -1;
          out_token[o] = -1;
          out_state[o] = -1;
        }
      }
    }
  }
  return bad_codes;
}

void bind_beam(py::module_& m) {
  m.def(
      "constrained_beam_step",
      [](const py::handle& lp_obj, const py::handle& sc_obj, const py::handle& st_obj,
         const py::handle& off_obj, const py::handle& codes_obj, int64_t num_beams) {
        auto log_probs = checked<float>(lp_obj, "log_probs", 2);
        auto scores = checked<float>(sc_obj, "beam_scores", 2);
        auto states = checked<int64_t>(st_obj, "states", 2);
        auto offsets = checked<int64_t>(off_obj, "offsets", 1);
        auto codes = checked<int64_t>(codes_obj, "codes", 1);
        const int64_t B = scores.shape(0), W = scores.shape(1), K = log_probs.shape(1);
        const int64_t n = codes.shape(0);
        if (num_beams < 1) fail("num_beams: expected >= 1, got " + std::to_string(num_beams));
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
            fail("states: node " + std::to_string(s) + " outside [-1, num_nodes=" +
                 std::to_string(n) + "): states from another trie?");
          if (s < 0) continue;
          if (off[s] < 0 || off[s] > off[s + 1] || off[s + 1] > n)
            fail("offsets: malformed children range of node " + std::to_string(s));
          work += off[s + 1] - off[s];
        }
        py::array_t<float> out_scores({B, num_beams});
        py::array_t<int64_t> out_parent({B, num_beams}), out_token({B, num_beams}),
            out_state({B, num_beams});
        float* os = out_scores.mutable_data();
        int64_t* op = out_parent.mutable_data();
        int64_t* ot = out_token.mutable_data();
        int64_t* ox = out_state.mutable_data();
        int64_t bad_codes;
        {
          py::gil_scoped_release release;
          bad_codes = constrained_beam_step_cpu(log_probs.data(), scores.data(), st, off, cd, n,
                                                B, W, K, num_beams, os, op, ot, ox, work);
        }
        if (bad_codes)
          fail("codes: " + std::to_string(bad_codes) + " child codes outside [0, K=" +
               std::to_string(K) + ") (log_probs width): trie of another codebook?");
        return py::make_tuple(out_scores, out_parent, out_token, out_state);
      },
      py::arg("log_probs"), py::arg("beam_scores"), py::arg("states"), py::arg("offsets"),
      py::arg("codes"), py::arg("num_beams"),
      "One trie-constrained beam step on CPU arrays; returns (scores, parent, token, state).");
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
