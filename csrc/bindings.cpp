// Python bindings of the native runtime: `fastcodegen._C`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"

namespace py = pybind11;
using fastcodegen::BlockAllocator;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcodegen native runtime";

  py::class_<BlockAllocator>(m, "BlockAllocator",
                             "Free list of paged-KV cache blocks with reference counts.")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def("allocate", &BlockAllocator::allocate, "Take one free block (reference count 1).")
      .def("allocate_many", &BlockAllocator::allocate_many, py::arg("n"),
           "Take n free blocks, all or nothing.")
      .def("incref", &BlockAllocator::incref, py::arg("block"), "Add a holder to an allocated block.")
      .def("decref", &BlockAllocator::decref, py::arg("block"),
           "Drop a holder; True when the block went back to the free list.")
      .def("release", &BlockAllocator::release, py::arg("blocks"),
           "Drop one holder of each block of a block table.")
      .def("refcount", &BlockAllocator::refcount, py::arg("block"))
      .def_property_readonly("num_free", &BlockAllocator::num_free)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks);
}
