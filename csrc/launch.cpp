// peftkern._C.TritonLauncher: one launch of a Triton-compiled kernel from C++, for the host-bound training steps.
//
// Triton 3.5-3.6's own launch path (peftkern/kernels/triton/_launch.py calls its C function directly) still runs
// Python per argument: each host TMA descriptor is expanded into (CUtensorMap, shape..., strides...) in Python, a
// ~40-argument tuple is parsed, and each pointer is checked with a driver call. A launch of the persistent LoRA kernel
// cost the host ~100 us on a slow machine (NOTES-lora.md). This file does the same work in one C++ call: the kernel's
// parameter list is described once per compiled kernel (_launch.py reads it from the compiled signature), and each
// call reads the Python arguments in place, encodes or reuses the tensor maps, and calls cuLaunchKernelEx.
//
// The parameter layout is Triton 3.5-3.6's (make_launcher in triton/backends/nvidia/driver.py): constexprs dropped; a
// host tensor descriptor with TMA metadata becomes the CUtensorMap by value, then its shape as int32s and its strides
// as int64s; fp32 scalars go as their 32-bit pattern; two scratch pointers close the list. _launch.py builds a
// launcher only where that layout is the installed Triton's and the kernel needs no scratch memory.
//
// The driver's entry points come from libcuda.so.1 by dlsym, as Triton's launcher takes them: no link to libcuda.

#include <dlfcn.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

namespace {

namespace py = pybind11;

using LaunchKernelEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);
using TensorMapEncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                          const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                                          CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                          CUtensorMapFloatOOBfill);
using GetErrorString = CUresult (*)(CUresult, const char**);

struct Driver {
  LaunchKernelEx launch = nullptr;
  TensorMapEncodeTiled encode = nullptr;
  GetErrorString error_string = nullptr;
};

const Driver& driver() {
  static const Driver entries = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_LAZY);
    if (lib == nullptr) throw std::runtime_error("peftkern._C.TritonLauncher: cannot open libcuda.so.1");
    d.launch = reinterpret_cast<LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
    d.encode = reinterpret_cast<TensorMapEncodeTiled>(dlsym(lib, "cuTensorMapEncodeTiled"));
    d.error_string = reinterpret_cast<GetErrorString>(dlsym(lib, "cuGetErrorString"));
    if (d.launch == nullptr || d.encode == nullptr || d.error_string == nullptr)
      throw std::runtime_error("peftkern._C.TritonLauncher: libcuda.so.1 lacks cuLaunchKernelEx or "
                               "cuTensorMapEncodeTiled");
    return d;
  }();
  return entries;
}

void check_cu(CUresult res, const char* what) {
  if (res == CUDA_SUCCESS) return;
  const char* text = nullptr;
  driver().error_string(res, &text);
  throw std::runtime_error(std::string("peftkern._C.TritonLauncher: ") + what + " failed: " +
                           (text != nullptr ? text : "unknown CUDA error"));
}

// One kernel parameter, or for a descriptor the group (map, shape..., strides...) that Triton expands it into.
enum Kind : int { kPointer = 0, kInt8 = 1, kInt16 = 2, kInt32 = 3, kInt64 = 4, kFloat32 = 5, kFloat64 = 6,
                  kDescriptor = 7 };

constexpr int kMaxRank = 5;

// A tensor map's run-time inputs: everything else that goes into it is fixed per descriptor parameter.
struct MapKey {
  uint64_t address;
  int64_t shape[kMaxRank];
  int64_t strides[kMaxRank];
  bool operator==(const MapKey& o) const {
    return address == o.address && std::memcmp(shape, o.shape, sizeof(shape)) == 0 &&
           std::memcmp(strides, o.strides, sizeof(strides)) == 0;
  }
};

struct MapKeyHash {
  size_t operator()(const MapKey& k) const {
    uint64_t h = k.address * 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < kMaxRank; ++i) {
      h = (h ^ static_cast<uint64_t>(k.shape[i])) * 0x100000001B3ull;
      h = (h ^ static_cast<uint64_t>(k.strides[i])) * 0x100000001B3ull;
    }
    return static_cast<size_t>(h ^ (h >> 29));
  }
};

constexpr size_t kMaxMaps = 1024;  // per descriptor parameter; shapes that never repeat start the memo again

