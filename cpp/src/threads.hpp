// bnorm's own thread count and the CPU backend's per-call thread policy.
//
// The count is bnorm's alone: set_num_threads' value, else a default read once
// (OMP_NUM_THREADS, else the CPUs the affinity mask and a cgroup CPU quota allow). It is
// never OpenMP's nthreads setting, which every library sharing the OpenMP runtime changes
// (torch.set_num_threads calls omp_set_num_threads), and bnorm never changes that setting:
// its parallel regions name their team size.
#pragma once

#include <cstdint>

namespace bnorm::detail {

/// The bound on set_num_threads and on the default: max(1024, processors).
int thread_limit();

/// The threads bnorm uses (bnorm::get_num_threads()).
int configured_threads();

/// Sets them (bnorm::set_num_threads checks n first).
void configure_threads(int n);

/// Whether this process was forked where OpenMP's threads could not be released first (see
/// threads.cpp): it then runs single-threaded and refuses more threads.
bool forked_single_threaded();

/// The threads a call may use now: configured_threads(), or, with the default count, 1
/// while backing off after a parallel region waited for a preempted thread (a busy machine).
int call_threads();

/// How many times call_threads() has returned 1 for a back-off (bnorm::backoff_count()).
int64_t backoff_count();

/// What a parallel region says about the machine (busy_ns, wait_ns as below; gap_ns: how
/// long the team was idle since the previous region ended, or -1 for the pool's first
/// region, which starts its threads). libgomp's threads spin for a while after a region
/// (GOMP_SPINCOUNT; 7-10 ms on the 2-CPU AMD EPYC VM) and then sleep: a region after a
/// short gap finds them running, and a wait beyond one work chunk means a team member was
/// preempted (busy); after a long gap they were asleep, and the wait includes their
/// wake-up, which on an idle VM takes up to hundreds of microseconds (unknown: the next,
/// warm region decides), unless it is longer than any wake-up (busy). A pure function:
/// tests feed it any timings.
enum class RegionVerdict { idle, busy, unknown };
inline constexpr int64_t kWaitSlackNs = 100'000;   // a work chunk takes less
inline constexpr int64_t kWarmGapNs = 200'000;     // well within libgomp's spin (GOMP_SPINCOUNT)
inline constexpr int64_t kWakeUpNs = 1'000'000;    // a sleeping thread's wake-up takes less
inline RegionVerdict judge_region(int64_t busy_ns, int64_t wait_ns, int64_t gap_ns) {
    if (gap_ns < 0) return RegionVerdict::unknown;  // thread creation
    if (wait_ns <= kWaitSlackNs + busy_ns / 4) return RegionVerdict::idle;
    if (gap_ns < kWarmGapNs || wait_ns > kWakeUpNs + busy_ns / 4) return RegionVerdict::busy;
    return RegionVerdict::unknown;
}

/// The kernels report each parallel region of more than one thread: how long the calling
/// thread worked on its share (busy_ns) and how long it waited for the others, to start and
/// to finish (wait_ns).
void note_parallel_region(int64_t busy_ns, int64_t wait_ns);

}  // namespace bnorm::detail
