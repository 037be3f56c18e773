// The busy-machine back-off (threads.hpp): its judgment of a parallel region, on made-up
// timings (what a region says depends on how long its team was idle before it), and what a
// busy verdict does to the next calls' threads and to backoff_count().
#include "../../cpp/src/threads.hpp"

#include <chrono>
#include <thread>

#include "check.hpp"

namespace {

void test_backoff_is_counted() {
    using namespace bnorm::detail;
    constexpr int64_t us = 1000, ms = 1000 * us;
    configure_threads(0);  // the default count: the one that backs off
    const int n = configured_threads();
    if (n < 2) return;  // a one-CPU machine has nothing to back off from
    const int64_t before = backoff_count();
    CHECK(call_threads() == n);
    note_parallel_region(100 * us, 10 * us);  // the pool's first region: no verdict
    CHECK(call_threads() == n);
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    note_parallel_region(0, 2 * ms);  // a wait longer than any wake-up: a busy machine
    CHECK(call_threads() == 1);
    CHECK(call_threads() == 1);
    CHECK(backoff_count() == before + 2);
    configure_threads(n);  // a count asked for is never cut, nor counted
    CHECK(call_threads() == n);
    CHECK(backoff_count() == before + 2);
}

}  // namespace

int main() {
    using bnorm::detail::judge_region;
    using bnorm::detail::RegionVerdict;
    constexpr int64_t us = 1000, ms = 1000 * us;
    // the pool's first region starts its threads: milliseconds, but no sign of a busy machine
    CHECK(judge_region(300, 8 * ms, -1) == RegionVerdict::unknown);
    CHECK(judge_region(100 * us, 10 * us, -1) == RegionVerdict::unknown);
    // a warm team (spinning since the last region): a wait beyond a chunk is a preempted thread
    CHECK(judge_region(100 * us, 20 * us, 5 * us) == RegionVerdict::idle);
    CHECK(judge_region(100 * us, 125 * us, 5 * us) == RegionVerdict::idle);  // the slack: 100 us + busy / 4
    CHECK(judge_region(100 * us, 126 * us, 5 * us) == RegionVerdict::busy);
    CHECK(judge_region(800, 12 * ms, 19 * us) == RegionVerdict::busy);
    CHECK(judge_region(4 * ms, 1100 * us, 150 * us) == RegionVerdict::idle);  // a quarter of a long share
    // a cold team (asleep after a back-off or a pause): a wake-up of up to 1 ms decides nothing
    CHECK(judge_region(260, 950 * us, 11 * ms) == RegionVerdict::unknown);
    CHECK(judge_region(100 * us, 400 * us, 300 * us) == RegionVerdict::unknown);
    CHECK(judge_region(100 * us, 30 * us, 44 * ms) == RegionVerdict::idle);
    CHECK(judge_region(100 * us, 1100 * us, 10 * ms) == RegionVerdict::busy);  // longer than any wake-up
    CHECK(judge_region(2 * ms, 1400 * us, 10 * ms) == RegionVerdict::unknown);  // 1 ms + busy / 4
    test_backoff_is_counted();
    return check::failures();
}
