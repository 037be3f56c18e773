// Per-call scratch arrays (per-channel partials, coefficients) from a small per-thread cache
// of buffers, so that repeated calls allocate nothing. Fresh channel-sized allocations are
// not free: once glibc hands a large block back to the system, every 4 KiB of the next one
// costs a page fault, and with two threads faulting at once (2, 2^21) batch_stats spent
// two thirds of its time in the kernel's page-fault handler.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace bnorm::detail {

struct ScratchBlock {
    void* data = nullptr;
    size_t bytes = 0;  // capacity
};

/// A buffer of at least `bytes` bytes, aligned to 64, from the calling thread's cache (or
/// newly allocated); throws std::bad_alloc.
ScratchBlock scratch_acquire(size_t bytes);
/// Returns a block to the calling thread's cache, which keeps a few of the most recent
/// (at most kScratchCacheBytes in all) and frees the rest.
void scratch_release(ScratchBlock block) noexcept;

/// n elements of a trivially copyable T, uninitialized unless a fill value is given. Must
/// be released by the thread that acquired it (it is: scratch lives in one call's scope).
template <class T>
class Scratch {
    static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>);

public:
    explicit Scratch(int64_t n) : n_(size_t(std::max<int64_t>(n, 0))), block_(scratch_acquire(n_ * sizeof(T))) {}
    Scratch(int64_t n, const T& value) : Scratch(n) { std::fill(begin(), end(), value); }
    Scratch(Scratch&& other) noexcept : n_(other.n_), block_(other.block_) { other.block_ = {}; }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    Scratch& operator=(Scratch&&) = delete;
    ~Scratch() { scratch_release(block_); }

    T* data() { return static_cast<T*>(block_.data); }
    const T* data() const { return static_cast<const T*>(block_.data); }
    size_t size() const { return n_; }
    T* begin() { return data(); }
    T* end() { return data() + n_; }
    const T* begin() const { return data(); }
    const T* end() const { return data() + n_; }
    T& operator[](size_t i) { return data()[i]; }
    const T& operator[](size_t i) const { return data()[i]; }

private:
    size_t n_;
    ScratchBlock block_;
};

}  // namespace bnorm::detail
