// The backward passes: the reductions (sum(g), sum(g * (x - mean))), dx, and both fused
// per channel or per strip where the layout allows; g is dy or ReLU's gradient (the
// gradient mask of epilogue.hpp), and the pass that writes dx also writes dsum = g, except
// where the data streams through memory in two passes: there the reduction writes it.
#include <array>

#include "coefficients.hpp"
#include "cpu_spans.hpp"
#include "cpu_strips.hpp"
#include "epilogue.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

// dsum = g over a run, streamed: by the dx passes before each streamed run's dx, and by
// the reduction's tiles where it writes dsum (BackwardSumsOp). write_run streams the
// whole cache lines of its output, and stores the partial lines at a run's ends, the
// lanes of its overlapping end vectors that fall in them. dsum stored from dx's loop got
// the whole end vectors (their lanes in streamed lines too: a partial write-combining
// flush per run), and ordinary stores throughout where its alignment differs from dx's:
// float32 (64, 1024, 14, 14) backward with ReLU took 10.0-10.4 ms, 5.8-6.1 without dsum
// (C++ harness, 2 threads). First, so that dx may be dy: g is read before dx overwrites
// it, and dsum may be dy (each element masks to itself). The inputs are in L1 for the dx
// loop that follows.
template <bool kInputsFromMemory, class T, class Mask>
BNORM_INLINE void store_dsum_first(const T* dy, int64_t n, const Mask& mask) {
    write_run<kInputsFromMemory>(mask.dsum, n, true, [&](auto lanes, int64_t i) { return mask.load(lanes, dy, i); });
}

// dx = (g - dy_mean - (x - mean) * xmu_scale) * scale over one run of a single channel, g
// being dy or ReLU's gradient of it (mask, which also stores dsum = g); with x null (eval
// mode), dx = g * scale. (kInputsFromMemory: see write_run; the unfused pass.)
template <bool kInputsFromMemory = false, class T, class Mask>
BNORM_INLINE void backward_run(const T* dy, const T* x, T* dx, int64_t n, param_t<T> mean,
                               detail::BackwardCoefficients<param_t<T>> k, bool stream, const Mask& mask) {
    if constexpr (Mask::stores) {
        if (stream) {  // dsum by a write_run of its own (store_dsum_first)
            store_dsum_first<kInputsFromMemory>(dy, n, mask);
            return backward_run<kInputsFromMemory>(dy, x, dx, n, mean, k, stream, mask.reading());
        }
    }
    if (!x) {
        write_run<kInputsFromMemory>(dx, n, stream, [&](auto lanes, int64_t i) {
            const auto g = mask.load(lanes, dy, i);
            mask.write(lanes, g, i);
            return g * decltype(lanes)::set(k.scale);
        });
        return;
    }
    write_run<kInputsFromMemory>(dx, n, stream, [&](auto lanes, int64_t i) {
        using L = decltype(lanes);
        const auto g = mask.load(L{}, dy, i);
        mask.write(L{}, g, i);
        return (g - L::set(k.dy_mean) - (L::load(x + i) - L::set(mean)) * L::set(k.xmu_scale)) * L::set(k.scale);
    });
}

// The same over one row of the rows schedule (element i is channel channel(i): see
// affine_row).
template <bool kInputsFromMemory = false, class T, class Mask, class Channel = SameChannel>
BNORM_FLATTEN void backward_row(const T* dy, const T* x, T* dx, int64_t n, const param_t<T>* mean,
                                const param_t<T>* dy_mean, const param_t<T>* xmu_scale, const param_t<T>* scale,
                                bool stream, const Mask& mask, Channel channel = {}) {
    if constexpr (Mask::stores) {
        if (stream) {  // dsum by a write_run of its own (store_dsum_first)
            store_dsum_first<kInputsFromMemory>(dy, n, mask);
            return backward_row<kInputsFromMemory>(dy, x, dx, n, mean, dy_mean, xmu_scale, scale, stream,
                                                   mask.reading(), channel);
        }
    }
    if (!x) {
        write_run<kInputsFromMemory>(dx, n, stream, [&](auto lanes, int64_t i) {
            using L = decltype(lanes);
            using C = CoefficientLanes<T, L>;
            const auto g = mask.load(L{}, dy, i);
            mask.write(L{}, g, i);
            return g * C::load(scale + channel(i));
        });
        return;
    }
    write_run<kInputsFromMemory>(dx, n, stream, [&](auto lanes, int64_t i) {
        using L = decltype(lanes);
        using C = CoefficientLanes<T, L>;
        static_assert(C::width == L::width, "x and coefficient vectors have the same lanes");
        const int64_t c = channel(i);
        const auto g = mask.load(L{}, dy, i);
        mask.write(L{}, g, i);
        return (g - C::load(dy_mean + c) - (L::load(x + i) - C::load(mean + c)) * C::load(xmu_scale + c)) *
               C::load(scale + c);
    });
}

