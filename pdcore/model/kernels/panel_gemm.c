/* Blocked fp32 GEMM for prefill with quantized weights: Y[M,N] = X[M,K] @ W[N,K]^T (+ bias),
 * M large (prefill: tens to thousands of rows), W held quantized (quant_gemm.c's formats).
 *
 * Why our own: the alternative -- widen the whole matrix to fp32 (W^T, 4 bytes per weight
 * written to memory) and call the library GEMM, which reads it back and packs it again --
 * measured at parity with transformers' fp32 prefill, because transformers runs the same
 * library GEMM on weights it widened once at load. Here each weight is widened exactly
 * once per call, straight into a cache-sized block, and multiplied there:
 *
 *   for each unit of UNIT_PANELS panels (16 features each), taken by threads dynamically:
 *     for each K chunk (kc <= 576, a multiple of the format's block):
 *       widen the unit's panels' chunk into B (kc x 16 fp32 per panel)
 *       for each block of MC rows of X (mc x kc fp32: L2-resident while its panels pass)
 *           for each panel of the unit:   register tiles MT rows x 16 (x TB panels)
 *               y tile (+)= x rows [kc] @ B panel [kc][16]   (first chunk: bias, not y)
 *
 * So every weight is widened by one thread, once, and every y column written by one
 * thread. X is not packed: a tile broadcasts from MT row streams that stay in L2 for the
 * MC block; the next tile's y lines are prefetched. Tiles: skinny_gemm.c's shapes (AVX2 6 x 16,
 * AVX512 12 x 32, NEON 6 x 16): accumulators + weight vectors + one broadcast fill the
 * register file. Summation order differs from a library GEMM's (fp32 rounding only).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panel_tile.h"

/* k per chunk: a panel's chunk is <= 36 KB (L1/L2). Measured against 256 (L1-sized):
 * ~1.1x, as most of SmolLM2's matrices (K 576) then take one chunk and write y once. */
#define KC_TARGET 576
#define X_BLOCK_BYTES (128 * 1024) /* the rows of X one chunk works on at a time (L2) */

/* Panels per unit of work (a multiple of TB: units hold whole items). Threads take units
 * dynamically -- on a shared VM one core is often slower, and a static half each left the
 * other waiting ~8% of a prefill -- and a unit's widened chunks stay in L1/L2. */
#define UNIT_PANELS 4

/* Widens panel `panel`'s weights for k in [k0, k0 + kc) into dst [kc][16] fp32. */
typedef void (*widen_fn)(const void *ctx, int64_t panel, int64_t k0, int64_t kc, float *dst);

/* The tiles of panels [g0, g1) (B: their widened chunk, kc x 16 each) for rows
 * [r0, r0 + rows) over the K chunk at k0. `ragged`: see unit(). */
static void chunk_block(const float *x, int64_t ldx, int64_t n, int64_t k0, int64_t kc,
                        const float *bias, float *y, int64_t ldy, int64_t g0, int64_t g1,
                        const float *bbuf, int64_t r0, int64_t rows, float *ragged) {
    const int accumulate = k0 > 0;
    float bias_pad[16 * TB];
    for (int64_t pi = g0; pi < g1; pi += TB) {
        const int nb = (int)(g1 - pi < TB ? g1 - pi : TB);
        const int64_t c0 = pi * 16, cols = n - c0 < 16 * nb ? n - c0 : 16 * nb;
        const float *bb = bias && !accumulate ? bias + c0 : NULL;
        float *yt = y + c0;
        int64_t ly = ldy;
        if (cols < 16 * nb) { /* the ragged last item: its own padded y and bias */
            if (bb) {
                memset(bias_pad, 0, sizeof bias_pad);
                memcpy(bias_pad, bb, (size_t)cols * 4);
                bb = bias_pad;
            }
            yt = ragged, ly = 16 * TB;
        }
        /* rows split evenly over tiles (every tile re-reads the panel chunk) */
        const int64_t tiles = (rows + MT - 1) / MT;
        for (int64_t ti = 0, m0 = r0; ti < tiles; ti++) {
            const int mt = (int)((r0 + rows - m0 + (tiles - ti) - 1) / (tiles - ti));
            /* the next tile's y lines, so its loads and stores do not wait on memory */
            for (int64_t r = m0 + mt; r < m0 + 2 * mt && r < r0 + rows; r++)
                for (int c = 0; c < nb * 16; c += 16) __builtin_prefetch(yt + r * ly + c, 1, 3);
            ktile_dispatch(x + m0 * ldx + k0, ldx, mt, kc, bbuf + (pi - g0) * kc * 16, kc * 16,
                           bb, yt + m0 * ly, ly, nb, accumulate);
            m0 += mt;
        }
    }
}

