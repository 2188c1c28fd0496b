// pybind11 module xrayforge._C: thin bindings over the host entry points in ops.h.
#include <pybind11/pybind11.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "xrayforge CUDA kernels (raw device pointers, caller's stream; no libtorch dependency)";
  // Ops with CUDA kernels; xrayforge.ops checks this list before dispatching to backend='cuda'.
  m.attr("OPS") = py::make_tuple("pixel_norm", "bias_lrelu_pixel_norm", "minibatch_stddev");
  m.def("pixel_norm_partial_rows", &xrayforge::pixel_norm_partial_rows);
  m.def("pixel_norm_forward", &xrayforge::pixel_norm_forward, py::call_guard<py::gil_scoped_release>());
  m.def("pixel_norm_backward", &xrayforge::pixel_norm_backward, py::call_guard<py::gil_scoped_release>());
  m.def("minibatch_stddev_forward", &xrayforge::minibatch_stddev_forward, py::call_guard<py::gil_scoped_release>());
  m.def("minibatch_stddev_backward", &xrayforge::minibatch_stddev_backward, py::call_guard<py::gil_scoped_release>());
}
