// bnorm: batch normalization for C++ (umbrella header).
//
//   #include <bnorm/bnorm.hpp>
//   bnorm::forward_train(x, {N, C, H * W}, weight, bias, running_mean, running_var,
//                        0.1, 1e-5, y, save_mean, save_invstd);
//
// bnorm::*        the CPU backend (bnorm/cpu.hpp); bnorm::fold (bnorm/fold.hpp)
// bnorm::cuda::*  the CUDA backend on device pointers (bnorm/cuda.hpp), when built with it
#pragma once

#include "bnorm/types.hpp"
#include "bnorm/version.hpp"
#include "bnorm/cpu.hpp"
#include "bnorm/fold.hpp"
#if defined(BNORM_HAS_CUDA) && BNORM_HAS_CUDA
#include "bnorm/cuda.hpp"
#endif
