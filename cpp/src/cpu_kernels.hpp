// CPU kernels on raw pointers over the (outer, channels, inner) view.
//
// Arguments are trusted here: cpu_api.cpp checks them. Every reduction cuts each
// channel's values into tiles that depend on the shape alone and merges the tile results
// in a fixed order, so results never depend on the number of threads.
#pragma once

#include <cstdint>

#include "bnorm/types.hpp"

namespace bnorm::kernels {

/// The instruction sets the kernels are built for (x86-64: baseline SSE2, AVX2 + FMA + F16C,
/// AVX-512 F/BW/VL/DQ, and that plus AVX-512 BF16 for bfloat16's conversions; elsewhere
/// baseline only). Each build is the same source compiled
/// with other flags into its own namespace; the entry points below call the widest one the
/// CPU runs, or the one named by the environment variable BNORM_CPU_ISA.
enum class Isa { baseline, avx2, avx512, avx512bf16 };

/// The instruction set in use, chosen at first use.
Isa isa();
const char* isa_name(Isa isa);

// The forward write passes take bnorm::Epilogue (types.hpp): y = act(value + residual).

/// ReLU's gradient in the backward passes: with y (the fused forward's output; null: no
/// mask) they use g = y > 0 ? dy : 0 in place of dy; the write passes also store g to
/// dsum when it is not null (dsum may be dy; it must not overlap x, y or dx otherwise).
template <class T>
struct ReluGrad {
    const T* y = nullptr;
    T* dsum = nullptr;
};

namespace baseline {
#include "cpu_kernels.inc"
}
namespace avx2 {
#include "cpu_kernels.inc"
}
namespace avx512 {
#include "cpu_kernels.inc"
}
namespace avx512bf16 {
#include "cpu_kernels.inc"
}

// The dispatching entry points.
#include "cpu_kernels.inc"

}  // namespace bnorm::kernels
