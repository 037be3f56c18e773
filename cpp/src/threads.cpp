#include "threads.hpp"

#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>

#include "cpu_limits.hpp"

namespace bnorm::detail {
namespace {

constexpr int kMaxThreads = 1024;  // the bound on threads, or the processor count if larger

// The first 64 KiB of a small text file (/proc, /sys), or "" where it cannot be read.
std::string read_text(const std::string& path) {
    std::string text;
    if (FILE* f = std::fopen(path.c_str(), "r")) {
        char buffer[4096];
        size_t n;
        while (text.size() < (64 << 10) && (n = std::fread(buffer, 1, sizeof buffer, f)) > 0) text.append(buffer, n);
        std::fclose(f);
    }
    return text;
}

// The CPUs in this process's affinity mask (taskset, docker --cpuset-cpus, Slurm).
int affinity_cpus() {
#if defined(__linux__)
    for (int cpus = 1024; cpus <= (1 << 20); cpus *= 4) {  // masks beyond 1024 CPUs need a larger set
        cpu_set_t* set = CPU_ALLOC(cpus);
        if (!set) break;
        const size_t bytes = CPU_ALLOC_SIZE(cpus);
        CPU_ZERO_S(bytes, set);
        const bool ok = sched_getaffinity(0, bytes, set) == 0;
        const int count = ok ? CPU_COUNT_S(bytes, set) : 0;
        CPU_FREE(set);
        if (ok) return count;
    }
#endif
    return int(std::max(1u, std::thread::hardware_concurrency()));
}

// The CPUs a cgroup CPU quota (docker --cpus, Kubernetes limits) allows this process: the
// tightest quota of its cgroup and the cgroup's ancestors, v2 or v1. Inside a container
// /proc/self/cgroup may name a path that its /sys/fs/cgroup does not have (no cgroup
// namespace): the walk up the ancestors then ends at the container's own root.
std::optional<double> cgroup_cpus() {
#if defined(__linux__)
    const std::string self = read_text("/proc/self/cgroup");
    std::optional<double> tightest;
    const auto take = [&](std::optional<double> cpus) {
        if (cpus && (!tightest || *cpus < *tightest)) tightest = cpus;
    };
    if (const auto path = cgroup_path(self, true))
        for (std::string p = *path; !p.empty(); p = cgroup_parent(p))
            take(cgroup_v2_cpus(read_text("/sys/fs/cgroup" + p + "/cpu.max")));
    if (const auto path = cgroup_path(self, false))
        for (const char* mount : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"})
            for (std::string p = *path; !p.empty(); p = cgroup_parent(p)) {
                const std::string dir = mount + (p == "/" ? std::string() : p);
                take(cgroup_v1_cpus(read_text(dir + "/cpu.cfs_quota_us"), read_text(dir + "/cpu.cfs_period_us")));
            }
    return tightest;
#else
    return std::nullopt;
#endif
}

// Read at first use, not at load: an application may set OMP_NUM_THREADS before its first
// call. OpenMP's own default is not used: it ignores CPU quotas, and omp_get_max_threads()
// returns whatever another library last set.
int default_count() {
    static const int n = [] {
        const int env = omp_num_threads_value(std::getenv("OMP_NUM_THREADS"));
        return std::min(env > 0 ? env : default_threads(affinity_cpus(), cgroup_cpus()), thread_limit());
    }();
    return n;
}

std::atomic<int> g_threads{0};  // set_num_threads' value; 0: the default

// Back-off from a busy machine. A parallel region ends when its last thread does, so a
// team member preempted by another process holds the whole call for the rest of its time
// slice (milliseconds), however little work it had left: with one of 2 cores busy, 2
// threads made (256, 512) 100x slower than one. A region judged busy (judge_region in
// threads.hpp) makes calls run on one thread for a while: for kFirstBackoffNs and
// kFirstBackoffCalls calls (both: a caller of one call per 50 ms would otherwise try again
// every call), doubling while the next tries are judged busy (up to kMaxBackoffNs and
// kMaxBackoffCalls); a region judged idle ends the back-off, one judged unknown (a cold
// team's wake-up) changes nothing. A busy machine costs one or two slow calls per back-off
// period, an idle one gets its threads back at the first warm try: a cold team's wake-up
// is not taken for a busy machine, or a back-off (which lets the team fall asleep) would
// sustain itself on a VM whose wake-ups are slow. Only the default count backs off:
// set_num_threads(n) asks for n threads (tests and benchmarks get what they measure).
constexpr int64_t kFirstBackoffNs = 10'000'000, kMaxBackoffNs = 1'000'000'000;
constexpr int64_t kFirstBackoffCalls = 4, kMaxBackoffCalls = 256;
std::atomic<int64_t> g_serial_until_ns{0};
std::atomic<int64_t> g_serial_calls{0};  // calls still to run on one thread
std::atomic<int64_t> g_backoff_ns{0}, g_backoff_calls{0};
std::atomic<int64_t> g_region_end_ns{0};  // when the last region ended; 0: the pool has no threads yet
std::atomic<int64_t> g_backoff_count{0};  // call_threads() cut to one thread by a back-off

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// fork() keeps only the calling thread, but libgomp keeps its record of that thread's
// pool of OpenMP threads: a child's first parallel region waits forever for threads that
// do not exist. Any library sharing the runtime may have made the pool (PyTorch runs
// OpenMP regions from the same thread), so before every fork the pool is released
// (omp_pause_resource_all, OpenMP 5.0: libgomp joins the calling thread's pool), and the
// child starts a fresh one. The parent pays one pool restart (tens of microseconds) at its
// next region. Where the release fails (fork from inside a parallel region), the child
// runs single-threaded. LLVM's and Intel's runtimes reinitialize themselves in the child,
// so only libgomp (GCC) needs this.
std::atomic<bool> g_forked_single{false};

#if (defined(__unix__) || defined(__APPLE__)) && defined(__GNUC__) && !defined(__clang__)
std::atomic<bool> g_pool_released{false};

void release_pool_before_fork() {
    g_pool_released.store(omp_pause_resource_all(omp_pause_soft) == 0);
    if (g_pool_released.load()) g_region_end_ns.store(0);  // the next region starts new threads
}

void after_fork_in_child() {
    if (!g_pool_released.load()) g_forked_single.store(true);
    g_serial_until_ns.store(0);  // the child's machine is the parent's, its calls are its own
    g_serial_calls.store(0);
    g_backoff_ns.store(0);
    g_backoff_calls.store(0);
    g_region_end_ns.store(0);
}

const int g_fork_handler = pthread_atfork(release_pool_before_fork, nullptr, after_fork_in_child);
#endif

}  // namespace

int thread_limit() {
    static const int limit = std::max(kMaxThreads, omp_get_num_procs());  // a syscall: once (0.35 us a call)
    return limit;
}

int configured_threads() {
    if (g_forked_single.load(std::memory_order_relaxed)) return 1;
    const int set = g_threads.load(std::memory_order_relaxed);
    return set > 0 ? set : default_count();
}

void configure_threads(int n) { g_threads.store(n, std::memory_order_relaxed); }

bool forked_single_threaded() { return g_forked_single.load(std::memory_order_relaxed); }

int call_threads() {
    const int n = configured_threads();
    if (n == 1 || g_threads.load(std::memory_order_relaxed) != 0) return n;
    bool backing_off = g_serial_calls.load(std::memory_order_relaxed) > 0;
    if (backing_off) {
        g_serial_calls.fetch_sub(1, std::memory_order_relaxed);
    } else {
        const int64_t until = g_serial_until_ns.load(std::memory_order_relaxed);
        backing_off = until > 0 && now_ns() < until;
    }
    if (!backing_off) return n;
    g_backoff_count.fetch_add(1, std::memory_order_relaxed);
    return 1;
}

int64_t backoff_count() { return g_backoff_count.load(std::memory_order_relaxed); }

void note_parallel_region(int64_t busy_ns, int64_t wait_ns) {
    const int64_t now = now_ns(), last_end = g_region_end_ns.exchange(now, std::memory_order_relaxed);
    const RegionVerdict verdict = judge_region(busy_ns, wait_ns, last_end == 0 ? -1 : now - busy_ns - wait_ns - last_end);
    if (verdict == RegionVerdict::unknown) return;
    if (verdict == RegionVerdict::idle) {
        if (g_backoff_ns.load(std::memory_order_relaxed) != 0) {
            g_backoff_ns.store(0, std::memory_order_relaxed);
            g_backoff_calls.store(0, std::memory_order_relaxed);
        }
        return;
    }
    const int64_t ns = std::clamp(2 * g_backoff_ns.load(std::memory_order_relaxed), kFirstBackoffNs, kMaxBackoffNs);
    const int64_t calls =
        std::clamp(2 * g_backoff_calls.load(std::memory_order_relaxed), kFirstBackoffCalls, kMaxBackoffCalls);
    g_backoff_ns.store(ns, std::memory_order_relaxed);
    g_backoff_calls.store(calls, std::memory_order_relaxed);
    g_serial_until_ns.store(now + ns, std::memory_order_relaxed);
    g_serial_calls.store(calls, std::memory_order_relaxed);
}

}  // namespace bnorm::detail
