// A minimal test harness: CHECK records failures and goes on; main returns their count.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

namespace check {

inline int& failures() {
    static int count = 0;
    return count;
}

inline void fail(const char* file, int line, const std::string& what) {
    ++failures();
    std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

inline bool close(double got, double want, double rtol, double atol) {
    if (std::isnan(want)) return std::isnan(got);
    return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

}  // namespace check

#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond)) check::fail(__FILE__, __LINE__, #cond);          \
    } while (0)

#define CHECK_CLOSE(got, want, rtol, atol)                                                 \
    do {                                                                                   \
        const double got_ = (got), want_ = (want);                                         \
        if (!check::close(got_, want_, rtol, atol))                                        \
            check::fail(__FILE__, __LINE__,                                                \
                        std::string(#got " = ") + std::to_string(got_) + ", want " +       \
                            std::to_string(want_));                                        \
    } while (0)

// CHECK_THROWS(expr, Exception): expr must throw Exception (or a class derived from it).
#define CHECK_THROWS(expr, Exception)                                                     \
    do {                                                                                  \
        bool thrown_ = false;                                                             \
        try {                                                                             \
            expr;                                                                         \
        } catch (const Exception&) {                                                      \
            thrown_ = true;                                                               \
        } catch (...) {                                                                   \
        }                                                                                 \
        if (!thrown_) check::fail(__FILE__, __LINE__, #expr " did not throw " #Exception); \
    } while (0)
