// moments: per-channel mean and biased variance (see cpu_passes.hpp for the schedules).
#include "cpu_moments.hpp"
#include "cpu_strips.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {

template <class T>
void moments(const T* x, Shape shape, int threads, double* mean, double* var) {
    const int team = team_size(shape, threads);
    if (const int64_t strip = strip_width(shape, team, sizeof(T))) {
        const RowSplits plan(shape);
        const MomentsOp<T> op{x, shape};
        using Work = typename MomentsOp<T>::Work;
        for_each_strip<Work>(shape, team, strip, false, [&](int64_t c0, int64_t c1, Work& work) {
            plan.strip_partials(shape, op, c0, c1, work);
            for (int64_t c = c0; c < c1; ++c) store(work.strip[c - c0], mean[c], var[c]);
        });
        return;
    }
    Scratch<Moments> result(shape.channels, Moments{});
    const Positions pos = positions_of(shape, For::reduce);
    if (pos.view.channels > 0) {
        Scratch<Moments> per_position(pos.view.channels), rest(pos.rest.outer > 0 ? shape.channels : 0);
        reduce(pos.view, threads, MomentsOp<T>{x, pos.view}, per_position.data());
        for (int64_t c = 0; c < shape.channels; ++c) result[c] = pos.fold_channel(per_position.data(), c);
        if (pos.rest.outer > 0) {
            reduce(pos.rest, threads, MomentsOp<T>{x + pos.view.size(), pos.rest}, rest.data());
            for (int64_t c = 0; c < shape.channels; ++c) merge(result[c], rest[c]);
        }
    } else {
        reduce(shape, threads, MomentsOp<T>{x, shape}, result.data());
    }
    for (int64_t c = 0; c < shape.channels; ++c) store(result[c], mean[c], var[c]);
}

#define BNORM_INSTANTIATE(T) template void moments<T>(const T*, Shape, int, double*, double*);
BNORM_KERNEL_TYPES(BNORM_INSTANTIATE)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
