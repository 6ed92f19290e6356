// ConceptTrie: the prefix tree of a catalog's concept IDs, stored as CSR arrays.
//
// Math: item i has code row c_i in [0,K)^L. Nodes are the distinct prefixes (c_{i,0..d-1}),
// d = 0..L, numbered breadth-first with prefixes in lexicographic order, so the children of
// node v are the contiguous node ids offsets[v] .. offsets[v+1]-1, with codes codes[child]
// strictly increasing. Build: sort rows lexicographically (O(N L log N)), then one pass per
// level over the sorted rows (a new node starts wherever the row first differs at depth < d).
// Depth-L nodes (leaves) map to item indices; depth-0 children also have a dense code table.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace recbase {

// Largest codebook a trie accepts: the root's code table has K entries, so K is bounded before it
// is allocated (real codebooks have 256-8192 codewords per level).
constexpr int64_t kMaxCodebookSize = int64_t(1) << 24;

class ConceptTrie {
 public:
  // codes: row-major (num_rows, depth) int64; item indices are 0..num_rows-1.
  static ConceptTrie build(const int64_t* codes, int64_t num_rows, int64_t depth,
                           int64_t codebook_size);
  // Rebuilds the derived tables from stored CSR arrays, validating their structure.
  static ConceptTrie from_arrays(std::vector<int64_t> offsets, std::vector<int64_t> codes,
                                 std::vector<int64_t> leaf_items, int64_t depth,
                                 int64_t codebook_size, int64_t item_space);

  int64_t num_items() const { return static_cast<int64_t>(leaf_items_.size()); }
  int64_t depth() const { return depth_; }
  int64_t codebook_size() const { return codebook_size_; }
  int64_t num_nodes() const { return static_cast<int64_t>(codes_.size()); }
  // Item indices lie in [0, item_space) (the original catalog size, kept by subset()).
  int64_t item_space() const { return item_space_; }
  uint64_t fingerprint() const { return fingerprint_; }
  int64_t memory_bytes() const;

  // out[m] = item index of code row m, or -1 when the row is not in the catalog.
  void lookup(const int64_t* codes, int64_t num_rows, int64_t* out) const;
  // The trie of the given items only (original item numbering kept). O(num_nodes).
  ConceptTrie subset(const int64_t* items, int64_t num_items) const;
  // Depth of a node (0 = root, depth() = leaf).
  int64_t node_depth(int64_t node) const;
  // Code rows of all leaves, in leaf order (row j <-> leaf_items()[j]).
  std::vector<int64_t> leaf_codes() const;

  const std::vector<int64_t>& offsets() const { return offsets_; }
  const std::vector<int64_t>& codes() const { return codes_; }
  const std::vector<int64_t>& leaf_items() const { return leaf_items_; }
  const std::vector<int64_t>& root_table() const { return root_table_; }
  const std::vector<int64_t>& level_start() const { return level_start_; }

 private:
  void finalize();  // derives root_table_, level_start_, item_order_, fingerprint_

  int64_t depth_ = 0, codebook_size_ = 0, item_space_ = 0;
  std::vector<int64_t> offsets_;      // [num_nodes + 1]
  std::vector<int64_t> codes_;        // [num_nodes], code of the edge into the node; root: -1
  std::vector<int64_t> leaf_items_;   // [num_items], item of leaf level_start_[depth] + j
  std::vector<int64_t> root_table_;   // [K], root's child by code, or -1
  std::vector<int64_t> level_start_;  // [depth + 2], first node id of each depth (+ end)
  // [num_items] leaf indices j sorted by leaf_items_[j]: item -> leaf by binary search, in memory
  // of the catalog's size (a table over item_space would let a crafted item_space allocate TBs)
  std::vector<int64_t> item_order_;
  uint64_t fingerprint_ = 0;
};

}  // namespace recbase
