// Argument checks of the public entry points, shared by the CPU (cpu_api.cpp) and CUDA
// (cuda/*.cu) backends, so that both reject the same inputs with the same messages. Each
// names the operation and the argument; all run before anything is computed or written.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <clocale>
#include <cstdlib>
#include <string>
#include <utility>

#include "bnorm/types.hpp"

namespace bnorm::detail {

// Messages format numbers with std::to_string and snprintf, never iostreams: inside a
// PyTorch process on an H200 an ostringstream crashed (SIGSEGV in ostream::_M_insert<long>,
// cuda-gdb backtrace, 2026-12-04) formatting the line number of a CUDA error, so that the
// error became a crash.
inline std::string shape_string(Shape s) {
    return "(outer, channels, inner) = (" + std::to_string(s.outer) + ", " + std::to_string(s.channels) + ", " +
           std::to_string(s.inner) + ")";
}

// "bnorm: <op>: <what><value>", the value with the fewest digits that give it back in its
// type (1e-09, 1.0000001; not 0.000000, nor 1 for 1.0000001; a float -0.2f as -0.2).
template <class V = double>
std::string message(const char* op, const char* what, V value) {
    char number[40];
    for (int digits = 6; digits <= 17; ++digits) {
        std::snprintf(number, sizeof number, "%.*g", digits, double(value));
        if (!std::isfinite(value) || V(std::strtod(number, nullptr)) == value) break;
    }
    // snprintf and strtod follow LC_NUMERIC (a Python program's setlocale(LC_ALL, "") can make
    // it "1,5"): the message always says "1.5"
    const char* point = std::localeconv()->decimal_point;
    if (point && point[0] && point[0] != '.' && point[1] == '\0')
        for (char* p = number; *p; ++p)
            if (*p == point[0]) *p = '.';
    return std::string("bnorm: ") + op + ": " + what + number;
}

// No negative size, and size() and count() fit int64 (count() too when channels is 0):
// every index is int64, and an overflowed product would pass for an empty or small array.
inline void check_shape(const char* op, Shape s) {
    if (s.outer < 0 || s.channels < 0 || s.inner < 0)
        throw ValueError(std::string("bnorm: ") + op + ": negative size in shape " + shape_string(s));
    const int64_t big = INT64_MAX;
    const bool overflow = (s.outer > 0 && s.inner > big / s.outer) ||
                          (s.outer > 0 && s.channels > 0 && s.inner > 0 &&
                           (s.channels > big / s.outer || s.inner > big / (s.outer * s.channels)));
    if (overflow)
        throw ValueError(std::string("bnorm: ") + op + ": shape " + shape_string(s) + " has more than 2^63 - 1 elements");
}

// Training needs two values per channel for a variance (PyTorch's message after the
// operation's name; the Python API raises PyTorch's verbatim, with x's own shape). An
// empty x (no channels) has nothing to normalize and passes.
inline void check_batch(const char* op, Shape s) {
    if (s.channels > 0 && s.count() == 1)
        throw ValueError(std::string("bnorm: ") + op +
                         ": expected more than 1 value per channel when training, got input of shape " + shape_string(s));
}

inline void check_pointer(const char* op, const void* p, const char* name) {
    if (p == nullptr) throw ValueError(std::string("bnorm: ") + op + ": " + name + " must not be null");
}

inline void check_eps(const char* op, double eps) {
    if (!(eps > 0) || !std::isfinite(eps)) throw ValueError(message(op, "eps must be positive and finite, got ", eps));
}

inline void check_momentum(const char* op, double momentum) {
    if (!(momentum >= 0 && momentum <= 1)) throw ValueError(message(op, "momentum must be in [0, 1], got ", momentum));
}

// backward_elemt's count of values per channel.
inline void check_count(const char* op, double count) {
    if (!(count > 0) || !std::isfinite(count))
        throw ValueError(message(op, "count must be positive and finite, got ", count));
}

// merge_stats' table of `parts` x `channels` counts.
inline void check_parts(const char* op, int64_t parts, int64_t channels) {
    if (parts < 0 || channels < 0 || (parts > 0 && channels > INT64_MAX / parts))
        throw ValueError(std::string("bnorm: ") + op + ": parts and channels must be >= 0 with a product below 2^63, got " +
                         std::to_string(parts) + " and " + std::to_string(channels));
}

// A variance is never negative: a negative running_var would make NaN outputs without an
// error (forward_infer's usual cause: its arguments passed in forward_train's order). NaN
// passes, and propagates to its channel as NaN in x does. Reads host memory: the CUDA
// backend does not call it (a device read-back would synchronize the stream; docs/faq.md).
template <class P>
void check_running_var(const char* op, const P* running_var, int64_t channels) {
    for (int64_t c = 0; c < channels; ++c) {
        if (running_var[c] < P(0)) {
            std::string what = message(op, "running_var must be >= 0, got ", running_var[c]) +
                               " for channel " + std::to_string(c);
            if (std::string(op) == "forward_infer")
                what += " (forward_infer takes x, running_mean, running_var, weight, bias in this order)";
            throw ValueError(what);
        }
    }
}

// The whole argument checks of the elementwise entry points, one per op for both backends
// (the same calls refused, with the same first message). Each returns whether there is
// anything to compute: an x with no elements needs no valid pointer.
inline bool check_normalize(Shape s, const void* x, const void* mean, const void* invstd, const void* y) {
    const char* op = "normalize";
    check_shape(op, s);
    if (s.size() == 0) return false;
    check_pointer(op, x, "x");
    check_pointer(op, mean, "mean");
    check_pointer(op, invstd, "invstd");
    check_pointer(op, y, "y");
    return true;
}

inline bool check_forward_infer(Shape s, double eps, const void* x, const void* running_mean,
                                const void* running_var, const void* y) {
    const char* op = "forward_infer";
    check_shape(op, s);
    check_eps(op, eps);
    if (s.size() == 0) return false;
    check_pointer(op, x, "x");
    check_pointer(op, running_mean, "running_mean");
    check_pointer(op, running_var, "running_var");
    check_pointer(op, y, "y");
    return true;
}

inline bool check_backward_elemt(Shape s, double count, const void* dy, const void* x, const void* mean,
                                 const void* invstd, const void* sum_dy, const void* sum_dy_xhat, const void* dx) {
    const char* op = "backward_elemt";
    check_shape(op, s);
    if (s.size() == 0) return false;  // before count: an empty x has M = 0 values per channel
    check_count(op, count);
    check_pointer(op, dy, "dy");
    check_pointer(op, x, "x");
    check_pointer(op, mean, "mean");
    check_pointer(op, invstd, "invstd");
    check_pointer(op, sum_dy, "sum_dy");
    check_pointer(op, sum_dy_xhat, "sum_dy_xhat");
    check_pointer(op, dx, "dx");
    return true;
}

// The fused epilogue's checks (bnorm::Epilogue, bnorm::EpilogueGrad), after the op's own.
inline void check_activation(const char* op, Activation activation) {
    if (activation != Activation::none && activation != Activation::relu)
        throw ValueError(std::string("bnorm: ") + op + ": activation must be Activation::none or Activation::relu, got " +
                         std::to_string(int(activation)));
}

// Whether the n-element arrays at a and b share memory (address comparison: both point into
// memory the caller owns, so comparing them as integers is the portable way).
template <class T>
bool overlap(const T* a, const T* b, int64_t n) {
    const auto p = reinterpret_cast<uintptr_t>(a), q = reinterpret_cast<uintptr_t>(b);
    const auto bytes = uintptr_t(n) * sizeof(T);
    return a && b && p < q + bytes && q < p + bytes;
}

template <class T>
void check_epilogue(const char* op, Shape s, const Epilogue<T>& e, const T* y) {
    check_activation(op, e.activation);
    if (s.size() > 0 && e.residual != y && overlap(e.residual, y, s.size()))
        throw ValueError(std::string("bnorm: ") + op + ": y overlaps residual partly (it may be residual itself, or separate memory)");
}

// With ReLU, y is required. dsum (may be null) may be dy itself; it must not overlap x, y or
// dx, which its loop reads (or writes) elsewhere than the element it stores.
template <class T>
void check_epilogue_grad(const char* op, Shape s, const EpilogueGrad<T>& g, const T* dy, const T* x, const T* dx,
                         const T* dsum) {
    check_activation(op, g.activation);
    if (s.size() == 0) return;
    if (g.activation == Activation::relu) check_pointer(op, g.y, "y (the fused forward's output, for ReLU's mask)");
    const int64_t n = s.size();
    if (dsum && dsum != dy && overlap(dsum, dy, n))
        throw ValueError(std::string("bnorm: ") + op + ": dsum overlaps dy partly (it may be dy itself, or separate memory)");
    const T* y = g.activation == Activation::relu ? g.y : nullptr;
    const std::pair<const T*, const char*> others[] = {{x, "x"}, {y, "y"}, {dx, "dx"}};
    for (const auto& [other, name] : others)
        if (overlap(dsum, other, n))
            throw ValueError(std::string("bnorm: ") + op + ": dsum overlaps " + name + " (it may only be dy itself)");
}

}  // namespace bnorm::detail
