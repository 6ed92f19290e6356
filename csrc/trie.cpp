// ConceptTrie: build, lookup, subset, serialisation (see trie.h for the layout).
#include "trie.h"

#include <algorithm>
#include <numeric>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace recbase {

namespace {
uint64_t fnv1a(uint64_t h, const std::vector<int64_t>& v) {
  for (int64_t x : v) {
    auto u = static_cast<uint64_t>(x);
    for (int b = 0; b < 8; ++b) {
      h ^= (u >> (8 * b)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  return h;
}
}  // namespace

ConceptTrie ConceptTrie::build(const int64_t* codes, int64_t n, int64_t L, int64_t K) {
  if (n <= 0) fail("codes: empty catalog (expected at least one item row)");
  if (L <= 0) fail("codes: expected at least one level (shape (N, L) with L >= 1)");
  if (K <= 0 || K > kMaxCodebookSize)
    fail("codebook_size: expected 1.." + std::to_string(kMaxCodebookSize) + ", got " + std::to_string(K));
  for (int64_t i = 0; i < n * L; ++i) {
    if (codes[i] < 0 || codes[i] >= K)
      fail("codes: value " + std::to_string(codes[i]) + " at item " + std::to_string(i / L) +
           ", level " + std::to_string(i % L) + " is outside [0, codebook_size=" +
           std::to_string(K) + ")");
  }
  // Lexicographic order of rows; ties (duplicates) ordered by item index for stable messages.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t* ra = codes + a * L;
    const int64_t* rb = codes + b * L;
    for (int64_t l = 0; l < L; ++l)
      if (ra[l] != rb[l]) return ra[l] < rb[l];
    return a < b;
  });
  // first_diff[r]: first level where sorted row r differs from row r-1 (0 for r = 0).
  std::vector<int32_t> first_diff(n, 0);
  for (int64_t r = 1; r < n; ++r) {
    const int64_t* ra = codes + order[r - 1] * L;
    const int64_t* rb = codes + order[r] * L;
    int64_t l = 0;
    while (l < L && ra[l] == rb[l]) ++l;
    if (l == L)
      fail("codes: items " + std::to_string(order[r - 1]) + " and " + std::to_string(order[r]) +
           " have the same concept ID; every item needs a unique code row (add a "
           "disambiguation level or re-assign collisions)");
    first_diff[r] = static_cast<int32_t>(l);
  }
  ConceptTrie t;
  t.depth_ = L;
  t.codebook_size_ = K;
  t.item_space_ = n;
  // Node counts per depth d: rows starting a new prefix of length d.
  std::vector<int64_t> start(L + 2, 0);
  start[0] = 0;
  start[1] = 1;
  for (int64_t d = 1; d <= L; ++d) {
    int64_t cnt = 0;
    for (int64_t r = 0; r < n; ++r) cnt += (first_diff[r] < d);
    start[d + 1] = start[d] + cnt;
  }
  const int64_t num_nodes = start[L + 1];
  t.codes_.assign(num_nodes, -1);
  std::vector<int64_t> child_count(num_nodes, 0);
  t.leaf_items_.assign(n, -1);
  for (int64_t d = 1; d <= L; ++d) {
    int64_t node = start[d] - 1, parent = start[d - 1] - 1;
    for (int64_t r = 0; r < n; ++r) {
      if (first_diff[r] < d - 1 || r == 0) ++parent;  // parent prefix (length d-1) changes
      if (first_diff[r] < d) {
        ++node;
        t.codes_[node] = codes[order[r] * L + (d - 1)];
        ++child_count[parent];
        if (d == L) t.leaf_items_[node - start[L]] = order[r];
      }
    }
  }
  t.offsets_.assign(num_nodes + 1, 0);
  t.offsets_[0] = 1;
  for (int64_t v = 0; v < num_nodes; ++v) t.offsets_[v + 1] = t.offsets_[v] + child_count[v];
  t.finalize();
  return t;
}

ConceptTrie ConceptTrie::from_arrays(std::vector<int64_t> offsets, std::vector<int64_t> codes,
                                     std::vector<int64_t> leaf_items, int64_t L, int64_t K,
                                     int64_t item_space) {
  const int64_t num_nodes = static_cast<int64_t>(codes.size());
  if (L <= 0 || K <= 0) fail("meta: depth and codebook_size must be >= 1");
  if (K > kMaxCodebookSize)
    fail("meta: codebook_size must be at most " + std::to_string(kMaxCodebookSize) + ", got " + std::to_string(K));
  if (static_cast<int64_t>(offsets.size()) != num_nodes + 1)
    fail("offsets: expected length num_nodes + 1 = " + std::to_string(num_nodes + 1) +
         ", got " + std::to_string(offsets.size()));
  if (num_nodes < 1 + L || leaf_items.empty()) fail("trie arrays: empty catalog");
  if (offsets[0] != 1 || offsets[num_nodes] != num_nodes)
    fail("offsets: expected offsets[0] == 1 and offsets[-1] == num_nodes");
  // every offset is checked before any code is read through one (a crafted file must not make the
  // loop below read past `codes`)
  for (int64_t v = 0; v < num_nodes; ++v)
    if (offsets[v + 1] < offsets[v] || offsets[v + 1] > num_nodes)
      fail("offsets: not non-decreasing within [1, num_nodes] at node " + std::to_string(v));
  for (int64_t v = 0; v < num_nodes; ++v) {
    if (offsets[v] <= v && offsets[v + 1] > offsets[v])
      fail("offsets: children of node " + std::to_string(v) + " are not after it (not BFS order)");
    for (int64_t c = offsets[v]; c < offsets[v + 1]; ++c) {
      if (codes[c] < 0 || codes[c] >= K) fail("codes: node code out of [0, codebook_size)");
      if (c > offsets[v] && codes[c] <= codes[c - 1])
        fail("codes: children codes of node " + std::to_string(v) + " are not strictly increasing");
    }
  }
  // Depth ranges: the children of depth-d nodes are exactly the depth-(d+1) nodes.
  std::vector<int64_t> start(L + 2);
  start[0] = 0;
  start[1] = 1;
  for (int64_t d = 1; d <= L; ++d) {
    if (start[d] > num_nodes || start[d] == start[d - 1])
      fail("trie arrays: a level has no nodes (depth does not match)");
    start[d + 1] = offsets[start[d]];
    if (offsets[start[d - 1]] != start[d])
      fail("trie arrays: inconsistent level structure");
  }
  if (start[L + 1] != num_nodes) fail("trie arrays: nodes deeper than depth " + std::to_string(L));
  for (int64_t v = 0; v < start[L]; ++v)
    if (offsets[v + 1] == offsets[v]) fail("trie arrays: inner node without children");
  if (static_cast<int64_t>(leaf_items.size()) != num_nodes - start[L])
    fail("leaf_items: expected one item per leaf (" + std::to_string(num_nodes - start[L]) + ")");
  if (item_space < 1) fail("meta: item_space must be >= 1");
  for (int64_t item : leaf_items)
    if (item < 0 || item >= item_space)
      fail("leaf_items: item " + std::to_string(item) + " out of [0, item_space = " + std::to_string(item_space) + ")");
  ConceptTrie t;
  t.depth_ = L;
  t.codebook_size_ = K;
  t.item_space_ = item_space;
  t.offsets_ = std::move(offsets);
  t.codes_ = std::move(codes);
  t.leaf_items_ = std::move(leaf_items);
  t.finalize();
  return t;
}

void ConceptTrie::finalize() {
  const int64_t num_nodes = static_cast<int64_t>(codes_.size());
  level_start_.assign(depth_ + 2, 0);
  level_start_[1] = 1;
  for (int64_t d = 1; d <= depth_; ++d) level_start_[d + 1] = offsets_[level_start_[d]];
  level_start_[depth_ + 1] = num_nodes;
  root_table_.assign(codebook_size_, -1);
  for (int64_t c = offsets_[0]; c < offsets_[1]; ++c) root_table_[codes_[c]] = c;
  for (int64_t item : leaf_items_)
    if (item < 0 || item >= item_space_)
      fail("leaf_items: item " + std::to_string(item) + " outside [0, item_space=" +
           std::to_string(item_space_) + ")");
  item_order_.resize(leaf_items_.size());
  std::iota(item_order_.begin(), item_order_.end(), int64_t(0));
  std::sort(item_order_.begin(), item_order_.end(),
            [&](int64_t a, int64_t b) { return leaf_items_[a] < leaf_items_[b]; });
  for (size_t r = 1; r < item_order_.size(); ++r)
    if (leaf_items_[item_order_[r]] == leaf_items_[item_order_[r - 1]])
      fail("leaf_items: item " + std::to_string(leaf_items_[item_order_[r]]) + " repeated");
  uint64_t h = 1469598103934665603ull;
  h = fnv1a(h, {depth_, codebook_size_, item_space_});
  h = fnv1a(h, offsets_);
  h = fnv1a(h, codes_);
  h = fnv1a(h, leaf_items_);
  fingerprint_ = h;
}

int64_t ConceptTrie::memory_bytes() const {
  return static_cast<int64_t>(sizeof(int64_t) *
                              (offsets_.size() + codes_.size() + leaf_items_.size() +
                               root_table_.size() + level_start_.size() + item_order_.size()));
}

int64_t ConceptTrie::node_depth(int64_t node) const {
  if (node < 0 || node >= num_nodes())
    fail("state: node " + std::to_string(node) + " outside [0, num_nodes=" +
         std::to_string(num_nodes()) + ")");
  return static_cast<int64_t>(std::upper_bound(level_start_.begin(), level_start_.end(), node) -
                              level_start_.begin()) - 1;
}

void ConceptTrie::lookup(const int64_t* q, int64_t m, int64_t* out) const {
  const int64_t L = depth_, K = codebook_size_, leaf0 = level_start_[L];
#pragma omp parallel for schedule(static) if (m > 4096)
  for (int64_t i = 0; i < m; ++i) {
    const int64_t* row = q + i * L;
    int64_t node = (row[0] >= 0 && row[0] < K) ? root_table_[row[0]] : -1;
    for (int64_t l = 1; l < L && node >= 0; ++l) {
      auto first = codes_.begin() + offsets_[node], last = codes_.begin() + offsets_[node + 1];
      auto it = std::lower_bound(first, last, row[l]);
      node = (it != last && *it == row[l]) ? static_cast<int64_t>(it - codes_.begin()) : -1;
    }
    out[i] = node >= 0 ? leaf_items_[node - leaf0] : -1;
  }
}

std::vector<int64_t> ConceptTrie::leaf_codes() const {
  const int64_t L = depth_, n = num_items(), leaf0 = level_start_[L];
  std::vector<int64_t> parent(num_nodes(), -1);
  for (int64_t v = 0; v < num_nodes(); ++v)
    for (int64_t c = offsets_[v]; c < offsets_[v + 1]; ++c) parent[c] = v;
  std::vector<int64_t> out(n * L);
  for (int64_t j = 0; j < n; ++j) {
    int64_t node = leaf0 + j;
    for (int64_t l = L - 1; l >= 0; --l) {
      out[j * L + l] = codes_[node];
      node = parent[node];
    }
  }
  return out;
}

ConceptTrie ConceptTrie::subset(const int64_t* items, int64_t m) const {
  if (m <= 0) fail("item_indices: empty subset (expected at least one item)");
  const int64_t num_nodes = this->num_nodes();
  std::vector<uint8_t> keep(num_nodes, 0);
  const int64_t leaf0 = level_start_[depth_];
  for (int64_t i = 0; i < m; ++i) {
    const int64_t item = items[i];
    auto it = std::lower_bound(item_order_.begin(), item_order_.end(), item,
                               [&](int64_t j, int64_t value) { return leaf_items_[j] < value; });
    if (it == item_order_.end() || leaf_items_[*it] != item)
      fail("item_indices: item " + std::to_string(item) + " is not in this trie");
    const int64_t leaf = leaf0 + *it;
    if (keep[leaf]) fail("item_indices: item " + std::to_string(item) + " repeated");
    keep[leaf] = 1;
  }
  // Mark ancestors bottom-up: a node is kept when any child is kept.
  for (int64_t v = level_start_[depth_] - 1; v >= 0; --v)
    for (int64_t c = offsets_[v]; c < offsets_[v + 1] && !keep[v]; ++c) keep[v] = keep[c];
  // Filtering in BFS order keeps BFS order and per-node code order.
  std::vector<int64_t> new_id(num_nodes, -1);
  int64_t next = 0;
  for (int64_t v = 0; v < num_nodes; ++v)
    if (keep[v]) new_id[v] = next++;
  ConceptTrie t;
  t.depth_ = depth_;
  t.codebook_size_ = codebook_size_;
  t.item_space_ = item_space_;
  t.codes_.resize(next);
  t.offsets_.resize(next + 1);
  t.offsets_[0] = 1;
  for (int64_t v = 0; v < num_nodes; ++v) {
    if (!keep[v]) continue;
    int64_t id = new_id[v], kept_children = 0;
    for (int64_t c = offsets_[v]; c < offsets_[v + 1]; ++c) kept_children += keep[c];
    t.codes_[id] = codes_[v];
    t.offsets_[id + 1] = t.offsets_[id] + kept_children;
    if (v >= leaf0) t.leaf_items_.push_back(leaf_items_[v - leaf0]);
  }
  t.finalize();
  return t;
}

namespace {
py::array_t<int64_t> to_numpy(const std::vector<int64_t>& v) {
  py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}
std::vector<int64_t> from_numpy(const py::handle& obj, const char* name) {
  auto a = checked<int64_t>(obj, name, 1);
  return std::vector<int64_t>(a.data(), a.data() + a.shape(0));
}
}  // namespace

void bind_beam(py::module_& m);  // beam.cpp

void bind_trie(py::module_& m) {
  py::class_<ConceptTrie>(m, "ConceptTrie", "Concept-ID prefix tree as CSR arrays (see trie.h).")
      .def_static(
          "build",
          [](const py::handle& codes_obj, int64_t codebook_size) {
            auto codes = checked<int64_t>(codes_obj, "codes", 2);
            const int64_t n = codes.shape(0), L = codes.shape(1);
            py::gil_scoped_release release;
            return ConceptTrie::build(codes.data(), n, L, codebook_size);
          },
          py::arg("codes"), py::arg("codebook_size"))
      .def_static(
          "from_arrays",
          [](const py::handle& offsets, const py::handle& codes, const py::handle& leaf_items,
             int64_t depth, int64_t codebook_size, int64_t item_space) {
            return ConceptTrie::from_arrays(from_numpy(offsets, "offsets"),
                                            from_numpy(codes, "codes"),
                                            from_numpy(leaf_items, "leaf_items"), depth,
                                            codebook_size, item_space);
          },
          py::arg("offsets"), py::arg("codes"), py::arg("leaf_items"), py::arg("depth"),
          py::arg("codebook_size"), py::arg("item_space"))
      .def_property_readonly("num_items", &ConceptTrie::num_items)
      .def_property_readonly("depth", &ConceptTrie::depth)
      .def_property_readonly("num_nodes", &ConceptTrie::num_nodes)
      .def_property_readonly("codebook_size", &ConceptTrie::codebook_size)
      .def_property_readonly("item_space", &ConceptTrie::item_space)
      .def_property_readonly("fingerprint", &ConceptTrie::fingerprint)
      .def_property_readonly("memory_bytes", &ConceptTrie::memory_bytes)
      .def_property_readonly("offsets", [](const ConceptTrie& t) { return to_numpy(t.offsets()); })
      .def_property_readonly("codes", [](const ConceptTrie& t) { return to_numpy(t.codes()); })
      .def_property_readonly("leaf_items",
                             [](const ConceptTrie& t) { return to_numpy(t.leaf_items()); })
      .def_property_readonly("root_table",
                             [](const ConceptTrie& t) { return to_numpy(t.root_table()); })
      .def_property_readonly("level_start",
                             [](const ConceptTrie& t) { return to_numpy(t.level_start()); })
      .def("leaf_codes",
           [](const ConceptTrie& t) {
             auto flat = t.leaf_codes();
             py::array_t<int64_t> a({t.num_items(), t.depth()});
             std::copy(flat.begin(), flat.end(), a.mutable_data());
             return a;
           })
      .def(
          "lookup",
          [](const ConceptTrie& t, const py::handle& codes_obj) {
            auto q = checked<int64_t>(codes_obj, "codes", 2);
            if (q.shape(1) != t.depth())
              fail("codes: expected shape (M, " + std::to_string(t.depth()) + "), got " +
                   shape_str(q));
            const int64_t m = q.shape(0);
            py::array_t<int64_t> out(m);
            int64_t* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              t.lookup(q.data(), m, o);
            }
            return out;
          },
          py::arg("codes"))
      .def(
          "subset",
          [](const ConceptTrie& t, const py::handle& items_obj) {
            auto items = checked<int64_t>(items_obj, "item_indices", 1);
            return t.subset(items.data(), items.shape(0));
          },
          py::arg("item_indices"))
      .def("node_depth", &ConceptTrie::node_depth, py::arg("state"))
      .def(
          "children",
          [](const ConceptTrie& t, int64_t state) {
            if (state < 0 || state >= t.num_nodes())
              fail("state: node " + std::to_string(state) + " outside [0, num_nodes=" +
                   std::to_string(t.num_nodes()) + ")");
            const auto& off = t.offsets();
            std::vector<int64_t> codes(t.codes().begin() + off[state],
                                       t.codes().begin() + off[state + 1]);
            std::vector<int64_t> ids(codes.size());
            std::iota(ids.begin(), ids.end(), off[state]);
            return py::make_tuple(to_numpy(codes), to_numpy(ids));
          },
          py::arg("state"));
  bind_beam(m);
}

}  // namespace recbase
