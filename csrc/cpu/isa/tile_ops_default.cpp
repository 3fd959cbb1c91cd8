// TileOps compiled for ATen's DEFAULT capability; CMakeLists.txt sets the
// -m flags and the CPU_CAPABILITY definitions for this file only.
#define LR_ISA_NAME "default"
#include "../tile_ops_impl.h"
