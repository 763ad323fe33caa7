/* Blocked GEMM for prefill with quantized weights: Y[M,N] = X[M,K] @ W[N,K]^T (+ bias),
 * M large (prefill: tens to thousands of rows), W held quantized (quant_gemm.c's formats),
 * in fp32 -- or, asked for (--quantized-prefill-dtype) on a build with AVX512-BF16, with x
 * and each widened chunk rounded to bf16 and VDPBF16PS tiles summing in fp32 (ktile_bf16
 * below: two k per instruction, ~1.9x the fp32 tiles per matrix on a Zen 4 EPYC).
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

#if defined(__AVX512BF16__) && VW == 16
#define PANEL_BF16 1
/* The bf16 tiles (AVX512-BF16): y (+)= x_bf16[mt][kc] @ b_bf16, b in panels stored as k
 * pairs ([kc / 2][16][2] bf16: one zmm per pair of k), x rows bf16 with k pairs adjacent.
 * VDPBF16PS multiplies two k per lane and accumulates in fp32: twice the multiplies of an
 * fp32 FMA per instruction. Same tile shapes as ktile (12 rows x 2 panels). */
INLINE void ktile_bf16(const uint16_t *x, int64_t ldx, const int mt, int64_t kc,
                       const uint16_t *b, int64_t bstride, const float *bias, float *y,
                       int64_t ldy, const int nb, const int accumulate) {
    __m512 acc[MT][TB];
#pragma GCC unroll 16
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 2
        for (int a = 0; a < TB; a++) {
            if (m >= mt || a >= nb) continue;
            acc[m][a] = accumulate ? _mm512_loadu_ps(y + m * ldy + a * 16)
                        : bias     ? _mm512_loadu_ps(bias + a * 16)
                                   : _mm512_setzero_ps();
        }
    for (int64_t kp = 0; kp < kc / 2; kp++) {
        __m512bh w[TB];
#pragma GCC unroll 2
        for (int a = 0; a < TB; a++)
            if (a < nb) w[a] = (__m512bh)_mm512_loadu_si512(b + a * bstride + kp * 32);
#pragma GCC unroll 16
        for (int m = 0; m < MT; m++)
            if (m < mt) {
                int32_t pair;
                memcpy(&pair, x + m * ldx + 2 * kp, 4);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 2
                for (int a = 0; a < TB; a++)
                    if (a < nb) acc[m][a] = _mm512_dpbf16_ps(acc[m][a], xv, w[a]);
            }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 2
        for (int a = 0; a < TB; a++)
            if (m < mt && a < nb) _mm512_storeu_ps(y + m * ldy + a * 16, acc[m][a]);
}

static void ktile_bf16_dispatch(const uint16_t *x, int64_t ldx, int mt, int64_t kc,
                                const uint16_t *b, int64_t bstride, const float *bias, float *y,
                                int64_t ldy, int nb, int accumulate) {
    switch (mt) { KT_CASES(ktile_bf16) }
}

/* fp32 [kc][16] -> bf16 k pairs [kc / 2][16][2] (round to nearest even), kc even */
static void pack_pairs_bf16(const float *src, int64_t kc, uint16_t *dst) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    for (int64_t kp = 0; kp < kc / 2; kp++) {
        const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + (2 * kp + 1) * 16),
                                                  _mm512_loadu_ps(src + 2 * kp * 16));
        _mm512_storeu_si512(dst + kp * 32, _mm512_permutexvar_epi16(idx, (__m512i)both));
    }
}

/* x rows [r0, r1) -> bf16 (k each, row stride k) */
static void rows_to_bf16(const float *x, int64_t ldx, int64_t k, int64_t r0, int64_t r1,
                         uint16_t *xb) {
    for (int64_t r = r0; r < r1; r++) {
        int64_t c = 0;
        for (; c + 16 <= k; c += 16)
            _mm256_storeu_si256((__m256i *)(xb + r * k + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * ldx + c)));
        for (; c < k; c++) {
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_set1_ps(x[r * ldx + c]));
            uint16_t h[16];
            memcpy(h, &v, 32);
            xb[r * k + c] = h[0];
        }
    }
}
#else
#define PANEL_BF16 0
#endif

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
                        const float *bbuf, int64_t r0, int64_t rows, float *ragged,
                        const uint16_t *xb, int64_t ldxb, const uint16_t *bbuf16) {
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
#if PANEL_BF16
            if (xb != NULL)
                ktile_bf16_dispatch(xb + m0 * ldxb + k0, ldxb, mt, kc,
                                    bbuf16 + (pi - g0) * kc * 16, kc * 16, bb, yt + m0 * ly, ly,
                                    nb, accumulate);
            else
#endif
                ktile_dispatch(x + m0 * ldx + k0, ldx, mt, kc, bbuf + (pi - g0) * kc * 16,
                               kc * 16, bb, yt + m0 * ly, ly, nb, accumulate);
            m0 += mt;
        }
    }
}

