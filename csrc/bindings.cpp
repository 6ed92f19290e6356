// The one pybind11 module, recbase._C. Each engine registers its own functions.
#include <pybind11/pybind11.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace recbase {
void bind_rq(py::module_& m);    // rq.cpp: residual quantization (k-means, encode, decode)
void bind_trie(py::module_& m);  // trie.cpp, beam.cpp: concept trie and constrained beam step
}  // namespace recbase

PYBIND11_MODULE(_C, m) {
  m.doc() = "recbase native core: residual quantization and trie-constrained beam search";
#ifdef RECBASE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.attr("openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  recbase::bind_rq(m);
  recbase::bind_trie(m);
}
