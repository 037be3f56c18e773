# float32 row reductions with 4-row register tiles instead of 8 (80 registers: 3 blocks per SM)
sed -i 's/(sizeof(T) == 4 ? 8 : 4)/(sizeof(T) == 4 ? 4 : 4)/' cuda/reduce.hpp
grep -c "(sizeof(T) == 4 ? 4 : 4)" cuda/reduce.hpp