struct Slot {
  Kind kind;
  int arg;  // the position of its value in the call's argument tuple
  // descriptors only: the kernel's TMA metadata, fixed per compiled kernel
  int rank = 0;
  CUtensorMapDataType elem_type = CU_TENSOR_MAP_DATA_TYPE_UINT8;
  int elem_size = 0;
  CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_NONE;
  CUtensorMapFloatOOBfill fill = CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE;
  cuuint32_t box[kMaxRank] = {};  // innermost first, as the driver takes it
  std::unordered_map<MapKey, CUtensorMap, MapKeyHash> maps;
};

class TritonLauncher {
 public:
  // slots: (kind, argument position) per parameter, descriptors as (kDescriptor, position, host element type,
  // element size, swizzle, NaN padding, block shape (outermost first)).
  TritonLauncher(uint64_t function, int num_warps, int num_ctas, int shared, bool cooperative, bool pdl,
                 const py::list& slots, const py::object& descriptor_type)
      : function_(reinterpret_cast<CUfunction>(function)), num_warps_(num_warps), num_ctas_(num_ctas),
        shared_(shared), cooperative_(cooperative), pdl_(pdl),
        descriptor_type_(reinterpret_cast<PyTypeObject*>(descriptor_type.ptr())) {
    driver();  // fail here, not at the first launch, on a machine without the entry points
    Py_INCREF(descriptor_type.ptr());
    size_t words = 2;  // the scratch pointers
    for (const auto& item : slots) {
      auto t = item.cast<py::tuple>();
      Slot s;
      s.kind = static_cast<Kind>(t[0].cast<int>());
      s.arg = t[1].cast<int>();
      if (s.kind < kPointer || s.kind > kDescriptor) throw std::invalid_argument("TritonLauncher: unknown kind");
      if (s.kind == kDescriptor) {
        s.elem_type = static_cast<CUtensorMapDataType>(t[2].cast<int>());
        s.elem_size = t[3].cast<int>();
        s.swizzle = static_cast<CUtensorMapSwizzle>(t[4].cast<int>());
        s.fill = t[5].cast<bool>() ? CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
                                   : CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE;
        auto block = t[6].cast<std::vector<int64_t>>();
        s.rank = static_cast<int>(block.size());
        if (s.rank < 1 || s.rank > kMaxRank) throw std::invalid_argument("TritonLauncher: descriptor rank");
        for (int i = 0; i < s.rank; ++i) s.box[s.rank - 1 - i] = static_cast<cuuint32_t>(block[i]);
        words += 2 * s.rank;
        ++maps_;
      } else {
        ++words;
      }
      slots_.push_back(std::move(s));
    }
    values_.resize(words);
    params_.resize(words + maps_);
  }

  ~TritonLauncher() { Py_XDECREF(reinterpret_cast<PyObject*>(descriptor_type_)); }

  TritonLauncher(const TritonLauncher&) = delete;
  TritonLauncher& operator=(const TritonLauncher&) = delete;