// The same over `rows` rows `stride` apart: write_rows, coefficients loaded once per pair
// of rows, unless the output streams (affine_rows, cpu_forward.cpp). dx reads two inputs
// per row, which bound it more than the coefficient loads: pairs took 0.96-1.0x the
// row-by-row time of the unfused pass in cache, groups of four 1.0-1.15x ((256, 512),
// (1024, 512), (1024, 500); (4096, 64) 0.9x; float32, one thread, C++ harness).
constexpr int kBackwardRowGroup = 2;

template <bool kInputsFromMemory = false, class T, class Mask>
BNORM_FLATTEN void backward_rows(const T* dy, const T* x, T* dx, int64_t stride, int64_t rows, int64_t n,
                                 const param_t<T>* mean, const param_t<T>* dy_mean, const param_t<T>* xmu_scale,
                                 const param_t<T>* scale, bool stream, const Mask& mask) {
    if (stream) {
        for (int64_t r = 0; r < rows; ++r)
            backward_row<kInputsFromMemory>(dy + r * stride, x ? x + r * stride : x, dx + r * stride, n, mean, dy_mean,
                                            xmu_scale, scale, stream, mask.at(r * stride));
        return;
    }
    if (!x) {
        write_rows(
            dx, stride, rows, n,
            [&](auto lanes, int64_t c) {
                using C = CoefficientLanes<T, decltype(lanes)>;
                return C::load(scale + c);
            },
            [&](auto lanes, const auto& k, int64_t at) {
                const auto g = mask.load(lanes, dy, at);
                mask.write(lanes, g, at);
                return g * k;
            });
        return;
    }
    write_rows<kBackwardRowGroup>(
        dx, stride, rows, n,
        [&](auto lanes, int64_t c) {
            using C = CoefficientLanes<T, decltype(lanes)>;
            return std::array{C::load(mean + c), C::load(dy_mean + c), C::load(xmu_scale + c), C::load(scale + c)};
        },
        [&](auto lanes, const auto& k, int64_t at) {
            using L = decltype(lanes);
            const auto g = mask.load(L{}, dy, at);
            mask.write(L{}, g, at);
            return (g - k[1] - (L::load(x + at) - k[0]) * k[2]) * k[3];
        });
}

template <class T, class Mask = GradientMask<T, false, false>>
struct BackwardSumsOp {
    using A = param_t<T>;
    using Partial = Sums;
    using Work = RowWork<A, Sums>;
    const T* dy;
    const T* x;
    const A* mean;
    Shape s;
    Mask mask{};  // the gradient read in place of dy (epilogue.hpp)
    // A storing mask also writes dsum = g, streamed (the fused backward's first pass where
    // dsum streams, see backward_fused): store_dsum_first over each run or row of a
    // tile right after its sums, while its inputs are in L1 or L2. Not from the sums'
    // loops: their vectors start where a run or row starts, so where dsum is not 64-byte
    // aligned (as NumPy's large arrays, 16 bytes into a line) none could be streamed, and
    // each line was read before it was written ((64, 7, 7, 2048) backward with ReLU
    // 1.06-1.10x the two-pass time instead of 0.92x); and the sums keep the bits of the
    // plain pass.
    void store_g(int64_t offset, int64_t n) const { store_dsum_first<false>(dy + offset, n, mask.at(offset)); }
    // Eval mode without ReLU where the data streams (backward_fused): dx = dy * dx_scale[c],
    // written likewise after each run's or row's sums, so that dy crosses memory once: 3S
    // instead of 4S. (With ReLU, dsum and dx written so, 5S instead of 6S, took 1.09-1.17x
    // the time on channels-last shapes; (8192, 1024) 0.91x.)
    T* dx = nullptr;
    const A* dx_scale = nullptr;
    bool dx_stream = false;
    void store_dx(int64_t offset, int64_t n, A scale) const {
        backward_run(dy + offset, static_cast<const T*>(nullptr), dx + offset, n, A(0), {A(0), A(0), scale}, dx_stream,
                     mask.reading().at(offset));
    }
    void store_dx_row(int64_t offset, int64_t c0, int64_t n) const {
        backward_row(dy + offset, static_cast<const T*>(nullptr), dx + offset, n, nullptr, nullptr, nullptr,
                     dx_scale + c0, dx_stream, mask.reading().at(offset));
    }

