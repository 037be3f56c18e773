// bnorm CUDA backend: availability, CUDA error strings, per-device attributes and the
// stream-ordered workspace.
#include <array>
#include <mutex>

#include "common.hpp"

namespace bnorm::cuda {

bool available() {
    // cudart is linked statically: without a driver or a GPU this returns an error
    // (cudaErrorInsufficientDriver, cudaErrorNoDevice, ...) instead of failing to load.
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();  // leave no error behind for the caller's next CUDA call
        return false;
    }
    return count > 0;
}

namespace detail {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
    (void)cudaGetLastError();  // clear a non-sticky error so that later calls can succeed
    const char* base = file;
    for (const char* p = file; *p; ++p)
        if (*p == '/' || *p == '\\') base = p + 1;
    // (no iostreams: see shape_string in checks.hpp)
    throw CudaError(std::string("bnorm: CUDA error ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + " (" +
                    what + ", " + base + ":" + std::to_string(line) + ")");
}

namespace {

constexpr int kMaxDevices = 64;
constexpr uint64_t kPoolReleaseThreshold = uint64_t(64) << 20;  // bytes kept across syncs

struct DeviceInfo {
    int sm_count = 0;
    cudaMemPool_t pool = nullptr;  // null: no memory-pool support, use cudaMalloc
};

DeviceInfo query(int device, bool with_pool) {
    DeviceInfo info;
    BNORM_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
    int pools = 0;
    if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
        (void)cudaGetLastError();
        pools = 0;
    }
    if (pools && with_pool) {
        // A pool of our own: the device's default pool keeps its settings (release threshold)
        // for the application.
        cudaMemPoolProps props = {};
        props.allocType = cudaMemAllocationTypePinned;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = device;
        cudaMemPool_t pool = nullptr;
        if (cudaMemPoolCreate(&pool, &props) == cudaSuccess) {
            uint64_t threshold = kPoolReleaseThreshold;
            (void)cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
            info.pool = pool;  // never destroyed: it lives as long as the process
        }
        (void)cudaGetLastError();
    }
    return info;
}

const DeviceInfo& device_info() {
    int device = 0;
    BNORM_CUDA_CHECK(cudaGetDevice(&device));
    if (device < 0 || device >= kMaxDevices) {  // not cached: no pool (plain cudaMalloc)
        thread_local DeviceInfo uncached;
        uncached = query(device, false);
        return uncached;
    }
    static std::array<std::once_flag, kMaxDevices> once;
    static std::array<DeviceInfo, kMaxDevices> infos;
    std::call_once(once[size_t(device)], [&] { infos[size_t(device)] = query(device, true); });  // retried if it threw
    return infos[size_t(device)];
}

}  // namespace

int sm_count() { return device_info().sm_count; }

Workspace::Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    const DeviceInfo& info = device_info();
    if (info.pool) {
        BNORM_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr_, bytes, info.pool, stream));
        async_ = true;
    } else {
        BNORM_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
        async_ = false;
    }
}

Workspace::~Workspace() {
    if (ptr_ == nullptr) return;
    // Stream-ordered: freed after the kernels enqueued before it on the same stream.
    const cudaError_t err = async_ ? cudaFreeAsync(ptr_, stream_) : cudaFree(ptr_);
    if (err != cudaSuccess) (void)cudaGetLastError();  // a destructor must not throw
}

}  // namespace detail
}  // namespace bnorm::cuda