/* One unit: panels [p0, p1) for all m rows. `ragged`: an m x 16 * TB scratch when the unit
 * ends with an item narrower than its 16 * nb columns (n % 16 != 0), else NULL. */
static void unit(const float *x, int64_t m, int64_t ldx, int64_t n, int64_t k, int64_t kc_max,
                 const float *bias, float *y, int64_t ldy, widen_fn widen, const void *ctx,
                 int64_t p0, int64_t p1, float *bbuf, float *ragged, const uint16_t *xb,
                 uint16_t *bbuf16) {
    int64_t mc = X_BLOCK_BYTES / (4 * kc_max) / MT * MT;
    mc = mc < MT ? MT : mc;
    for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
        const int64_t kc = k - k0 < kc_max ? k - k0 : kc_max;
        for (int64_t pi = p0; pi < p1; pi++) {
            widen(ctx, pi, k0, kc, bbuf + (pi - p0) * kc * 16);
#if PANEL_BF16
            if (xb != NULL)
                pack_pairs_bf16(bbuf + (pi - p0) * kc * 16, kc, bbuf16 + (pi - p0) * kc * 16);
#endif
        }
        for (int64_t r0 = 0; r0 < m; r0 += mc)
            chunk_block(x, ldx, n, k0, kc, bias, y, ldy, p0, p1, bbuf, r0,
                        m - r0 < mc ? m - r0 : mc, ragged, xb, k, bbuf16);
    }
    if (ragged != NULL) { /* copy the ragged item out */
        const int64_t c0 = (p1 - 1 - (p1 - 1 - p0) % TB) * 16, cols = n - c0;
        for (int64_t r = 0; r < m; r++) memcpy(y + r * ldy + c0, ragged + r * 16 * TB, cols * 4);
    }
}

void pdcore_internal_panel_gemm(const float *x, int64_t m, int64_t ldx, int64_t n, int64_t k,
                                int64_t kalign, const float *bias, float *y, int64_t ldy,
                                widen_fn widen, const void *ctx, int bf16, int threads) {
    bf16 = bf16 && PANEL_BF16 && k % 2 == 0;
    if (bf16 && kalign % 2) kalign *= 2; /* whole k pairs per chunk */
    const int64_t panels = (n + 15) / 16;
    const int64_t chunks = (k + KC_TARGET - 1) / KC_TARGET;
    const int64_t kc_max = ((k + chunks - 1) / chunks + kalign - 1) / kalign * kalign;
    const int64_t units = (panels + UNIT_PANELS - 1) / UNIT_PANELS;
    if (threads > units) threads = (int)units;
    uint16_t *xb = NULL;
    if (bf16) {
        xb = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(m * k) + 64);
        if (xb == NULL) abort(); /* out of memory: fail loudly */
    }
#pragma omp parallel num_threads(threads)
    {
        float *bbuf = (float *)malloc(sizeof(float) * (size_t)(UNIT_PANELS * kc_max * 16) + 64);
        uint16_t *bbuf16 = NULL;
        float *ragged = NULL;
        if (bbuf == NULL) abort(); /* out of memory: fail loudly */
#if PANEL_BF16
        if (bf16) {
            bbuf16 = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(UNIT_PANELS * kc_max * 16) + 64);
            if (bbuf16 == NULL) abort();
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) rows_to_bf16(x, ldx, k, r, r + 1, xb);
        }
#endif
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
                 ragged_here ? ragged : NULL, xb, bbuf16);
        }
        free(ragged);
        free(bbuf16);
        free(bbuf);
    }
    free(xb);
}
