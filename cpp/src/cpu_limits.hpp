// The number of CPUs this process may use, from the text of the files that say so: pure
// functions on file contents (threads.cpp reads the files), so that tests can feed them
// any container's settings, not only this machine's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace bnorm::detail {

// A non-negative decimal integer at the start of `text` (after blanks), or nullopt.
inline std::optional<int64_t> leading_integer(std::string_view text) {
    size_t i = text.find_first_not_of(" \t");
    if (i == std::string_view::npos || text[i] < '0' || text[i] > '9') return std::nullopt;
    int64_t value = 0;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
        if (value > (INT64_MAX - 9) / 10) return std::nullopt;
        value = value * 10 + (text[i] - '0');
    }
    return value;
}

/// The CPUs allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD", e.g. "150000 100000" for 1.5
/// CPUs, or "max 100000"): nullopt when it sets no limit or cannot be read.
inline std::optional<double> cgroup_v2_cpus(std::string_view cpu_max) {
    const size_t space = cpu_max.find(' ');
    if (space == std::string_view::npos) return std::nullopt;
    const auto quota = leading_integer(cpu_max.substr(0, space));  // "max": no limit
    const auto period = leading_integer(cpu_max.substr(space + 1));
    if (!quota || !period || *quota <= 0 || *period <= 0) return std::nullopt;
    return double(*quota) / double(*period);
}

/// The same for cgroup v1: `cpu.cfs_quota_us` ("-1": no limit) and `cpu.cfs_period_us`.
inline std::optional<double> cgroup_v1_cpus(std::string_view quota_us, std::string_view period_us) {
    const auto quota = leading_integer(quota_us), period = leading_integer(period_us);
    if (!quota || !period || *quota <= 0 || *period <= 0) return std::nullopt;
    return double(*quota) / double(*period);
}

/// This process's cgroup path, from the contents of /proc/self/cgroup: the cgroup v2 entry
/// ("0::/path") when `v2`, else the v1 hierarchy with the cpu controller
/// ("4:cpu,cpuacct:/path"). nullopt where there is none.
inline std::optional<std::string> cgroup_path(std::string_view proc_self_cgroup, bool v2) {
    while (!proc_self_cgroup.empty()) {
        const size_t end = proc_self_cgroup.find('\n');
        const std::string_view line = proc_self_cgroup.substr(0, end);
        proc_self_cgroup = end == std::string_view::npos ? std::string_view() : proc_self_cgroup.substr(end + 1);
        const size_t first = line.find(':'), second = first == std::string_view::npos ? first : line.find(':', first + 1);
        if (second == std::string_view::npos) continue;
        const std::string_view id = line.substr(0, first), controllers = line.substr(first + 1, second - first - 1);
        const std::string_view path = line.substr(second + 1);
        if (path.empty() || path[0] != '/') continue;
        if (v2 ? id == "0" && controllers.empty() : false) return std::string(path);
        if (!v2) {
            for (std::string_view rest = controllers; !rest.empty();) {  // comma-separated controller names
                const size_t comma = rest.find(',');
                if (rest.substr(0, comma) == "cpu") return std::string(path);
                rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
            }
        }
    }
    return std::nullopt;
}

/// The parent of a cgroup path ("/a/b" -> "/a", "/a" -> "/"); "/" has none (empty).
inline std::string cgroup_parent(const std::string& path) {
    if (path.empty() || path == "/") return {};
    const size_t slash = path.find_last_of('/');
    return slash == 0 || slash == std::string::npos ? std::string("/") : path.substr(0, slash);
}

/// OMP_NUM_THREADS's first value ("4" or "4,2": 4), or 0 where it is unset or not a
/// positive integer (then it is ignored, as OpenMP runtimes ignore it).
inline int omp_num_threads_value(const char* text) {
    if (!text) return 0;
    std::string_view view(text);
    const auto value = leading_integer(view);
    const size_t end = view.find_first_not_of("0123456789", view.find_first_not_of(" \t"));
    if (!value || *value <= 0 || (end != std::string_view::npos && view[end] != ',' && view[end] != ' ')) return 0;
    return int(std::min<int64_t>(*value, INT32_MAX));
}

/// The default thread count: the CPUs in the affinity mask, fewer under a CPU quota (1.5
/// CPUs: 2 threads), at least 1.
inline int default_threads(int affinity_cpus, std::optional<double> quota_cpus) {
    int64_t n = std::max(affinity_cpus, 1);
    if (quota_cpus && *quota_cpus > 0) n = std::min<int64_t>(n, int64_t(std::ceil(*quota_cpus)));
    return int(std::max<int64_t>(n, 1));
}

}  // namespace bnorm::detail
