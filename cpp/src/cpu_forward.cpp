// The forward write passes: affine (normalize and inference) and the training forward,
// statistics and output fused where the layout allows, each with the fused epilogue
// (residual add, ReLU; epilogue.hpp) applied in the pass that writes y.
#include <array>

#include "cpu_moments.hpp"
#include "cpu_spans.hpp"
#include "cpu_strips.hpp"
#include "epilogue.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

// y = epilogue(((x - center) - lo) * scale + shift) over one run of a single channel
// (kInputsFromMemory: see write_run; the unfused pass). kLo = false: a center without a
// low part (lo = 0, which changes no bit: (x - center) - 0 is x - center).
template <bool kInputsFromMemory = false, bool kLo = true, class T, class E>
BNORM_INLINE void affine_run(const T* x, T* y, int64_t n, detail::Affine<param_t<T>> k, bool stream,
                             const E& epilogue) {
    write_run<kInputsFromMemory>(y, n, stream, [&](auto lanes, int64_t i) {
        using L = decltype(lanes);
        auto centered = L::load(x + i) - L::set(k.center);
        if constexpr (kLo) centered = centered - L::set(k.center_lo);
        return epilogue(L{}, centered * L::set(k.scale) + L::set(k.shift), i);
    });
}

// The same over one row of the rows schedule, coefficients varying along it (element i
// is channel channel(i): a run of whole rows wraps, RowCycle). Each output vector loads a
// vector of every coefficient array, so the rows of inference and normalize (whose centers
// have no low part) load three: with four, (256, 512) float32 inference in L2 took 2x a
// copy (one thread). Those loads, though they hit L1, slow the stream of x from memory:
// a loop of AVX-512 vectors over rows of 256 floats took 3.3-3.5 ms for 51 MB of x and y
// with three coefficient loads a vector, 2.4-2.7 ms with none (a session micro-benchmark
// on the 2-CPU AMD EPYC VM; the arrays' page offsets changed nothing, pairs of rows,
// unrolling and 256-bit vectors were slower). Where x comes from memory
// (kInputsFromMemory) and the caller says so (prefetch_x), each vector of a whole line
// (AVX-512 float32 and float64) asks for the line kRowPrefetchBytes ahead into L1, which
// recovers part of it: one thread's channels-last float32 inference took 0.83-0.91x the
// time. Not with a residual to add (a second stream from memory: 1.00-1.07x), where the
// coefficient arrays of a row take more than kRowPrefetchCoefficientBytes of L1 (4 KiB
// rows' training: 1.02-1.11x), nor for vectors of half a line (float16 rows of 64
// channels 0.93-1.16x; docs/performance.md, "What each step bought").
constexpr int64_t kRowPrefetchBytes = 2048;
constexpr int64_t kRowPrefetchCoefficientBytes = 8192;

// Whether affine_row prefetches x (prefetch_x) over rows whose loop reads `arrays`
// coefficient arrays of `length` elements each.
template <class T>
bool prefetches_row_x(int arrays, int64_t length) {
    return arrays * length * int64_t(sizeof(param_t<T>)) <= kRowPrefetchCoefficientBytes;
}

template <bool kInputsFromMemory = false, bool kLo = true, class T, class E, class Channel = SameChannel>
BNORM_FLATTEN void affine_row(const T* x, T* y, int64_t n, const param_t<T>* center, const param_t<T>* lo,
                              const param_t<T>* scale, const param_t<T>* shift, bool stream, const E& epilogue,
                              Channel channel = {}, bool prefetch_x = false) {
    write_run<kInputsFromMemory>(y, n, stream, [&](auto lanes, int64_t i) {
        using L = decltype(lanes);
        using C = CoefficientLanes<T, L>;
        static_assert(C::width == L::width, "x and coefficient vectors have the same lanes");
        const int64_t c = channel(i);
        if constexpr (kInputsFromMemory && !E::adds && L::width * sizeof(T) >= 64)
            if (prefetch_x) prefetch_line(reinterpret_cast<const char*>(x + i) + kRowPrefetchBytes);
        auto centered = L::load(x + i) - C::load(center + c);
        if constexpr (kLo) centered = centered - C::load(lo + c);
        return epilogue(L{}, centered * C::load(scale + c) + C::load(shift + c), i);
    });
}

// The same over n elements of a span (for_each_span), the first at `position` of its
// outer index, coefficients by SpanCoefficients (center, scale, shift: no low part).
template <bool kInputsFromMemory = false, class T, class E>
BNORM_INLINE void affine_span(const T* x, T* y, int64_t n, int64_t position, Divisor inner, int64_t channels,
                              const param_t<T>* center, const param_t<T>* scale, const param_t<T>* shift, bool stream,
                              const E& epilogue) {
    SpanCoefficients<T, 3> coefficients({center, scale, shift}, inner, channels, position);
    write_run<kInputsFromMemory, true>(y, n, stream, [&](auto lanes, int64_t i) BNORM_INLINE_LAMBDA {
        using L = decltype(lanes);
        const auto k = coefficients.template at<L>(position + i);
        return epilogue(L{}, (L::load(x + i) - k[0]) * k[1] + k[2], i);
    });
}

