// bnorm CUDA backend: device selection, plain allocations and stream synchronization for the
// bindings.
#include <cuda_runtime.h>

#include "common.hpp"

namespace bnorm::cuda {

void set_device(int device) { BNORM_CUDA_CHECK(cudaSetDevice(device)); }

void* allocate(size_t bytes) {
    void* pointer = nullptr;
    if (bytes > 0) BNORM_CUDA_CHECK(cudaMalloc(&pointer, bytes));
    return pointer;
}

void deallocate(void* pointer) noexcept {
    // A failed free must not stay in CUDA's last-error state, where the next launch check
    // would report it as that launch's failure.
    if (pointer && cudaFree(pointer) != cudaSuccess) (void)cudaGetLastError();
}

void synchronize(stream_t stream) { BNORM_CUDA_CHECK(cudaStreamSynchronize(stream)); }

}  // namespace bnorm::cuda
