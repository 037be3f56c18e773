# 16-bit vector instantiations of the elementwise kernels and the row reduction capped at 80
# registers (3 blocks of 256 threads per SM; they use 95-106 registers: 2 blocks)
sed -i '/^__global__ void __launch_bounds__(kThreads)$/{N;s/__launch_bounds__(kThreads)\n\(flat_elementwise_kernel\|rows_elementwise_kernel\|row_reduce_kernel\)/__launch_bounds__(kThreads, (sizeof(T) == 2 \&\& V > 1) ? 3 : 1)\n\1/}' cuda/elementwise.hpp cuda/reduce.hpp
grep -A1 "sizeof(T) == 2 && V > 1" cuda/elementwise.hpp cuda/reduce.hpp | grep -c kernel
