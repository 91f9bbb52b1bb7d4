// The nice_ext operator library: every schema is declared here, once. The kernels are registered per
// backend next to their code (csrc/cpu/*_cpu.cpp, csrc/cuda/*_cuda.cu) and the dispatcher picks them by
// device. Each op's autograd is registered in C++ next to its entry points (csrc/coupling.cpp,
// csrc/affine_coupling.cpp, csrc/scale_prior.cpp); fake (meta) kernels from Python (nice_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "nice_ext.h"

// The digests of the kernel sources this build compiled, from setup.py (build/generated); a build without
// them (the host build of the CUDA kernels for the tests) falls back on file times to tell a stale build.
#if __has_include("nice_ext_source_digests.h")
#include "nice_ext_source_digests.h"
#else
#define NICE_EXT_SOURCE_DIGESTS ""
#endif

TORCH_LIBRARY(nice_ext, m) {
  // Masked additive coupling update (paper §3.2), forward or inverse, for x of shape (B, D):
  //   y[:, j] = x[:, j] + sign * shift[:, shift_col[j]]   where shift_col[j] >= 0 (updated part I2)
  //   y[:, j] = x[:, j]                                     where shift_col[j] == -1 (kept part I1)
  // with sign = +1 (forward) or -1 (inverse). shift (B, |I2|) is the coupling network's output m(x_I1).
  // gathered = y[:, gather_index] is the next layer's network input, written contiguous in the same
  // pass (gather_index may be empty). All index tensors are int32 and derived once from the masks.
  m.def("coupling_update(Tensor x, Tensor shift, Tensor shift_col, Tensor gather_index, bool inverse)"
        " -> (Tensor y, Tensor gathered)");
  // Its backward, with the same index maps (gather_index must not repeat a feature):
  //   grad_x = grad_y, plus grad_gathered added back at the features gather_index names;
  //   grad_shift[:, shift_col[j]] = sign * grad_x[:, j] for every updated feature j (updated of them).
  m.def("coupling_update_backward(Tensor grad_y, Tensor? grad_gathered, Tensor shift_col,"
        " Tensor gather_index, int updated, bool inverse) -> (Tensor grad_x, Tensor grad_shift)");

  // Masked affine coupling update (paper §3.2.2), forward or inverse, with the same index maps:
  //   forward  y[:, j] = x[:, j] * exp(a[:, c]) + shift[:, c]        c = shift_col[j] >= 0 (updated part I2)
  //   inverse  y[:, j] = (x[:, j] - shift[:, c]) * exp(-a[:, c])
  //            y[:, j] = x[:, j]                                     shift_col[j] == -1 (kept part I1)
  // where a = tanh(log_scale_raw) (log_scale_law 'tanh') or a = log_scale_raw ('unbounded'), and
  //   log_det[b] = +/- sum_c a[b, c], the log|det| of the map applied (float32 for half inputs).
  // log_scale_raw and shift (B, |I2|) are the coupling network's outputs; gathered as in coupling_update.
  m.def("affine_coupling_update(Tensor x, Tensor log_scale_raw, Tensor shift, Tensor shift_col, Tensor gather_index,"
        " str log_scale_law, bool inverse) -> (Tensor y, Tensor gathered, Tensor log_det)");
  // Its backward. x is the op's input; the outputs' gradients may be absent.
  m.def("affine_coupling_update_backward(Tensor grad_y, Tensor? grad_gathered, Tensor? grad_log_det, Tensor x,"
        " Tensor log_scale_raw, Tensor shift, Tensor shift_col, Tensor gather_index, str log_scale_law,"
        " bool inverse) -> (Tensor grad_x, Tensor grad_log_scale_raw, Tensor grad_shift)");

  // Diagonal scaling (paper §3.3) with the factorised prior's log-density (§3.4), one pass:
  //   z = exp(log_scale) * h,   log_prob[b] = sum_d log p_H(z[b, d]) + sum_d log_scale[d]
  // prior is 'logistic' or 'gaussian'. With compute_z false only log_prob is written (z is empty).
  m.def("scale_prior(Tensor h, Tensor log_scale, str prior, bool compute_z) -> (Tensor z, Tensor log_prob)");
  // Its backward for h and for log_scale (the latter reduced over the batch, deterministically).
  m.def("scale_prior_backward(Tensor grad_log_prob, Tensor? grad_z, Tensor h, Tensor log_scale, str prior)"
        " -> (Tensor grad_h, Tensor grad_log_scale)");
  // The inverse scaling used for sampling: h = exp(-log_scale) * z.
  m.def("scale_inverse(Tensor z, Tensor log_scale) -> Tensor h");

  // The three backward ops' composite twins: the same gradients in differentiable ATen ops, for
  // higher-order gradients (csrc/autograd.h). Their kernels are nice_ext/reference.py's *_backward,
  // registered as CompositeImplicitAutograd by nice_ext/ops.py.
  m.def("coupling_update_backward_composite(Tensor grad_y, Tensor? grad_gathered, Tensor shift_col,"
        " Tensor gather_index, int updated, bool inverse) -> (Tensor grad_x, Tensor grad_shift)");
  m.def("affine_coupling_update_backward_composite(Tensor grad_y, Tensor? grad_gathered, Tensor? grad_log_det,"
        " Tensor x, Tensor log_scale_raw, Tensor shift, Tensor shift_col, Tensor gather_index, str log_scale_law,"
        " bool inverse) -> (Tensor grad_x, Tensor grad_log_scale_raw, Tensor grad_shift)");
  m.def("scale_prior_backward_composite(Tensor grad_log_prob, Tensor? grad_z, Tensor h, Tensor log_scale,"
        " str prior) -> (Tensor grad_h, Tensor grad_log_scale)");
}