    BNORM_FLATTEN Sums plane_tile(int64_t c, PlaneTiles::Tile t) const {
        const int64_t stride = s.channels * s.inner, len = t.i1 - t.i0;
        const int64_t offset = c * s.inner + t.i0 + t.r0 * stride;
        const T* g = dy + offset;
        const T* p = x + offset;
        const A m = mean[c];
        const Mask tile_mask = mask.at(offset);
        const Pair<A> sums = chained_sums<T>(t.r1 - t.r0, stride, len, [&](auto lanes, int64_t k, auto& a, auto& b) {
            using L = decltype(lanes);
            const auto d = tile_mask.load(L{}, g, k);
            a += d;
            b += d * (L::load(p + k) - L::set(m));
        });
        if constexpr (Mask::stores)
            for (int64_t r = 0; r < t.r1 - t.r0; ++r) store_g(offset + r * stride, len);
        if constexpr (!Mask::relu)
            if (dx)
                for (int64_t r = 0; r < t.r1 - t.r0; ++r) store_dx(offset + r * stride, len, dx_scale[c]);
        return {double(sums.a), double(sums.b)};
    }

    BNORM_FLATTEN void row_tile(int64_t c0, int64_t c1, int64_t r0, int64_t r1, Sums* acc) const {
        const int64_t w = c1 - c0, C = s.channels;
        A sum_dy[kChannelBlock], sum_dy_xmu[kChannelBlock];
        for (int64_t j = 0; j < w; ++j) sum_dy[j] = sum_dy_xmu[j] = 0;
        const bool grouped = grouped_rows<T>(s, 2);
        const auto sums = [&](auto lanes, auto acc_lanes, auto group, int64_t r, int64_t j) {
            using L = decltype(lanes);
            using P = decltype(acc_lanes);
            const auto m = P::load(mean + c0 + j);
            const int64_t offset = r * C + c0 + j;
            // Both sums before either store (see MomentsOp::row_tile).
            const auto g = rows_sum<group()>([&](int64_t k) { return mask.load(L{}, dy, offset + k * C); });
            const auto gx = rows_sum<group()>([&](int64_t k) {
                return mask.load(L{}, dy, offset + k * C) * (L::load(x + offset + k * C) - m);
            });
            P::store(sum_dy + j, P::load(sum_dy + j) + g);
            P::store(sum_dy_xmu + j, P::load(sum_dy_xmu + j) + gx);
        };
        if (Mask::stores || (!Mask::relu && dx)) {  // a group of rows at a time (the same groups), then their g or dx
            const auto store_rows = [&](int64_t r, int64_t end) {
                if constexpr (Mask::stores) {
                    if (w == C)  // whole rows: one run (partial lines only at its ends, not each row's)
                        store_g(r * C, (end - r) * C);
                    else
                        for (int64_t q = r; q < end; ++q) store_g(q * C + c0, w);
                }
                if constexpr (!Mask::relu)
                    if (dx)
                        for (int64_t q = r; q < end; ++q) store_dx_row(q * C + c0, c0, w);
            };
            for_row_chunks<T>(r0, r1, grouped ? kSumRows : 1, w, grouped, kNoChunkHook, sums, store_rows);
        } else {
            for_row_lanes<T>(r0, r1, w, grouped, sums);
        }
        for (int64_t j = 0; j < w; ++j) merge(acc[j], Sums{double(sum_dy[j]), double(sum_dy_xmu[j])});
    }
};

