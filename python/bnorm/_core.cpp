// bnorm._core: the nanobind bindings, the only code that knows nanobind.
//
// Each function takes C-contiguous arrays (NumPy on the CPU, or any DLPack array on a CUDA
// device) already allocated and shaped by the Python layer (python/bnorm/_functional.py),
// which owns the user-facing checks and messages. Here every array's dtype, device and size
// is checked again, so that no call can touch memory it was not given; then the GIL is
// released and the C++ API runs on the arrays' device.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>
#include <type_traits>

#include "bnorm/bnorm.hpp"
#include "core_capi.h"

#if defined(__GLIBCXX__) && defined(__GLIBC__)
#include <cxxabi.h>
#include <unistd.h>
#define BNORM_FORCED_UNWIND 1
#else
#define BNORM_FORCED_UNWIND 0
#endif

#ifndef BNORM_HAS_CUDA
#define BNORM_HAS_CUDA 0
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using In = nb::ndarray<nb::ro, nb::c_contig>;   // read; may be a read-only array
using Out = nb::ndarray<nb::c_contig>;          // written; must be writeable
using OptIn = std::optional<In>;
using OptOut = std::optional<Out>;
using ShapeTuple = std::tuple<int64_t, int64_t, int64_t>;

const nb::dlpack::dtype kHalf{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
const nb::dlpack::dtype kBfloat16{uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1};

// NumPy exports no buffer nor DLPack capsule for ml_dtypes.bfloat16 arrays: the Python
// layer passes them as uint16 views of the same memory, so on the CPU uint16 data is
// bfloat16 (_core is private; _functional.py checks every dtype first).
const nb::dlpack::dtype kUint16 = nb::dtype<uint16_t>();

bool is_bfloat16(const nb::dlpack::dtype& dt, int32_t device_type) {
    return dt == kBfloat16 || (dt == kUint16 && device_type == nb::device::cpu::value);
}

template <class T> nb::dlpack::dtype dtype_of() {
    if constexpr (std::is_same_v<T, bnorm::half>) return kHalf;
    else if constexpr (std::is_same_v<T, bnorm::bfloat16>) return kBfloat16;
    else return nb::dtype<T>();
}

// One call's device and stream, taken from x; every other array must match it.
class Context {
public:
    Context(const In& x, uintptr_t stream) : device_type_(x.device_type()), device_id_(x.device_id()), stream_(stream) {
        if (device_type_ == nb::device::cuda::value) {
#if BNORM_HAS_CUDA
            bnorm::cuda::set_device(device_id_);
#else
            throw bnorm::ValueError("bnorm: x is a CUDA array but bnorm was built without CUDA");
#endif
        } else if (device_type_ != nb::device::cpu::value) {
            throw bnorm::ValueError("bnorm: x must be a CPU (NumPy) or CUDA array");
        } else if (stream != 0) {
            throw bnorm::ValueError("bnorm: stream= applies to CUDA arrays only");
        }
    }

    bool cuda() const { return device_type_ == nb::device::cuda::value; }
#if BNORM_HAS_CUDA
    bnorm::cuda::stream_t stream() const { return reinterpret_cast<bnorm::cuda::stream_t>(stream_); }
#endif

    // The data of `a` as const T* (In) or T* (Out), after checking device, dtype and size.
    template <class T, class A>
    auto get(const A& a, const char* name, size_t size) const {
        if (a.device_type() != device_type_ || a.device_id() != device_id_)
            throw bnorm::ValueError(std::string("bnorm: ") + name + " is not on x's device");
        const bool bf16_view = std::is_same_v<T, bnorm::bfloat16> && is_bfloat16(a.dtype(), device_type_);
        if (a.dtype() != dtype_of<T>() && !bf16_view)
            throw bnorm::TypeError(std::string("bnorm: ") + name + " has the wrong dtype");
        if (a.size() != size)
            throw bnorm::ValueError(std::string("bnorm: ") + name + " has " + std::to_string(a.size()) +
                                    " elements, expected " + std::to_string(size));
        using Data = std::conditional_t<std::is_same_v<A, In>, const T*, T*>;
        return static_cast<Data>(a.data());
    }

    template <class T, class A>
    auto get(const std::optional<A>& a, const char* name, size_t size) const {
        return a ? get<T>(*a, name, size) : decltype(get<T>(*a, name, size))(nullptr);
    }

private:
    int32_t device_type_, device_id_;
    uintptr_t stream_;
};

// Calls fn(T{}) with T the element type of x.
template <class Fn>
void dispatch(const In& x, Fn&& fn) {
    const nb::dlpack::dtype dt = x.dtype();
    if (dt == nb::dtype<float>()) fn(float{});
    else if (dt == nb::dtype<double>()) fn(double{});
    else if (dt == kHalf) fn(bnorm::half{});
    else if (is_bfloat16(dt, x.device_type())) fn(bnorm::bfloat16{});
    else throw bnorm::TypeError("bnorm: x must be float16, bfloat16, float32 or float64");
}

// Runs bnorm::op (CPU) or bnorm::cuda::op (with the call's stream) on T.
#if BNORM_HAS_CUDA
#define BNORM_RUN(ctx, op, T, ...)                                                        \
    do {                                                                                  \
        if ((ctx).cuda()) bnorm::cuda::op<T>(__VA_ARGS__, (ctx).stream());                \
        else bnorm::op<T>(__VA_ARGS__);                                                   \
    } while (0)
#else
#define BNORM_RUN(ctx, op, T, ...) bnorm::op<T>(__VA_ARGS__)
#endif

// The fused epilogue's arguments: an optional array shaped like x (residual, or the fused
// forward's y) and the activation (a bool: ReLU or none).
template <class T>
bnorm::Epilogue<T> epilogue_of(const Context& ctx, const OptIn& residual, bool relu, size_t n) {
    return {ctx.get<T>(residual, "residual", n), relu ? bnorm::Activation::relu : bnorm::Activation::none};
}

template <class T>
bnorm::EpilogueGrad<T> grad_of(const Context& ctx, const OptIn& y, bool relu, size_t n) {
    return {relu ? bnorm::Activation::relu : bnorm::Activation::none, ctx.get<T>(y, "y", n)};
}

// Releases the GIL for a call, like nb::gil_scoped_release, but survives the end of the
// interpreter. When the interpreter finalizes while a daemon thread is inside a bnorm call,
// that thread's PyEval_RestoreThread (Python 3.10 to 3.13 on glibc) ends it with
// pthread_exit, which unwinds the stack with abi::__forced_unwind. The unwind would cross
// this destructor (noexcept) and nanobind's dispatcher (noexcept, catch (...)): the process
// would abort with "terminate called without an active exception". Instead the unwind is
// caught here and the thread sleeps until the process exits, which is what Python 3.14 does
// itself (PyThread_hang_thread). A caught forced unwind must not be left (glibc aborts with
// "exception not rethrown"), hence the loop that never returns. Docs: docs/faq.md.
class ReleaseGil {
public:
    ReleaseGil() noexcept : state_(PyEval_SaveThread()) {}
    ~ReleaseGil() {
#if BNORM_FORCED_UNWIND
        try {
            PyEval_RestoreThread(state_);
        } catch (abi::__forced_unwind&) {
            for (;;) pause();
        }
#else
        PyEval_RestoreThread(state_);
#endif
    }
    ReleaseGil(const ReleaseGil&) = delete;
    ReleaseGil& operator=(const ReleaseGil&) = delete;

private:
    PyThreadState* state_;
};

bnorm::Shape to_shape(const ShapeTuple& t) { return {std::get<0>(t), std::get<1>(t), std::get<2>(t)}; }

size_t elements(bnorm::Shape s) {
    if (s.outer < 0 || s.channels < 0 || s.inner < 0) throw bnorm::ValueError("bnorm: negative shape");
    return size_t(s.size());
}

void batch_stats(const In& x, ShapeTuple shape_, const Out& mean, const Out& var, uintptr_t stream) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, batch_stats, T, ctx.get<T>(x, "x", elements(s)), s, ctx.get<P>(mean, "mean", C),
                  ctx.get<P>(var, "var", C));
    });
}

