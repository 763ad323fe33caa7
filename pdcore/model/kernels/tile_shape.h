/* The register-tile shape shared by the GEMM tiles (skinny_gemm.c's decode tiles,
 * panel_tile.h's prefill and attention tiles): 16-feature panels as NV vectors, TB panels
 * per tile (two on AVX512's 32 registers), up to MT_MAX rows -- accumulators + weight
 * vectors + one broadcast fill the register file (AVX2 6 x 16, AVX512 12 x 32, NEON 6 x 16). */
#ifndef PDCORE_TILE_SHAPE_H
#define PDCORE_TILE_SHAPE_H
#include "vec.h"

#define NV (16 / VW)
#define TB (VW == 16 ? 2 : 1)
#define ACC (TB * NV)
#define MT_RAW ((VREGS - ACC - 1) / ACC)
#define MT_MAX (MT_RAW > 12 ? 12 : MT_RAW)

#endif
