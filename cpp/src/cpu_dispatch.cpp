// The kernels' entry points: each calls the build of the kernel for the widest instruction
// set the CPU runs (or the one BNORM_CPU_ISA names), so one portable binary is fast on
// every x86-64 machine.
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.hpp"

#ifndef BNORM_KERNELS_X86
#define BNORM_KERNELS_X86 0
#endif
#ifndef BNORM_KERNELS_AVX2
#define BNORM_KERNELS_AVX2 0
#endif
#ifndef BNORM_KERNELS_AVX512
#define BNORM_KERNELS_AVX512 0
#endif
#ifndef BNORM_KERNELS_AVX512BF16
#define BNORM_KERNELS_AVX512BF16 0
#endif

namespace bnorm::kernels {
namespace {

// Whether this library holds the kernels' build for isa (CMake's BNORM_KERNEL_ISAS).
constexpr bool built(Isa isa) {
    switch (isa) {
        case Isa::avx512bf16: return BNORM_KERNELS_AVX512BF16;
        case Isa::avx512: return BNORM_KERNELS_AVX512;
        case Isa::avx2: return BNORM_KERNELS_AVX2;
        default: return true;
    }
}

// The widest instruction set this CPU runs.
Isa best_supported() {
#if BNORM_KERNELS_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("fma"))
        return __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return Isa::avx2;
#endif
    return Isa::baseline;
}

// The widest built one the CPU runs, or the one BNORM_CPU_ISA names if the CPU runs it and
// it is built.
Isa choose() {
    const Isa best = best_supported();
    const char* requested = std::getenv("BNORM_CPU_ISA");
    Isa widest = Isa::baseline;
    for (Isa candidate : {Isa::baseline, Isa::avx2, Isa::avx512, Isa::avx512bf16}) {
        if (candidate > best || !built(candidate)) continue;
        if (requested != nullptr && std::strcmp(requested, isa_name(candidate)) == 0) return candidate;
        widest = candidate;
    }
    return widest;  // none requested, or unknown, not run by this CPU or not built
}

}  // namespace

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512bf16: return "avx512bf16";
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        default: return "baseline";
    }
}

Isa isa() {
    static const Isa chosen = choose();
    return chosen;
}

// isa() only returns instruction sets that are built: the cases of the others are left out.
#if BNORM_KERNELS_AVX512BF16
#define BNORM_CASE_AVX512BF16(name, ...) case Isa::avx512bf16: return avx512bf16::name<T>(__VA_ARGS__);
#else
#define BNORM_CASE_AVX512BF16(name, ...)
#endif
#if BNORM_KERNELS_AVX512
#define BNORM_CASE_AVX512(name, ...) case Isa::avx512: return avx512::name<T>(__VA_ARGS__);
#else
#define BNORM_CASE_AVX512(name, ...)
#endif
#if BNORM_KERNELS_AVX2
#define BNORM_CASE_AVX2(name, ...) case Isa::avx2: return avx2::name<T>(__VA_ARGS__);
#else
#define BNORM_CASE_AVX2(name, ...)
#endif
#if BNORM_KERNELS_X86
#define BNORM_DISPATCH(name, ...)                       \
    switch (isa()) {                                    \
        BNORM_CASE_AVX512BF16(name, __VA_ARGS__)        \
        BNORM_CASE_AVX512(name, __VA_ARGS__)            \
        BNORM_CASE_AVX2(name, __VA_ARGS__)              \
        default: return baseline::name<T>(__VA_ARGS__); \
    }
#else
#define BNORM_DISPATCH(name, ...) return baseline::name<T>(__VA_ARGS__);
#endif

template <class T>
void moments(const T* x, Shape s, int threads, double* mean, double* var) {
    BNORM_DISPATCH(moments, x, s, threads, mean, var)
}

template <class T>
void affine(const T* x, Shape s, int threads, const param_t<T>* center, const param_t<T>* scale,
            const param_t<T>* shift, T* y, const Epilogue<T>& epilogue) {
    BNORM_DISPATCH(affine, x, s, threads, center, scale, shift, y, epilogue)
}

template <class T>
void forward_train(const T* x, Shape s, int threads, double eps, const param_t<T>* weight, const param_t<T>* bias,
                   T* y, double* mean, double* var, param_t<T>* invstd, const Epilogue<T>& epilogue) {
    BNORM_DISPATCH(forward_train, x, s, threads, eps, weight, bias, y, mean, var, invstd, epilogue)
}

template <class T>
void backward_sums(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, double* sum_dy,
                   double* sum_dy_xmu, const ReluGrad<T>& relu) {
    BNORM_DISPATCH(backward_sums, dy, x, s, threads, mean, sum_dy, sum_dy_xmu, relu)
}

template <class T>
void backward_dx(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* dy_mean,
                 const param_t<T>* xmu_scale, const param_t<T>* scale, T* dx, const ReluGrad<T>& relu) {
    BNORM_DISPATCH(backward_dx, dy, x, s, threads, mean, dy_mean, xmu_scale, scale, dx, relu)
}

template <class T>
void backward(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* invstd,
              const param_t<T>* weight, bool batch_stats, T* dx, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat,
              const ReluGrad<T>& relu) {
    BNORM_DISPATCH(backward, dy, x, s, threads, mean, invstd, weight, batch_stats, dx, sum_dy, sum_dy_xhat, relu)
}

#define BNORM_INSTANTIATE(T)                                                                                      \
    template void moments<T>(const T*, Shape, int, double*, double*);                                             \
    template void affine<T>(const T*, Shape, int, const param_t<T>*, const param_t<T>*, const param_t<T>*, T*,    \
                            const Epilogue<T>&);                                                                  \
    template void forward_train<T>(const T*, Shape, int, double, const param_t<T>*, const param_t<T>*, T*,        \
                                   double*, double*, param_t<T>*, const Epilogue<T>&);                            \
    template void backward_sums<T>(const T*, const T*, Shape, int, const param_t<T>*, double*, double*,           \
                                   const ReluGrad<T>&);                                                           \
    template void backward_dx<T>(const T*, const T*, Shape, int, const param_t<T>*, const param_t<T>*,            \
                                 const param_t<T>*, const param_t<T>*, T*, const ReluGrad<T>&);                   \
    template void backward<T>(const T*, const T*, Shape, int, const param_t<T>*, const param_t<T>*,               \
                              const param_t<T>*, bool, T*, param_t<T>*, param_t<T>*, const ReluGrad<T>&);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(half)
BNORM_INSTANTIATE(bfloat16)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels
