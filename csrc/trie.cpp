// Placeholder: concept trie and constrained beam step (filled in by the trie work).
#include "common.h"
namespace recbase {
void bind_trie(py::module_& m) { (void)m; }
}  // namespace recbase
