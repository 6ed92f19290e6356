// Shared argument checks for the pybind11 entry points.
// Every entry point validates shape, dtype, contiguity and ranges before it touches memory,
// and reports which argument was wrong, what was expected and what was given.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace recbase {
namespace py = pybind11;

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

// Checks dtype T, rank `ndim` and C-contiguity; returns the array unchanged (no silent copies).
template <typename T>
py::array_t<T> checked(const py::handle& obj, const char* name, int ndim) {
  if (!py::isinstance<py::array>(obj)) fail(std::string(name) + ": expected a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
         ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    fail(std::string(name) + ": expected a " + std::to_string(ndim) + "-d array, got shape " +
         shape_str(a));
  if (!(a.flags() & py::array::c_style))
    fail(std::string(name) + ": expected a C-contiguous array (use np.ascontiguousarray)");
  return py::reinterpret_borrow<py::array_t<T>>(a);
}


}  // namespace recbase