// The P-rounded sums of the channels [c0, c1) (sums(c): their double Sums) and their dx
// coefficients at index c - c0. The outputs are distinct scratch arrays (cpu_api.cpp gives
// the sums scratch of their own): __restrict lets the loop vectorize where the caller picks
// the arrays at run time (ColumnStrips).
template <class P, class SumsOf>
void dx_coefficients(int64_t c0, int64_t c1, const SumsOf& sums, const P* invstd, const P* weight, double count,
                     bool batch_stats, P* __restrict sum_dy, P* __restrict sum_dy_xhat, P* __restrict dy_mean,
                     P* __restrict xmu_scale, P* __restrict scale) {
    for (int64_t c = c0; c < c1; ++c) {
        const Sums s = sums(c);
        detail::round_backward_sums(s.dy, s.dy_xmu, invstd[c], sum_dy[c], sum_dy_xhat[c]);
        const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count,
                                                     batch_stats);
        dy_mean[c - c0] = k.dy_mean, xmu_scale[c - c0] = k.xmu_scale, scale[c - c0] = k.scale;
    }
}

// The kernels with their gradient mask (Mask: a GradientMask) as a type; the entry points
// below pick it once per call.
// With a storing mask the reductions also write dsum = g, streamed (BackwardSumsOp); with
// dx (eval mode), dx = g * dx_scale as well (BackwardSumsOp::dx).
template <class T, class Mask>
void backward_sums_fused(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                         double* sum_dy, double* sum_dy_xmu, const Mask& mask, T* dx = nullptr,
                         const param_t<T>* dx_scale = nullptr) {
    using Op = BackwardSumsOp<T, Mask>;
    // (an op over the part of x at `offset`, viewed as `part`, with the dx scale for its channels)
    const auto op_at = [&](int64_t offset, Shape part, const param_t<T>* part_mean, const param_t<T>* part_scale) {
        Op op{dy + offset, x + offset, part_mean, part, mask.at(offset)};
        if (dx) op.dx = dx + offset, op.dx_scale = part_scale, op.dx_stream = streams_output(part, dx + offset);
        return op;
    };
    const bool stream = Mask::stores || (dx && streams<T>(shape));
    const int team = team_size(shape, threads);
    if (const int64_t strip = strip_width(shape, team, 2 * sizeof(T))) {
        const RowSplits plan(shape);
        const Op op = op_at(0, shape, mean, dx_scale);
        using Work = typename Op::Work;
        for_each_strip<Work>(shape, team, strip, stream, [&](int64_t c0, int64_t c1, Work& work) {
            plan.strip_partials(shape, op, c0, c1, work);
            for (int64_t c = c0; c < c1; ++c) sum_dy[c] = work.strip[c - c0].dy, sum_dy_xmu[c] = work.strip[c - c0].dy_xmu;
        });
        return;
    }
    Scratch<Sums> result(shape.channels, Sums{});
    const Positions pos = positions_of(shape, For::reduce);
    if (pos.view.channels > 0) {
        const auto mean_at = pos.expand(mean);
        const auto scale_at = dx ? pos.expand(dx_scale) : Scratch<param_t<T>>(0);
        Scratch<Sums> per_position(pos.view.channels), rest(pos.rest.outer > 0 ? shape.channels : 0);
        reduce(pos.view, threads, op_at(0, pos.view, mean_at.data(), scale_at.data()), per_position.data(), stream);
        for (int64_t c = 0; c < shape.channels; ++c) result[c] = pos.fold_channel(per_position.data(), c);
        if (pos.rest.outer > 0) {
            reduce(pos.rest, threads, op_at(pos.view.size(), pos.rest, mean, dx_scale), rest.data(), stream);
            for (int64_t c = 0; c < shape.channels; ++c) merge(result[c], rest[c]);
        }
    } else {
        reduce(shape, threads, op_at(0, shape, mean, dx_scale), result.data(), stream);
    }
    for (int64_t c = 0; c < shape.channels; ++c) {
        sum_dy[c] = result[c].dy;
        sum_dy_xmu[c] = result[c].dy_xmu;
    }
}

