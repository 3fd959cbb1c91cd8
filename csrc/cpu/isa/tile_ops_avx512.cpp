// TileOps compiled for ATen's AVX512 capability; CMakeLists.txt sets the
// -m flags and the CPU_CAPABILITY definitions for this file only.
#define LR_ISA_NAME "avx512"
#include "../tile_ops_impl.h"