  // Launch on the current stream of the current device. False (nothing launched) where an argument is not of the
  // kind this launcher reads: the caller then launches through Triton's path.
  bool launch(int grid_x, int grid_y, int grid_z, const py::tuple& args) {
    size_t p = 0, v = 0;
    const Py_ssize_t n = PyTuple_GET_SIZE(args.ptr());
    for (auto& s : slots_) {
      if (s.arg >= n) return false;
      PyObject* obj = PyTuple_GET_ITEM(args.ptr(), s.arg);
      if (s.kind == kDescriptor) {
        if (!descriptor(s, obj, p, v)) return false;
        continue;
      }
      uint64_t& word = values_[v++];
      params_[p++] = &word;
      if (s.kind == kPointer) {
        if (!pointer(obj, &word)) return false;
      } else if (s.kind == kFloat32 || s.kind == kFloat64) {
        if (!PyFloat_Check(obj) && !PyLong_Check(obj)) return false;
        const double x = PyFloat_AsDouble(obj);
        if (x == -1.0 && PyErr_Occurred()) {  // an int past a double's range: Triton's own launcher takes it
          PyErr_Clear();
          return false;
        }
        if (s.kind == kFloat32) {
          const float f = static_cast<float>(x);
          word = 0;
          std::memcpy(&word, &f, sizeof(f));
        } else {
          std::memcpy(&word, &x, sizeof(x));
        }
      } else {
        if (!PyLong_Check(obj)) return false;
        int overflow = 0;
        const long long x = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (overflow != 0) return false;
        word = 0;
        if (s.kind == kInt64) {
          std::memcpy(&word, &x, sizeof(int64_t));
        } else if (s.kind == kInt32) {
          if (x < INT32_MIN || x > INT32_MAX) return false;
          const int32_t y = static_cast<int32_t>(x);
          std::memcpy(&word, &y, sizeof(y));
        } else if (s.kind == kInt16) {  // i16 / u16: a value past 16 bits goes to Triton's launcher, not truncated
          if (x < INT16_MIN || x > UINT16_MAX) return false;
          const int16_t y = static_cast<int16_t>(x);
          std::memcpy(&word, &y, sizeof(y));
        } else {  // i1 / i8 / u8 likewise
          if (x < INT8_MIN || x > UINT8_MAX) return false;
          const int8_t y = static_cast<int8_t>(x);
          std::memcpy(&word, &y, sizeof(y));
        }
      }
    }
    for (int i = 0; i < 2; ++i) {  // global and profile scratch: none (the caller checked the kernel needs none)
      values_[v] = 0;
      params_[p++] = &values_[v++];
    }
    // in 64 bits: a product past 2^31 wrapped in int (to 0, which returned without launching)
    if (static_cast<int64_t>(grid_x) * grid_y * grid_z == 0) return true;

    CUlaunchAttribute attrs[4];
    unsigned int count = 0;
    if (pdl_) {
      attrs[count].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attrs[count++].value.programmaticStreamSerializationAllowed = 1;
    }
    if (cooperative_) {
      attrs[count].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attrs[count++].value.cooperative = 1;
    }
    if (num_ctas_ != 1) {
      attrs[count].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
      attrs[count].value.clusterDim.x = num_ctas_;
      attrs[count].value.clusterDim.y = 1;
      attrs[count++].value.clusterDim.z = 1;
      attrs[count].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE;
      attrs[count++].value.clusterSchedulingPolicyPreference = CU_CLUSTER_SCHEDULING_POLICY_SPREAD;
    }
    CUlaunchConfig config;
    std::memset(&config, 0, sizeof(config));
    config.gridDimX = static_cast<unsigned int>(grid_x * num_ctas_);
    config.gridDimY = static_cast<unsigned int>(grid_y);
    config.gridDimZ = static_cast<unsigned int>(grid_z);
    config.blockDimX = static_cast<unsigned int>(32 * num_warps_);
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = static_cast<unsigned int>(shared_);
    config.hStream = reinterpret_cast<CUstream>(at::cuda::getCurrentCUDAStream().stream());
    config.attrs = attrs;
    config.numAttrs = count;
    check_cu(driver().launch(&config, function_, params_.data(), nullptr), "cuLaunchKernelEx");
    return true;
  }

 private:
  // A CUDA tensor's address (None: 0).
  static bool pointer(PyObject* obj, uint64_t* out) {
    if (obj == Py_None) {
      *out = 0;
      return true;
    }
    if (!THPVariable_Check(obj)) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.is_cuda()) return false;
    *out = reinterpret_cast<uint64_t>(t.data_ptr());
    return true;
  }

  // peftkern's Descriptor (its shape and strides are its base tensor's): the tensor map for the base's address,
  // shape and strides, then the shape as int32s and the strides as int64s.
  bool descriptor(Slot& s, PyObject* obj, size_t& p, size_t& v) {
    if (Py_TYPE(obj) != descriptor_type_) return false;
    static PyObject* base_name = PyUnicode_InternFromString("base");
    auto base = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, base_name));
    if (!base) {
      PyErr_Clear();
      return false;
    }
    if (!THPVariable_Check(base.ptr())) return false;
    const at::Tensor& t = THPVariable_Unpack(base.ptr());
    if (!t.is_cuda() || t.dim() != s.rank || t.stride(s.rank - 1) != 1) return false;
    MapKey key;
    std::memset(&key, 0, sizeof(key));
    key.address = reinterpret_cast<uint64_t>(t.data_ptr());
    for (int i = 0; i < s.rank; ++i) {
      key.shape[i] = t.size(i);
      key.strides[i] = t.stride(i);
    }
    auto found = s.maps.find(key);
    if (found == s.maps.end()) {
      if (s.maps.size() >= kMaxMaps) s.maps.clear();
      found = s.maps.emplace(key, encode(s, key)).first;
    }
    params_[p++] = &found->second;
    for (int i = 0; i < s.rank; ++i) {
      const int32_t dim = static_cast<int32_t>(key.shape[i]);
      values_[v] = 0;
      std::memcpy(&values_[v], &dim, sizeof(dim));
      params_[p++] = &values_[v++];
    }
    for (int i = 0; i < s.rank; ++i) {
      std::memcpy(&values_[v], &key.strides[i], sizeof(int64_t));
      params_[p++] = &values_[v++];
    }
    return true;
  }

  // cuTensorMapEncodeTiled as Triton's fill_tma_descriptor calls it.
  static CUtensorMap encode(const Slot& s, const MapKey& key) {
    cuuint64_t dims[kMaxRank], strides[kMaxRank];
    const int r = s.rank;
    for (int i = 0; i < r; ++i) dims[r - 1 - i] = static_cast<cuuint64_t>(key.shape[i]);
    for (int i = 0; i + 1 < r; ++i) strides[r - 2 - i] = static_cast<cuuint64_t>(s.elem_size * key.strides[i]);
    strides[r - 1] = dims[r - 1] * (r == 1 ? s.elem_size : strides[r - 2]);
    const cuuint32_t element_strides[kMaxRank] = {1, 1, 1, 1, 1};
    CUtensorMap map;
    check_cu(driver().encode(&map, s.elem_type, static_cast<cuuint32_t>(r), reinterpret_cast<void*>(key.address),
                             dims, strides, s.box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, s.swizzle,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_128B, s.fill),
             "cuTensorMapEncodeTiled");
    return map;
  }

  CUfunction function_;
  int num_warps_, num_ctas_, shared_;
  bool cooperative_, pdl_;
  PyTypeObject* descriptor_type_;
  std::vector<Slot> slots_;
  size_t maps_ = 0;
  std::vector<uint64_t> values_;  // every non-map parameter's bytes, one 8-byte word each
  std::vector<void*> params_;
};