void merge_stats(const In& counts, const In& means, const In& vars, const Out& count,
                 const Out& mean, const Out& var, uintptr_t stream) {
    const Context ctx(means, stream);
    if (means.ndim() != 2) throw bnorm::ValueError("bnorm: means must be 2-D (parts, channels)");
    const int64_t parts = int64_t(means.shape(0)), channels = int64_t(means.shape(1));
    const size_t n = size_t(parts * channels), C = size_t(channels);
    auto run = [&](auto tag) {
        using P = decltype(tag);
        const double* c = ctx.get<double>(counts, "counts", n);
        const P* m = ctx.get<P>(means, "means", n);
        const P* v = ctx.get<P>(vars, "vars", n);
        double* total = ctx.get<double>(count, "count", C);
        P* out_mean = ctx.get<P>(mean, "mean", C);
        P* out_var = ctx.get<P>(var, "var", C);
#if BNORM_HAS_CUDA
        if (ctx.cuda()) return bnorm::cuda::merge_stats<P>(parts, channels, c, m, v, total, out_mean, out_var, ctx.stream());
#endif
        bnorm::merge_stats<P>(parts, channels, c, m, v, total, out_mean, out_var);
    };
    if (means.dtype() == nb::dtype<float>()) run(float{});
    else if (means.dtype() == nb::dtype<double>()) run(double{});
    else throw bnorm::TypeError("bnorm: means must be float32 or float64");
}