/* One unit: panels [p0, p1) for all m rows. `ragged`: an m x 16 * TB scratch when the unit
 * ends with an item narrower than its 16 * nb columns (n % 16 != 0), else NULL. */
static void unit(const float *x, int64_t m, int64_t ldx, int64_t n, int64_t k, int64_t kc_max,
                 const float *bias, float *y, int64_t ldy, widen_fn widen, const void *ctx,
                 int64_t p0, int64_t p1, float *bbuf, float *ragged) {
    int64_t mc = X_BLOCK_BYTES / (4 * kc_max) / MT * MT;
    mc = mc < MT ? MT : mc;
    for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
        const int64_t kc = k - k0 < kc_max ? k - k0 : kc_max;
        for (int64_t pi = p0; pi < p1; pi++) widen(ctx, pi, k0, kc, bbuf + (pi - p0) * kc * 16);
        for (int64_t r0 = 0; r0 < m; r0 += mc)
            chunk_block(x, ldx, n, k0, kc, bias, y, ldy, p0, p1, bbuf, r0,
                        m - r0 < mc ? m - r0 : mc, ragged);
    }
    if (ragged != NULL) { /* copy the ragged item out */
        const int64_t c0 = (p1 - 1 - (p1 - 1 - p0) % TB) * 16, cols = n - c0;
        for (int64_t r = 0; r < m; r++) memcpy(y + r * ldy + c0, ragged + r * 16 * TB, cols * 4);
    }
}

void pdcore_internal_panel_gemm(const float *x, int64_t m, int64_t ldx, int64_t n, int64_t k,
                                int64_t kalign, const float *bias, float *y, int64_t ldy,
                                widen_fn widen, const void *ctx, int threads) {
    const int64_t panels = (n + 15) / 16;
    const int64_t chunks = (k + KC_TARGET - 1) / KC_TARGET;
    const int64_t kc_max = ((k + chunks - 1) / chunks + kalign - 1) / kalign * kalign;
    const int64_t units = (panels + UNIT_PANELS - 1) / UNIT_PANELS;
    if (threads > units) threads = (int)units;
#pragma omp parallel num_threads(threads)
    {
        float *bbuf = (float *)malloc(sizeof(float) * (size_t)(UNIT_PANELS * kc_max * 16) + 64);
        float *ragged = NULL;
        if (bbuf == NULL) abort(); /* out of memory: fail loudly */
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            const int64_t p0 = u * UNIT_PANELS;
            const int64_t p1 = p0 + UNIT_PANELS < panels ? p0 + UNIT_PANELS : panels;
            const int ragged_here = (n % 16) != 0 && p1 == panels;
            if (ragged_here) {
                ragged = (float *)malloc(sizeof(float) * (size_t)(m * 16 * TB) + 64);
                if (ragged == NULL) abort();
            }
            unit(x, m, ldx, n, k, kc_max, bias, y, ldy, widen, ctx, p0, p1, bbuf,
                 ragged_here ? ragged : NULL);
        }
        free(ragged);
        free(bbuf);
    }
}