template <class T, class Mask>
void backward_dx_fused(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean,
                       const param_t<T>* dy_mean, const param_t<T>* xmu_scale, const param_t<T>* scale, T* dx,
                       const Mask& mask) {
    const Positions pos = positions_of(s, For::write);
    if (pos.view.channels > 0) {
        if (x) {
            backward_dx_fused(dy, x, pos.view, threads, pos.expand(mean).data(), pos.expand(dy_mean).data(),
                              pos.expand(xmu_scale).data(), pos.expand(scale).data(), dx, mask);
        } else {  // eval mode: scale alone
            backward_dx_fused(dy, x, pos.view, threads, mean, dy_mean, xmu_scale, pos.expand(scale).data(), dx, mask);
        }
        if (pos.rest.outer > 0) {
            const int64_t offset = pos.view.size();
            backward_dx_fused(dy + offset, x ? x + offset : x, pos.rest, threads, mean, dy_mean, xmu_scale, scale,
                              dx + offset, mask.at(offset));
        }
        return;
    }
    if (writes_row_runs(s, dx)) {  // (eval mode, x null, reads scale alone)
        const RowCycle<param_t<T>, 4> k({x ? mean : scale, x ? dy_mean : scale, x ? xmu_scale : scale, scale},
                                        s.channels);
        for_each_line_chunk(s, threads, dx, [&](int64_t begin, int64_t end, bool stream) {
            backward_row<true>(dy + begin, x ? x + begin : x, dx + begin, end - begin, k.array(0), k.array(1),
                               k.array(2), k.array(3), stream, mask.at(begin), k.at(begin % s.channels));
        });
        return;
    }
    for_each_write(
        s, threads, dx,
        [&](int64_t c, int64_t offset, bool stream) {
            if (x)
                backward_run<true>(dy + offset, x + offset, dx + offset, s.inner, mean[c],
                                   {dy_mean[c], xmu_scale[c], scale[c]}, stream, mask.at(offset));
            else
                backward_run<true>(dy + offset, x, dx + offset, s.inner, param_t<T>(0), {0, 0, scale[c]}, stream,
                                   mask.at(offset));
        },
        [&](int64_t offset, int64_t rows, int64_t c0, int64_t c1, bool stream) {
            if (x)
                backward_rows<true>(dy + offset, x + offset, dx + offset, s.channels, rows, c1 - c0, mean + c0,
                                    dy_mean + c0, xmu_scale + c0, scale + c0, stream, mask.at(offset));
            else
                backward_rows<true>(dy + offset, x, dx + offset, s.channels, rows, c1 - c0, mean, dy_mean, xmu_scale,
                                    scale + c0, stream, mask.at(offset));
        });
}

