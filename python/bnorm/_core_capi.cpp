// _core's C interface (core_capi.h): bnorm's CPU entry points behind plain C types, for
// the optional PyTorch operators library, which calls them without Python in between.
#include "core_capi.h"

#include <cstring>
#include <exception>
#include <type_traits>

#include "bnorm/bnorm.hpp"

namespace {

int report(int status, const char* what, char* message, size_t size) {
    if (size > 0) {
        std::strncpy(message, what, size - 1);
        message[size - 1] = '\0';
    }
    return status;
}

// Runs fn(T{}) for the params' dtype; bnorm's exceptions become a status and a message.
template <class Fn>
int run(const bnorm_capi_params* p, char* message, size_t size, Fn&& fn) {
    try {
        switch (p->dtype) {
            case BNORM_CAPI_FLOAT32: fn(float{}); break;
            case BNORM_CAPI_FLOAT64: fn(double{}); break;
            case BNORM_CAPI_FLOAT16: fn(bnorm::half{}); break;
            case BNORM_CAPI_BFLOAT16: fn(bnorm::bfloat16{}); break;
            default: return report(BNORM_CAPI_TYPE_ERROR, "bnorm: unknown dtype code", message, size);
        }
        return BNORM_CAPI_OK;
    } catch (const bnorm::TypeError& e) {
        return report(BNORM_CAPI_TYPE_ERROR, e.what(), message, size);
    } catch (const bnorm::ValueError& e) {
        return report(BNORM_CAPI_VALUE_ERROR, e.what(), message, size);
    } catch (const std::exception& e) {
        return report(BNORM_CAPI_ERROR, e.what(), message, size);
    } catch (...) {
        return report(BNORM_CAPI_ERROR, "bnorm: unknown error", message, size);
    }
}

template <class T> const T* in(const void* p) { return static_cast<const T*>(p); }
template <class T> T* out(void* p) { return static_cast<T*>(p); }

bnorm::Shape shape_of(const bnorm_capi_params* p) { return {p->outer, p->channels, p->inner}; }
bnorm::Activation activation_of(const bnorm_capi_params* p) {
    return p->relu ? bnorm::Activation::relu : bnorm::Activation::none;
}

int forward_train(const bnorm_capi_params* p, char* message, size_t size) {
    return run(p, message, size, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        bnorm::forward_train<T>(in<T>(p->x), shape_of(p), in<P>(p->weight), in<P>(p->bias), out<P>(p->running_mean),
                                out<P>(p->running_var), p->momentum, p->eps,
                                bnorm::Epilogue<T>{in<T>(p->residual), activation_of(p)}, out<T>(p->y),
                                out<P>(p->mean), out<P>(p->invstd));
    });
}

int forward_infer(const bnorm_capi_params* p, char* message, size_t size) {
    return run(p, message, size, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        bnorm::forward_infer<T>(in<T>(p->x), shape_of(p), in<P>(p->running_mean), in<P>(p->running_var),
                                in<P>(p->weight), in<P>(p->bias), p->eps,
                                bnorm::Epilogue<T>{in<T>(p->residual), activation_of(p)}, out<T>(p->y));
    });
}

int backward(const bnorm_capi_params* p, char* message, size_t size) {
    return run(p, message, size, [&](auto tag) {
        using T = decltype(tag);
        using P = bnorm::param_t<T>;
        bnorm::backward<T>(in<T>(p->dy), in<T>(p->x), shape_of(p), in<P>(p->mean), in<P>(p->invstd), in<P>(p->weight),
                           p->batch_stats != 0, bnorm::EpilogueGrad<T>{activation_of(p), in<T>(p->y)}, out<T>(p->dx),
                           out<P>(p->dweight), out<P>(p->dbias), out<T>(p->dsum));
    });
}

const bnorm_core_capi kTable{BNORM_CORE_CAPI_VERSION, sizeof(bnorm_capi_params), &forward_train, &forward_infer,
                             &backward};

}  // namespace

const bnorm_core_capi* bnorm_core_capi_table() { return &kTable; }