// The same over `rows` rows `stride` apart (a block of the unfused rows schedule):
// write_rows, coefficients loaded once per group of rows, unless the output streams
// (write_run's lines, row by row). The fused column strips keep writing row by row: in
// groups, (256, 512) float32 training took 0.84x the time on one thread but 2x on two (C++
// harness; the cause was not found: computing a group's values before its stores, 4096-aligned arrays,
// padding between the coefficient arrays and pairs of rows all left it; no counters here).
template <bool kInputsFromMemory = false, bool kLo = true, class T, class E>
BNORM_FLATTEN void affine_rows(const T* x, T* y, int64_t stride, int64_t rows, int64_t n, const param_t<T>* center,
                               const param_t<T>* lo, const param_t<T>* scale, const param_t<T>* shift, bool stream,
                               const E& epilogue) {
    if (stream) {
        const bool prefetch_x = prefetches_row_x<T>(kLo ? 4 : 3, n);
        for (int64_t r = 0; r < rows; ++r)
            affine_row<kInputsFromMemory, kLo>(x + r * stride, y + r * stride, n, center, lo, scale, shift, stream,
                                               epilogue.at(r * stride), SameChannel{}, prefetch_x);
        return;
    }
    write_rows(
        y, stride, rows, n,
        [&](auto lanes, int64_t c) {
            using C = CoefficientLanes<T, decltype(lanes)>;
            if constexpr (kLo)
                return std::array{C::load(center + c), C::load(lo + c), C::load(scale + c), C::load(shift + c)};
            else
                return std::array{C::load(center + c), C::load(scale + c), C::load(shift + c)};
        },
        [&](auto lanes, const auto& k, int64_t at) {
            using L = decltype(lanes);
            auto centered = L::load(x + at) - k[0];
            if constexpr (kLo) centered = centered - k[1];
            return epilogue(L{}, centered * k[kLo ? 2 : 1] + k[kLo ? 3 : 2], at);
        });
}

// The kernels with their epilogue (E: a ForwardEpilogue) as a type; the entry points
// below pick it once per call. kLo = false: center_lo is unused (may be null).
template <bool kLo, class T, class E>
void affine_fused(const T* x, Shape s, int threads, const param_t<T>* center, const param_t<T>* center_lo,
                  const param_t<T>* scale, const param_t<T>* shift, T* y, const E& epilogue) {
    const Positions pos = positions_of(s, For::write);
    if (pos.view.channels > 0) {
        affine_fused<kLo>(x, pos.view, threads, pos.expand(center).data(),
                          kLo ? pos.expand(center_lo).data() : nullptr, pos.expand(scale).data(),
                          pos.expand(shift).data(), y, epilogue);
        if (pos.rest.outer > 0)
            affine_fused<kLo>(x + pos.view.size(), pos.rest, threads, center, center_lo, scale, shift,
                              y + pos.view.size(), epilogue.at(pos.view.size()));
        return;
    }
    if constexpr (!kLo) {  // (not the training forward's unfused pass: rare, and each variant costs compile time)
        if (writes_spans(s, y)) {
            const Divisor inner(s.inner);
            for_each_span(s, threads, y, [&](int64_t offset, int64_t n, int64_t position, bool stream) BNORM_INLINE_LAMBDA {
                affine_span<true>(x + offset, y + offset, n, position, inner, s.channels, center, scale, shift, stream,
                                  epilogue.at(offset));
            });
            return;
        }
    }
    if (writes_row_runs(s, y)) {
        const RowCycle<param_t<T>, 4> k({center, kLo ? center_lo : center, scale, shift}, s.channels);
        const bool prefetch_x = prefetches_row_x<T>(kLo ? 4 : 3, k.stride);
        for_each_line_chunk(s, threads, y, [&](int64_t begin, int64_t end, bool stream) BNORM_INLINE_LAMBDA {
            affine_row<true, kLo>(x + begin, y + begin, end - begin, k.array(0), k.array(1), k.array(2), k.array(3),
                                  stream, epilogue.at(begin), k.at(begin % s.channels), prefetch_x);
        });
        return;
    }
    for_each_write(
        s, threads, y,
        [&](int64_t c, int64_t offset, bool stream) BNORM_INLINE_LAMBDA {
            affine_run<true, kLo>(x + offset, y + offset, s.inner,
                                  {center[c], kLo ? center_lo[c] : param_t<T>(0), scale[c], shift[c]}, stream,
                                  epilogue.at(offset));
        },
        [&](int64_t offset, int64_t rows, int64_t c0, int64_t c1, bool stream) {
            affine_rows<true, kLo>(x + offset, y + offset, s.channels, rows, c1 - c0, center + c0,
                                   kLo ? center_lo + c0 : nullptr, scale + c0, shift + c0, stream,
                                   epilogue.at(offset));
        });
}