namespace {

bool cuda_kernels_built() {
#ifdef NICE_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PyObject* py_cuda_kernels_built(PyObject*, PyObject*) {
  if (cuda_kernels_built()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static_assert(nice_ext::kRowKernelOps == 3, "every op's version is initialised below");
std::atomic<int> kernel_versions[nice_ext::kRowKernelOps] = {{nice_ext::kDefaultCudaKernelVersion[0]},
                                                               {nice_ext::kDefaultCudaKernelVersion[1]},
                                                               {nice_ext::kDefaultCudaKernelVersion[2]}};

// The op argument of the three functions below: a RowKernelOp's index (nice_ext.ops.CUDA_KERNEL_OPS).
bool row_kernel_op_from(long op) {
  if (op < 0 || op >= nice_ext::kRowKernelOps) {
    PyErr_Format(PyExc_ValueError, "no op with two generations of CUDA row kernels has the index %ld", op);
    return false;
  }
  return true;
}

PyObject* py_cuda_kernel_version(PyObject*, PyObject* arg) {
  const long op = PyLong_AsLong(arg);
  if ((op == -1 && PyErr_Occurred()) || !row_kernel_op_from(op)) return nullptr;
  return PyLong_FromLong(nice_ext::cuda_kernel_version(static_cast<nice_ext::RowKernelOp>(op)));
}

PyObject* py_default_cuda_kernel_version(PyObject*, PyObject* arg) {
  const long op = PyLong_AsLong(arg);
  if ((op == -1 && PyErr_Occurred()) || !row_kernel_op_from(op)) return nullptr;
  return PyLong_FromLong(nice_ext::kDefaultCudaKernelVersion[op]);
}

PyObject* py_set_cuda_kernel_version(PyObject*, PyObject* args) {
  long op = 0, version = 0;
  if (!PyArg_ParseTuple(args, "ll", &op, &version) || !row_kernel_op_from(op)) return nullptr;
  if (version != 1 && version != 2) {
    PyErr_Format(PyExc_ValueError, "the CUDA kernel version must be 1 or 2, got %ld", version);
    return nullptr;
  }
  nice_ext::set_cuda_kernel_version(static_cast<nice_ext::RowKernelOp>(op), static_cast<int>(version));
  Py_RETURN_NONE;
}

PyObject* py_source_digests(PyObject*, PyObject*) { return PyUnicode_FromString(NICE_EXT_SOURCE_DIGESTS); }

PyMethodDef methods[] = {
    {"source_digests", py_source_digests, METH_NOARGS,
     "The kernel sources this build compiled, one 'digest path' line each (empty when not recorded)."},
    {"cuda_kernels_built", py_cuda_kernels_built, METH_NOARGS,
     "True when the CUDA kernels were compiled into this build."},
    {"cuda_kernel_version", py_cuda_kernel_version, METH_O,
     "cuda_kernel_version(op): the generation of CUDA row kernels (1 or 2) that op runs."},
    {"default_cuda_kernel_version", py_default_cuda_kernel_version, METH_O,
     "default_cuda_kernel_version(op): the generation op runs in a new process."},
    {"set_cuda_kernel_version", py_set_cuda_kernel_version, METH_VARARGS,
     "set_cuda_kernel_version(op, version): selects op's generation of CUDA row kernels for the whole process."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "nice_ext's compiled kernels; importing it registers the nice_ext operators.", -1,
                      methods};

}  // namespace

namespace nice_ext {
int cuda_kernel_version(RowKernelOp op) {
  return kernel_versions[static_cast<int>(op)].load(std::memory_order_relaxed);
}
void set_cuda_kernel_version(RowKernelOp op, int version) {
  kernel_versions[static_cast<int>(op)].store(version, std::memory_order_relaxed);
}
}  // namespace nice_ext

// A plain CPython module: importing nice_ext._C loads the library, whose static initialisers register
// the operators with the dispatcher.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