void normalize(const In& x, ShapeTuple shape_, const In& mean, const In& invstd, const OptIn& weight,
               const OptIn& bias, const Out& y, uintptr_t stream, const OptIn& residual, bool relu) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, normalize, T, ctx.get<T>(x, "x", N), s, ctx.get<P>(mean, "mean", C),
                  ctx.get<P>(invstd, "invstd", C), ctx.get<P>(weight, "weight", C), ctx.get<P>(bias, "bias", C),
                  epilogue_of<T>(ctx, residual, relu, N), ctx.get<T>(y, "out", N));
    });
}

void forward_train(const In& x, ShapeTuple shape_, const OptIn& weight, const OptIn& bias,
                   const OptOut& running_mean, const OptOut& running_var, double momentum, double eps,
                   const Out& y, const Out& save_mean, const Out& save_invstd, uintptr_t stream,
                   const OptIn& residual, bool relu, bool unbiased_running_var) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, forward_train, T, ctx.get<T>(x, "x", N), s, ctx.get<P>(weight, "weight", C),
                  ctx.get<P>(bias, "bias", C), ctx.get<P>(running_mean, "running_mean", C),
                  ctx.get<P>(running_var, "running_var", C), momentum, eps, epilogue_of<T>(ctx, residual, relu, N),
                  ctx.get<T>(y, "out", N), ctx.get<P>(save_mean, "save_mean", C),
                  ctx.get<P>(save_invstd, "save_invstd", C), unbiased_running_var);
    });
}

void forward_infer(const In& x, ShapeTuple shape_, const In& running_mean, const In& running_var,
                   const OptIn& weight, const OptIn& bias, double eps, const Out& y, uintptr_t stream,
                   const OptIn& residual, bool relu) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, forward_infer, T, ctx.get<T>(x, "x", N), s, ctx.get<P>(running_mean, "running_mean", C),
                  ctx.get<P>(running_var, "running_var", C), ctx.get<P>(weight, "weight", C),
                  ctx.get<P>(bias, "bias", C), eps, epilogue_of<T>(ctx, residual, relu, N), ctx.get<T>(y, "out", N));
    });
}

void backward_reduce(const In& dy, const In& x, ShapeTuple shape_, const In& mean, const In& invstd,
                     const Out& sum_dy, const Out& sum_dy_xhat, uintptr_t stream, const OptIn& y, bool relu) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, backward_reduce, T, ctx.get<T>(dy, "dy", N), ctx.get<T>(x, "x", N), s,
                  ctx.get<P>(mean, "mean", C), ctx.get<P>(invstd, "invstd", C), grad_of<T>(ctx, y, relu, N),
                  ctx.get<P>(sum_dy, "sum_dy", C), ctx.get<P>(sum_dy_xhat, "sum_dy_xhat", C));
    });
}

void backward_elemt(const In& dy, const In& x, ShapeTuple shape_, const In& mean, const In& invstd,
                    const OptIn& weight, const In& sum_dy, const In& sum_dy_xhat, double count,
                    const Out& dx, uintptr_t stream, const OptIn& y, bool relu, const OptOut& dsum) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, backward_elemt, T, ctx.get<T>(dy, "dy", N), ctx.get<T>(x, "x", N), s,
                  ctx.get<P>(mean, "mean", C), ctx.get<P>(invstd, "invstd", C), ctx.get<P>(weight, "weight", C),
                  ctx.get<P>(sum_dy, "sum_dy", C), ctx.get<P>(sum_dy_xhat, "sum_dy_xhat", C), count,
                  grad_of<T>(ctx, y, relu, N), ctx.get<T>(dx, "out", N), ctx.get<T>(dsum, "dsum", N));
    });
}

