/* bnorm._core's C interface for bnorm's optional PyTorch operators (_torch_ops.cpp).
 *
 * The operators library is built against PyTorch's headers and C++ settings, the _core
 * module against nanobind's: they share plain C types only. _core owns the one copy of
 * bnorm (its kernels, thread count and instruction-set choice); the operators library
 * calls it through this table, so bnorm.set_num_threads and BNORM_CPU_ISA apply to both.
 * CPU only. Pointers are to C-contiguous data viewed as (outer, channels, inner), as in
 * bnorm/cpu.hpp; per-channel vectors are of the parameter type (float for 16-bit data). */
#ifndef BNORM_CORE_CAPI_H
#define BNORM_CORE_CAPI_H

#include <stddef.h>
#include <stdint.h>

#define BNORM_CORE_CAPI_VERSION 1

enum bnorm_capi_dtype { BNORM_CAPI_FLOAT32 = 0, BNORM_CAPI_FLOAT64 = 1, BNORM_CAPI_FLOAT16 = 2, BNORM_CAPI_BFLOAT16 = 3 };

/* What a call returns: 0 done; else what bnorm threw, its message in the caller's buffer. */
enum bnorm_capi_status { BNORM_CAPI_OK = 0, BNORM_CAPI_VALUE_ERROR = 1, BNORM_CAPI_TYPE_ERROR = 2, BNORM_CAPI_ERROR = 3 };

/* One batch-norm call's arguments; what an entry point does not read may be left null. */
typedef struct bnorm_capi_params {
    int dtype; /* bnorm_capi_dtype of the element arrays */
    int64_t outer, channels, inner;
    const void* x;
    const void* weight;       /* may be null: 1 */
    const void* bias;         /* may be null: 0 */
    void* running_mean;       /* forward_train: updated when not null; forward_infer: read */
    void* running_var;
    double momentum, eps;
    const void* residual;     /* forward: y = act(BN(x) + residual), may be null */
    int relu;                 /* forward: the activation; backward: dy is masked by y > 0 */
    void* y;                  /* forward: written; backward with relu: the forward's y */
    void* mean;               /* forward_train: written; backward: read */
    void* invstd;
    const void* dy;           /* backward */
    int batch_stats;          /* backward: the gradient flows through mean and invstd */
    void* dx;
    void* dweight;
    void* dbias;
    void* dsum;               /* backward with relu: dy * (y > 0), when not null */
} bnorm_capi_params;

typedef int (*bnorm_capi_fn)(const bnorm_capi_params* params, char* message, size_t message_size);

typedef struct bnorm_core_capi {
    int version;        /* BNORM_CORE_CAPI_VERSION */
    size_t params_size; /* sizeof(bnorm_capi_params) in _core: a second guard against a stale library */
    bnorm_capi_fn forward_train;
    bnorm_capi_fn forward_infer;
    bnorm_capi_fn backward;
} bnorm_core_capi;

#endif
