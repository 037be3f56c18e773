# forward_train reading x once where a channel fits in shared memory (see the patch header; never run yet)
patch -p1 < benchmarks/ab/resident.patch