template <class T, class E>
void forward_train_fused(const T* x, Shape s, int threads, double eps, const param_t<T>* weight, const param_t<T>* bias,
                         T* y, double* mean, double* var, param_t<T>* invstd, const E& epilogue) {
    using P = param_t<T>;
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (const ColumnStrips strips = column_strips(s, team, sizeof(T))) {
        const Shape view = strips.view;
        const RowSplits plan(view);
        const MomentsOp<T> op{x, view};
        using Work = typename MomentsOp<T>::Work;
        strips.run<Work>(s, team, stream, [&](int64_t c0, int64_t c1, Work& work, const auto& channel) {
            const int64_t p0 = c0 * strips.per_channel, width = (c1 - c0) * strips.per_channel;
            plan.strip_partials(view, op, p0, p0 + width, work);
            for (int64_t c = c0; c < c1; ++c) store(channel(work.strip, c - c0), mean[c], var[c]);
            P* k[4];
            strips.coefficient_arrays(work, 4, k);
            train_coefficients(c0, c1, mean, var, eps, weight, bias, invstd, k[0], k[1], k[2], k[3]);
            strips.spread(work, 4, c0, c1);
            for (int64_t r = 0; r < s.outer; ++r) {
                // (the residual's next row, from memory: x's is in L2 by now)
                if (stream && r + 1 < s.outer) epilogue.prefetch((r + 1) * view.channels + p0, width * int64_t(sizeof(T)));
                affine_row(x + r * view.channels + p0, y + r * view.channels + p0, width, work.coefficients[0],
                           work.coefficients[1], work.coefficients[2], work.coefficients[3], stream,
                           epilogue.at(r * view.channels + p0));
            }
        });
        return;
    }
    if (!fuse_per_channel(s, team, sizeof(T))) {
        moments(x, s, threads, mean, var);
        Scratch<P> center(C), lo(C), scale(C), shift(C);
        train_coefficients(int64_t(0), C, mean, var, eps, weight, bias, invstd, center.data(), lo.data(), scale.data(),
                           shift.data());
        affine_fused<true>(x, s, threads, center.data(), lo.data(), scale.data(), shift.data(), y, epilogue);
        return;
    }
    const PlaneSplits plan(s);
    const MomentsOp<T> op{x, s};
    const int64_t stride = C * s.inner;
    const int64_t run_bytes = s.inner * int64_t(sizeof(T));
    const bool prefetch = prefetches_next_channel<T>(s, stream);
    parallel_writes(team, C, channel_block(s, team), stream, [&](int64_t c, int) {
        store(plan.channel_partial<Moments>(s, op, c), mean[c], var[c]);
        invstd[c] = detail::invstd_of<P>(var[c], eps);
        const auto k = detail::train_affine(mean[c], invstd[c], weight, bias, c);
        for (int64_t o = 0; o < s.outer; ++o) {
            const int64_t offset = o * stride + c * s.inner;
            if (prefetch) {  // the next channel's runs, which follow this one's in memory
                prefetch_range(x + offset + s.inner, run_bytes);
                epilogue.prefetch(offset + s.inner, run_bytes);
            }
            affine_run(x + offset, y + offset, s.inner, k, stream, epilogue.at(offset));
        }
    });
}

}  // namespace

template <class T>
void affine(const T* x, Shape s, int threads, const param_t<T>* center, const param_t<T>* scale,
            const param_t<T>* shift, T* y, const Epilogue<T>& epilogue) {
    with_forward_epilogue(epilogue,
                          [&](const auto& e) { affine_fused<false>(x, s, threads, center, nullptr, scale, shift, y, e); });
}

template <class T>
void forward_train(const T* x, Shape s, int threads, double eps, const param_t<T>* weight, const param_t<T>* bias,
                   T* y, double* mean, double* var, param_t<T>* invstd, const Epilogue<T>& epilogue) {
    with_forward_epilogue(epilogue, [&](const auto& e) {
        forward_train_fused(x, s, threads, eps, weight, bias, y, mean, var, invstd, e);
    });
}

#define BNORM_INSTANTIATE(T)                                                                  \
    template void affine<T>(const T*, Shape, int, const param_t<T>*, const param_t<T>*,       \
                            const param_t<T>*, T*, const Epilogue<T>&);                       \
    template void forward_train<T>(const T*, Shape, int, double, const param_t<T>*,           \
                                   const param_t<T>*, T*, double*, double*, param_t<T>*,      \
                                   const Epilogue<T>&);
BNORM_KERNEL_TYPES(BNORM_INSTANTIATE)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