void backward(const In& dy, const In& x, ShapeTuple shape_, const In& mean, const In& invstd,
              const OptIn& weight, bool batch_stats, const Out& dx, const Out& dweight, const Out& dbias,
              uintptr_t stream, const OptIn& y, bool relu, const OptOut& dsum) {
    const Context ctx(x, stream);
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        BNORM_RUN(ctx, backward, T, ctx.get<T>(dy, "dy", N), ctx.get<T>(x, "x", N), s, ctx.get<P>(mean, "mean", C),
                  ctx.get<P>(invstd, "invstd", C), ctx.get<P>(weight, "weight", C), batch_stats,
                  grad_of<T>(ctx, y, relu, N), ctx.get<T>(dx, "out", N), ctx.get<P>(dweight, "dweight", C),
                  ctx.get<P>(dbias, "dbias", C), ctx.get<T>(dsum, "dsum", N));
    });
}

void fold(const In& weight, const OptIn& bias, ShapeTuple shape_, const In& running_mean, const In& running_var,
          const OptIn& bn_weight, const OptIn& bn_bias, double eps, const Out& weight_out, const Out& bias_out) {
    const Context ctx(weight, 0);
    if (ctx.cuda()) throw bnorm::ValueError("bnorm: fold takes CPU (NumPy) arrays");
    const bnorm::Shape s = to_shape(shape_);
    const size_t C = size_t(s.channels), N = elements(s);
    dispatch(weight, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        bnorm::fold<T>(ctx.get<T>(weight, "weight", N), ctx.get<T>(bias, "bias", C), s,
                       ctx.get<P>(running_mean, "running_mean", C), ctx.get<P>(running_var, "running_var", C),
                       ctx.get<P>(bn_weight, "bn_weight", C), ctx.get<P>(bn_bias, "bn_bias", C), eps,
                       ctx.get<T>(weight_out, "weight_out", N), ctx.get<T>(bias_out, "bias_out", C));
    });
}

#if BNORM_HAS_CUDA
// A device buffer owned by Python (freed when the last reference to it, or to an array exported
// from it, goes): the outputs of frameworks whose arrays are immutable (JAX), which bnorm
// first writes, taking them as an op's input, then hands over. Each export() is a fresh DLPack
// view: a DLPack capsule can be consumed only once.
struct DeviceBuffer {
    void* data = nullptr;
    std::vector<size_t> shape;
    nb::dlpack::dtype dtype{};
    int device = 0;
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { bnorm::cuda::deallocate(data); }
};

std::unique_ptr<DeviceBuffer> cuda_empty(const std::vector<size_t>& shape, const std::string& dtype, int device) {
    auto buffer = std::make_unique<DeviceBuffer>();
    if (dtype == "float32") buffer->dtype = nb::dtype<float>();
    else if (dtype == "float64") buffer->dtype = nb::dtype<double>();
    else if (dtype == "float16") buffer->dtype = kHalf;
    else if (dtype == "bfloat16") buffer->dtype = kBfloat16;
    else throw bnorm::TypeError("bnorm: cannot allocate dtype " + dtype);
    size_t bytes = buffer->dtype.bits / 8;
    for (size_t n : shape) bytes *= n;
    bnorm::cuda::set_device(device);
    buffer->data = bnorm::cuda::allocate(bytes);
    buffer->shape = shape;
    buffer->device = device;
    return buffer;
}

nb::ndarray<> export_buffer(nb::handle self) {
    const DeviceBuffer& b = nb::cast<const DeviceBuffer&>(self);
    return nb::ndarray<>(b.data, b.shape.size(), b.shape.data(), self, nullptr, b.dtype, nb::device::cuda::value,
                         b.device);
}
#endif

bool cuda_available() {
#if BNORM_HAS_CUDA
    return bnorm::cuda::available();
#else
    return false;
#endif
}

}  // namespace

const bnorm_core_capi* bnorm_core_capi_table();  // _core_capi.cpp

#if BNORM_JAX_FFI
void bind_jax_ffi(nb::module_& m);  // _jax_ffi.cpp: bnorm.jax's XLA FFI handlers
#endif

