# 16-bit row reductions with 2-row register tiles instead of 4 (104 registers: 2 blocks per SM)
sed -i 's/V == 1 ? 8 : (sizeof(T) == 2 ? 4 :/V == 1 ? 8 : (sizeof(T) == 2 ? 2 :/' cuda/reduce.hpp
grep -c "sizeof(T) == 2 ? 2 :" cuda/reduce.hpp