// The training backward, and the eval-mode one (batch_stats false: dx = g * scale, which
// reads no x). Where the data streams, eval mode writes dx in the training dx's schedules,
// so that dy (and y) are read from memory once for the sums and dx where the layout allows
// (per channel, strips: 3S instead of 4S, 5S instead of 6S with ReLU and dsum; two passes:
// 6S instead of 7S with ReLU, dsum written by the first; without ReLU the reduction
// writes dx, 3S instead of 4S: BackwardSumsOp::dx). 2 threads, against the sums then dx:
// (64, 256, 28, 28) 0.57x the time, channels-last (64, 56, 56, 64) with ReLU 0.65x
// (benchmarks/results/2026-12-05-eval-backward-epyc-2cpu.txt), without 0.85x (docs/
// performance.md, "Eval mode in one pass"). The cached
// path's affine gives +0 where g * scale is -0: the only difference in bits, and a
// function of the shape alone.
template <class T, class Mask>
void backward_fused(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats, T* dx,
                    param_t<T>* sum_dy, param_t<T>* sum_dy_xhat, const Mask& mask) {
    using P = param_t<T>;
    const T* dx_x = batch_stats ? x : nullptr;  // the x that dx reads
    using SumsOp = BackwardSumsOp<T, decltype(mask.reading())>;  // the reductions read g, store nothing
    const int team = team_size(s, threads);
    const double count = double(s.count());
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    // Eval mode in cache takes the two passes: the second finds dy in cache (the fused
    // schedules took 1.02-1.05x the time with ReLU there).
    const bool fused = batch_stats || stream;
    if (const ColumnStrips strips = fused ? column_strips(s, team, 2 * sizeof(T)) : ColumnStrips{}) {
        const Shape view = strips.view;
        const RowSplits plan(view);
        const auto expanded_mean = strips.pos.expand(mean);  // short planes: the mean of each column
        const P* column_mean = strips.per_channel == 1 ? mean : expanded_mean.data();
        const SumsOp op{dy, x, column_mean, view, mask.reading()};
        using Work = typename SumsOp::Work;
        strips.run<Work>(s, team, stream, [&](int64_t c0, int64_t c1, Work& work, const auto& channel) {
            const int64_t p0 = c0 * strips.per_channel, width = (c1 - c0) * strips.per_channel;
            plan.strip_partials(view, op, p0, p0 + width, work);
            P* k[3];
            strips.coefficient_arrays(work, 3, k);
            dx_coefficients(
                c0, c1, [&](int64_t c) { return channel(work.strip, c - c0); }, invstd, weight, count,
                batch_stats, sum_dy, sum_dy_xhat, k[0], k[1], k[2]);
            strips.spread(work, 3, c0, c1);
            for (int64_t r = 0; r < s.outer; ++r) {
                const int64_t offset = r * view.channels + p0;
                backward_row(dy + offset, dx_x ? dx_x + offset : dx_x, dx + offset, width, column_mean + p0,
                             work.coefficients[0],
                             work.coefficients[1], work.coefficients[2], stream, mask.at(offset));
            }
        });
        return;
    }
    if (!fused || !fuse_per_channel(s, team, 2 * sizeof(T))) {
        // Two passes. With ReLU and a dsum that streams (too large to be cached), the first
        // also writes dsum = g, and the second reads g back in place of dy and y: 7S of
        // traffic (read dy, y, x, write dsum; read dsum, x, write dx) instead of 8S (read dy,
        // y, x; read them again, write dx and dsum), the least any schedule moves where the
        // data is not cached between the passes (dx needs every element's sums first, so g
        // and x are read twice, and dsum is an output). benchmarks/ab_builds.py against the
        // 8S passes, float32, 2 threads: channels-last (64, 56, 56, 256) 0.76x the time,
        // (64, 28, 28, 512) 0.78-0.87x, (64, 56, 56, 64) 0.90x (its 256-byte rows written
        // as one run a group of rows: 0.95x of each row its own), (8192, 1024) 0.90x; 1
        // thread 0.73-0.80x; float16 0.80-0.82x. Cached (no stream), the extra write loop
        // cost more than re-reading dy and y from L2/L3: (1024, 512) 1.05-1.11x, (2048, 96)
        // 1.02-1.10x.
        Scratch<double> s_dy(s.channels), s_dy_xmu(s.channels);
        Scratch<P> dy_mean(C), xmu_scale(C), scale(C);
        const auto coefficients = [&] {
            dx_coefficients(
                int64_t(0), C, [&](int64_t c) { return Sums{s_dy[c], s_dy_xmu[c]}; }, invstd, weight, count,
                batch_stats, sum_dy, sum_dy_xhat, dy_mean.data(), xmu_scale.data(), scale.data());
        };
        if constexpr (!Mask::relu) {
            if (!batch_stats && stream) {  // eval mode: dx needs no sums, so the reduction writes it
                for (int64_t c = 0; c < C; ++c) scale[c] = detail::scale_of(invstd[c], weight, c);
                backward_sums_fused(dy, x, s, threads, mean, s_dy.data(), s_dy_xmu.data(), mask, dx, scale.data());
                coefficients();
                return;
            }
        }
        if constexpr (Mask::relu && Mask::stores) {
            if (streams_output(s, mask.dsum)) {
                backward_sums_fused(dy, x, s, threads, mean, s_dy.data(), s_dy_xmu.data(), mask);
                coefficients();
                backward_dx_fused(static_cast<const T*>(mask.dsum), dx_x, s, threads, mean, dy_mean.data(),
                                  xmu_scale.data(), scale.data(), dx, GradientMask<T, false, false>{nullptr, nullptr});
                return;
            }
        }
        backward_sums_fused(dy, x, s, threads, mean, s_dy.data(), s_dy_xmu.data(), mask.reading());
        coefficients();
        if constexpr (!Mask::relu && !Mask::stores) {
            if (!fused) {
                // Eval mode in cache without ReLU: dx = (dy - 0) * scale + 0 by affine, for
                // its write spans, which the backward's passes lack (cached 6x6/7x7 planes
                // took 1.1-1.2x the time in backward_dx_fused).
                const Scratch<P> zero(C, P(0));
                affine(dy, s, threads, zero.data(), scale.data(), zero.data(), dx, Epilogue<T>{});
                return;
            }
        }
        backward_dx_fused(dy, dx_x, s, threads, mean, dy_mean.data(), xmu_scale.data(), scale.data(), dx, mask);
        return;
    }
    const PlaneSplits plan(s);
    const SumsOp op{dy, x, mean, s, mask.reading()};
    const int64_t stride = C * s.inner;
    const int64_t run_bytes = s.inner * int64_t(sizeof(T));
    const bool prefetch = prefetches_next_channel<T>(s, stream);
    parallel_writes(team, C, channel_block(s, team), stream, [&](int64_t c, int) {
        const Sums sums = plan.channel_partial<Sums>(s, op, c);
        detail::round_backward_sums(sums.dy, sums.dy_xmu, invstd[c], sum_dy[c], sum_dy_xhat[c]);
        const auto k =
            detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count, batch_stats);
        for (int64_t o = 0; o < s.outer; ++o) {
            const int64_t offset = o * stride + c * s.inner;
            if (prefetch) {  // the next channel's run, which follows this one in memory
                prefetch_range(dy + offset + s.inner, run_bytes);
                prefetch_range(x + offset + s.inner, run_bytes);
                if (mask.y) prefetch_range(mask.y + offset + s.inner, run_bytes);
            }
            backward_run(dy + offset, dx_x ? dx_x + offset : dx_x, dx + offset, s.inner, mean[c], k, stream,
                         mask.at(offset));
        }
    });
}

}  // namespace

