#include "scratch.hpp"

#include <new>
#include <vector>

namespace bnorm::detail {
namespace {

constexpr size_t kScratchCacheBlocks = 16;                // a call holds at most 10 at once
constexpr size_t kScratchCacheBytes = size_t(256) << 20;  // per thread, kept between calls
constexpr std::align_val_t kAlign{64};

void free_block(ScratchBlock b) noexcept {
    if (b.data) ::operator delete(b.data, kAlign);
}

// Set once the thread's cache is destroyed: a bnorm call from a destructor that runs
// later at thread or program exit (another thread_local's, a global's) then allocates
// and frees plainly. A bool has no destructor, so it outlives the cache.
thread_local bool t_cache_destroyed = false;

// The blocks a thread released, freed when the thread exits.
struct Cache {
    std::vector<ScratchBlock> blocks;
    size_t bytes = 0;

    ~Cache() {
        for (const ScratchBlock& b : blocks) free_block(b);
        blocks.clear();
        bytes = 0;
        t_cache_destroyed = true;
    }
};

Cache& cache() {
    thread_local Cache c;
    return c;
}

}  // namespace

ScratchBlock scratch_acquire(size_t bytes) {
    if (bytes == 0) return {};
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    if (t_cache_destroyed) return {::operator new(rounded, kAlign), rounded};
    Cache& c = cache();
    // The smallest cached block that fits.
    auto best = c.blocks.end();
    for (auto it = c.blocks.begin(); it != c.blocks.end(); ++it)
        if (it->bytes >= bytes && (best == c.blocks.end() || it->bytes < best->bytes)) best = it;
    if (best != c.blocks.end()) {
        const ScratchBlock b = *best;
        c.blocks.erase(best);
        c.bytes -= b.bytes;
        return b;
    }
    return {::operator new(rounded, kAlign), rounded};
}

void scratch_release(ScratchBlock block) noexcept {
    if (!block.data) return;
    if (t_cache_destroyed || block.bytes > kScratchCacheBytes) return free_block(block);
    Cache& c = cache();
    try {
        c.blocks.push_back(block);
    } catch (...) {
        return free_block(block);
    }
    c.bytes += block.bytes;
    // Over the limits: free the smallest blocks first (the large ones are the costly ones to
    // fault in again), then the oldest.
    while (c.blocks.size() > kScratchCacheBlocks || c.bytes > kScratchCacheBytes) {
        auto victim = std::min_element(c.blocks.begin(), c.blocks.end(),
                                       [](const ScratchBlock& a, const ScratchBlock& b) { return a.bytes < b.bytes; });
        if (c.blocks.size() <= kScratchCacheBlocks) victim = c.blocks.begin();  // over the byte limit: oldest
        c.bytes -= victim->bytes;
        free_block(*victim);
        c.blocks.erase(victim);
    }
}

}  // namespace bnorm::detail