NB_MODULE(_core, m) {
    m.doc() = "bnorm's compiled core. Use the functions in the bnorm package, not these.";
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const bnorm::TypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        }
    });

    const auto release = nb::call_guard<ReleaseGil>();
    m.def("batch_stats", &batch_stats, "x"_a, "shape"_a, "mean"_a, "var"_a, "stream"_a = 0, release);
    m.def("merge_stats", &merge_stats, "counts"_a, "means"_a, "vars"_a, "count"_a, "mean"_a, "var"_a,
          "stream"_a = 0, release);
    m.def("normalize", &normalize, "x"_a, "shape"_a, "mean"_a, "invstd"_a, "weight"_a.none(), "bias"_a.none(),
          "y"_a, "stream"_a = 0, "residual"_a.none() = nb::none(), "relu"_a = false, release);
    m.def("forward_train", &forward_train, "x"_a, "shape"_a, "weight"_a.none(), "bias"_a.none(),
          "running_mean"_a.none(), "running_var"_a.none(), "momentum"_a, "eps"_a, "y"_a, "save_mean"_a,
          "save_invstd"_a, "stream"_a = 0, "residual"_a.none() = nb::none(), "relu"_a = false,
          "unbiased_running_var"_a = true, release);
    m.def("forward_infer", &forward_infer, "x"_a, "shape"_a, "running_mean"_a, "running_var"_a,
          "weight"_a.none(), "bias"_a.none(), "eps"_a, "y"_a, "stream"_a = 0, "residual"_a.none() = nb::none(),
          "relu"_a = false, release);
    m.def("backward_reduce", &backward_reduce, "dy"_a, "x"_a, "shape"_a, "mean"_a, "invstd"_a, "sum_dy"_a,
          "sum_dy_xhat"_a, "stream"_a = 0, "y"_a.none() = nb::none(), "relu"_a = false, release);
    m.def("backward_elemt", &backward_elemt, "dy"_a, "x"_a, "shape"_a, "mean"_a, "invstd"_a, "weight"_a.none(),
          "sum_dy"_a, "sum_dy_xhat"_a, "count"_a, "dx"_a, "stream"_a = 0, "y"_a.none() = nb::none(), "relu"_a = false,
          "dsum"_a.none() = nb::none(), release);
    m.def("backward", &backward, "dy"_a, "x"_a, "shape"_a, "mean"_a, "invstd"_a, "weight"_a.none(),
          "batch_stats"_a, "dx"_a, "dweight"_a, "dbias"_a, "stream"_a = 0, "y"_a.none() = nb::none(),
          "relu"_a = false, "dsum"_a.none() = nb::none(), release);
    m.def("fold", &fold, "weight"_a, "bias"_a.none(), "shape"_a, "running_mean"_a, "running_var"_a,
          "bn_weight"_a.none(), "bn_bias"_a.none(), "eps"_a, "weight_out"_a, "bias_out"_a, release);
    m.def("set_num_threads", &bnorm::set_num_threads, "n"_a);
    m.def("get_num_threads", &bnorm::get_num_threads);
    m.def("max_num_threads", &bnorm::max_num_threads);
    m.def("_backoff_count", &bnorm::backoff_count);  // (a diagnostic for the benchmarks: private)
    m.def("cpu_isa", &bnorm::cpu_isa);
    m.def("cuda_available", &cuda_available);
#if BNORM_HAS_CUDA
    nb::class_<DeviceBuffer>(m, "DeviceBuffer").def("export", &export_buffer);
    m.def("cuda_empty", &cuda_empty, "shape"_a, "dtype"_a, "device"_a);
    m.def("cuda_synchronize", [](uintptr_t stream, int device) {
        bnorm::cuda::set_device(device);  // (the legacy stream 0 is the current device's)
        bnorm::cuda::synchronize(reinterpret_cast<bnorm::cuda::stream_t>(stream));
    }, "stream"_a, "device"_a, release);
#endif
#if BNORM_JAX_FFI
    bind_jax_ffi(m);
#endif
    // the C interface of bnorm's PyTorch operators library (core_capi.h), as a named capsule
    m.attr("_capi") = nb::capsule(bnorm_core_capi_table(), "bnorm._core.capi");
    m.attr("built_with_cuda") = bool(BNORM_HAS_CUDA);
    m.attr("__version__") = BNORM_VERSION_STRING;
}
