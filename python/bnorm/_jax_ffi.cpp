// XLA FFI handlers for bnorm.jax: jitted JAX programs call bnorm's CPU kernels directly
// (a custom call in the compiled program, no Python or host callback in between).
//
// Built into bnorm._core only when XLA's FFI headers are found (CMake option BNORM_JAX_FFI,
// cmake/jax_ffi.cmake); _core.cpp calls bind_jax_ffi(), which exports each handler as a
// PyCapsule that python/bnorm/jax.py registers with jax.ffi.register_ffi_target.
//
// Buffers are XLA's default row-major layout. Each handler views x around its channel
// axis (attribute `axis`, already made non-negative by bnorm.jax) as bnorm's
// (outer, C, inner) shape, checks every buffer's dtype and size (bnorm.jax checked the
// user's arguments already, with the messages of the NumPy API), and runs the kernel.
#include <nanobind/nanobind.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>

#include "bnorm/bnorm.hpp"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace {

template <class T> constexpr ffi::DataType data_type() {
    if constexpr (std::is_same_v<T, float>) return ffi::DataType::F32;
    else if constexpr (std::is_same_v<T, double>) return ffi::DataType::F64;
    else return ffi::DataType::F16;
}

// x's (outer, C, inner) view around `axis`, or an error for an axis out of range.
ffi::ErrorOr<bnorm::Shape> shape_of(const ffi::AnyBuffer& x, int64_t axis) {
    const auto dims = x.dimensions();
    const int64_t rank = int64_t(dims.size());
    if (axis < 0 || axis >= rank) return ffi::Unexpected(ffi::Error::InvalidArgument("bnorm: axis out of range"));
    bnorm::Shape s{1, dims[axis], 1};
    for (int64_t i = 0; i < axis; ++i) s.outer *= dims[i];
    for (int64_t i = axis + 1; i < rank; ++i) s.inner *= dims[i];
    return s;
}

// The data of buffer b as U*, after checking its dtype and element count.
template <class U, class B>
U* data(const B& b, const char* name, int64_t size) {
    if (b.element_type() != data_type<std::remove_const_t<U>>())
        throw bnorm::TypeError(std::string("bnorm: ") + name + " has the wrong dtype");
    if (int64_t(b.element_count()) != size)
        throw bnorm::ValueError(std::string("bnorm: ") + name + " has " + std::to_string(b.element_count()) +
                                " elements, expected " + std::to_string(size));
    return static_cast<U*>(b.untyped_data());
}

// Runs fn(T{}) for x's element type, turning bnorm's exceptions into FFI errors.
template <class Fn>
ffi::Error run(const ffi::AnyBuffer& x, Fn&& fn) {
    try {
        switch (x.element_type()) {
            case ffi::DataType::F32: fn(float{}); break;
            case ffi::DataType::F64: fn(double{}); break;
            case ffi::DataType::F16: fn(bnorm::half{}); break;
            default: return ffi::Error::InvalidArgument("bnorm: x must be float16, float32 or float64");
        }
    } catch (const std::exception& e) {
        return ffi::Error::InvalidArgument(e.what());
    }
    return ffi::Error::Success();
}

