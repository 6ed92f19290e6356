// Placeholder: residual quantization engine (filled in by the RQ work).
#include "common.h"
namespace recbase {
void bind_rq(py::module_& m) { (void)m; }
}  // namespace recbase