// Tensors on ref's device for a launch's outputs and workspaces: specs is a tuple of (shape tuple, torch.dtype, zero),
// each made by at::empty on the caching allocator and, where zero is true, cleared by cudaMemsetAsync on the current
// stream. From Python each torch.empty cost the host ~6 us and each torch.zeros ~7 (a fill kernel through the
// dispatcher, scripts/host_costs.py on an H200 machine); a persistent LoRA launch makes three, skinny_grads six.
py::list empty_buffers(const at::Tensor& ref, const py::tuple& specs) {
  if (!ref.is_cuda()) throw std::invalid_argument("empty_buffers: ref must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(ref.device());
  const auto stream = at::cuda::getCurrentCUDAStream(ref.device().index());
  py::list out;
  for (const auto& item : specs) {
    auto spec = item.cast<py::tuple>();
    auto shape = spec[0].cast<std::vector<int64_t>>();
    PyObject* dtype = spec[1].ptr();
    if (!THPDtype_Check(dtype)) throw std::invalid_argument("empty_buffers: a spec's dtype must be a torch.dtype");
    at::Tensor t = at::empty(shape, ref.options().dtype(reinterpret_cast<THPDtype*>(dtype)->scalar_type));
    if (spec[2].cast<bool>() && t.nbytes() > 0) {
      const cudaError_t err = cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), stream.stream());
      if (err != cudaSuccess)
        throw std::runtime_error(std::string("empty_buffers: cudaMemsetAsync failed: ") + cudaGetErrorString(err));
    }
    out.append(py::cast(t));
  }
  return out;
}

}  // namespace

namespace peftkern {

void bind_launcher(py::module& m) {
  py::class_<TritonLauncher>(m, "TritonLauncher",
                             "A Triton-compiled kernel's launch from C++ (Triton 3.5-3.6's parameter layout)")
      .def(py::init<uint64_t, int, int, int, bool, bool, const py::list&, const py::object&>(), py::arg("function"),
           py::arg("num_warps"), py::arg("num_ctas"), py::arg("shared"), py::arg("cooperative"), py::arg("pdl"),
           py::arg("slots"), py::arg("descriptor_type"))
      .def("launch", &TritonLauncher::launch, "launch on the current stream; False if an argument is not readable",
           py::arg("grid_x"), py::arg("grid_y"), py::arg("grid_z"), py::arg("args"));
  m.def("empty_buffers", &empty_buffers, "tensors on ref's device from (shape, dtype, zero) specs; zero: cleared",
        py::arg("ref"), py::arg("specs"));
  m.attr("TRITON_LAUNCHER_KINDS") = py::dict(
      py::arg("pointer") = static_cast<int>(kPointer), py::arg("i8") = static_cast<int>(kInt8),
      py::arg("i16") = static_cast<int>(kInt16), py::arg("i32") = static_cast<int>(kInt32),
      py::arg("i64") = static_cast<int>(kInt64), py::arg("fp32") = static_cast<int>(kFloat32),
      py::arg("fp64") = static_cast<int>(kFloat64), py::arg("descriptor") = static_cast<int>(kDescriptor));
}

}  // namespace peftkern