// Training forward. new_running_mean / new_running_var alias running_mean / running_var
// (input_output_aliases in bnorm.jax: XLA copies the inputs first where they are still
// needed), so the kernel updates them in place; they are copied here only if XLA did not
// alias them.
ffi::Error forward_train(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias, ffi::AnyBuffer running_mean,
                         ffi::AnyBuffer running_var, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> save_mean, ffi::Result<ffi::AnyBuffer> save_invstd,
                         ffi::Result<ffi::AnyBuffer> new_running_mean, ffi::Result<ffi::AnyBuffer> new_running_var,
                         int64_t axis, double momentum, double eps) {
    const auto s = shape_of(x, axis);
    if (s.has_error()) return s.error();
    return run(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        const int64_t C = s->channels, N = s->size();
        P* rm = data<P>(*new_running_mean, "new_running_mean", C);
        P* rv = data<P>(*new_running_var, "new_running_var", C);
        const P* rm_in = data<const P>(running_mean, "running_mean", C);
        const P* rv_in = data<const P>(running_var, "running_var", C);
        if (rm != rm_in) std::copy(rm_in, rm_in + C, rm);
        if (rv != rv_in) std::copy(rv_in, rv_in + C, rv);
        bnorm::forward_train<T>(data<const T>(x, "x", N), *s, data<const P>(weight, "weight", C),
                                data<const P>(bias, "bias", C), rm, rv, momentum, eps, data<T>(*y, "y", N),
                                data<P>(*save_mean, "save_mean", C), data<P>(*save_invstd, "save_invstd", C));
    });
}

ffi::Error forward_infer(ffi::AnyBuffer x, ffi::AnyBuffer running_mean, ffi::AnyBuffer running_var,
                         ffi::AnyBuffer weight, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y, int64_t axis,
                         double eps) {
    const auto s = shape_of(x, axis);
    if (s.has_error()) return s.error();
    return run(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        const int64_t C = s->channels, N = s->size();
        bnorm::forward_infer<T>(data<const T>(x, "x", N), *s, data<const P>(running_mean, "running_mean", C),
                                data<const P>(running_var, "running_var", C), data<const P>(weight, "weight", C),
                                data<const P>(bias, "bias", C), eps, data<T>(*y, "y", N));
    });
}

ffi::Error backward(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer invstd,
                    ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweight,
                    ffi::Result<ffi::AnyBuffer> dbias, int64_t axis, bool batch_stats) {
    const auto s = shape_of(x, axis);
    if (s.has_error()) return s.error();
    return run(x, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        const int64_t C = s->channels, N = s->size();
        bnorm::backward<T>(data<const T>(dy, "dy", N), data<const T>(x, "x", N), *s, data<const P>(mean, "mean", C),
                           data<const P>(invstd, "invstd", C), data<const P>(weight, "weight", C), batch_stats,
                           data<T>(*dx, "dx", N), data<P>(*dweight, "dweight", C), data<P>(*dbias, "dbias", C));
    });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(bnorm_jax_forward_train, forward_train,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // weight
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // running_mean
                                  .Arg<ffi::AnyBuffer>()  // running_var
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // save_mean
                                  .Ret<ffi::AnyBuffer>()  // save_invstd
                                  .Ret<ffi::AnyBuffer>()  // new_running_mean
                                  .Ret<ffi::AnyBuffer>()  // new_running_var
                                  .Attr<int64_t>("axis")
                                  .Attr<double>("momentum")
                                  .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(bnorm_jax_forward_infer, forward_infer,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // running_mean
                                  .Arg<ffi::AnyBuffer>()  // running_var
                                  .Arg<ffi::AnyBuffer>()  // weight
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("axis")
                                  .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(bnorm_jax_backward, backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // mean
                                  .Arg<ffi::AnyBuffer>()  // invstd
                                  .Arg<ffi::AnyBuffer>()  // weight
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dweight
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Attr<int64_t>("axis")
                                  .Attr<bool>("batch_stats"));

// bnorm._core.jax_ffi_targets(): {target name: PyCapsule of its CPU handler}.
void bind_jax_ffi(nb::module_& m) {
    m.def("jax_ffi_targets", []() {
        nb::dict targets;
        targets["bnorm_forward_train"] = nb::capsule(reinterpret_cast<void*>(bnorm_jax_forward_train));
        targets["bnorm_forward_infer"] = nb::capsule(reinterpret_cast<void*>(bnorm_jax_forward_infer));
        targets["bnorm_backward"] = nb::capsule(reinterpret_cast<void*>(bnorm_jax_backward));
        return targets;
    });
}