template <class T>
void backward_sums(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, double* sum_dy,
                   double* sum_dy_xmu, const ReluGrad<T>& relu) {
    with_gradient_mask(relu, false, [&](const auto& mask) {
        backward_sums_fused(dy, x, s, threads, mean, sum_dy, sum_dy_xmu, mask);
    });
}

template <class T>
void backward_dx(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* dy_mean,
                 const param_t<T>* xmu_scale, const param_t<T>* scale, T* dx, const ReluGrad<T>& relu) {
    with_gradient_mask(relu, true, [&](const auto& mask) {
        backward_dx_fused(dy, x, s, threads, mean, dy_mean, xmu_scale, scale, dx, mask);
    });
}

template <class T>
void backward(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* invstd,
              const param_t<T>* weight, bool batch_stats, T* dx, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat,
              const ReluGrad<T>& relu) {
    with_gradient_mask(relu, true, [&](const auto& mask) {
        backward_fused(dy, x, s, threads, mean, invstd, weight, batch_stats, dx, sum_dy, sum_dy_xhat, mask);
    });
}

#define BNORM_INSTANTIATE(T)                                                                  \
    template void backward_sums<T>(const T*, const T*, Shape, int, const param_t<T>*, double*, \
                                   double*, const ReluGrad<T>&);                              \
    template void backward_dx<T>(const T*, const T*, Shape, int, const param_t<T>*,           \
                                 const param_t<T>*, const param_t<T>*, const param_t<T>*, T*, \
                                 const ReluGrad<T>&);                                         \
    template void backward<T>(const T*, const T*, Shape, int, const param_t<T>*,              \
                              const param_t<T>*, const param_t<T>*, bool, T*, param_t<T>*,    \
                              param_t<T>*, const ReluGrad<T>&);
BNORM_KERNEL_TYPES(BNORM_INSTANTIATE)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
