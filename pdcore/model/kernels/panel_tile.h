/* Register tiles over fp32 panels, shared by panel_gemm.c (prefill GEMM) and
 * extend_attention.c (its two products): y[mt][16 * nb] (+)= x[mt][kc] @ b[kc][16 * nb],
 * b in panels of 16 columns ([kc][16] each). Shapes: accumulators + weight vectors + one
 * broadcast fill the register file (AVX2 6 x 16, AVX512 12 x 32, NEON 6 x 16). */
#ifndef PDCORE_PANEL_TILE_H
#define PDCORE_PANEL_TILE_H
#include "tile_shape.h"

#define MT MT_MAX
/* mt (1..MT) rows x nb (1..TB) panels of 16 features over one K chunk. `b` points at the
 * first panel's chunk, the next panel's is `bstride` floats on. accumulate: y += ...;
 * else y = bias (or 0) + .... Every flag is a compile-time constant in the calls below. */
INLINE void ktile(const float *x, int64_t ldx, const int mt, int64_t kc, const float *b,
                  int64_t bstride, const float *bias, float *y, int64_t ldy, const int nb,
                  const int accumulate) {
    vf acc[MT][ACC];
#pragma GCC unroll 16
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 16
        for (int a = 0; a < ACC; a++) {
            if (m >= mt || a >= nb * NV) continue;
            acc[m][a] = accumulate ? load_f32(y + m * ldy + a * VW)
                        : bias     ? load_f32(bias + a * VW)
                                   : vzero();
        }
    for (int64_t kk = 0; kk < kc; kk++) {
        vf w[ACC];
#pragma GCC unroll 16
        for (int a = 0; a < ACC; a++)
            if (a < nb * NV) w[a] = load_f32(b + (a / NV) * bstride + kk * 16 + (a % NV) * VW);
#pragma GCC unroll 16
        for (int m = 0; m < MT; m++)
            if (m < mt) {
                const vf xv = splat(x[m * ldx + kk]);
#pragma GCC unroll 16
                for (int a = 0; a < ACC; a++)
                    if (a < nb * NV) acc[m][a] += xv * w[a];
            }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; m++)
#pragma GCC unroll 16
        for (int a = 0; a < ACC; a++)
            if (m < mt && a < nb * NV) store_f32(y + m * ldy + a * VW, acc[m][a]);
}

/* One call of FN (ktile, or panel_gemm.c's ktile_bf16: the same parameters) with its
 * shape and accumulate flag as compile-time constants; KT_CASES(FN) is a switch body over
 * mt = 1..MT. */
#define KT_CALL(FN, MTV, NB)                                      \
    if (accumulate)                                               \
        FN(x, ldx, MTV, kc, b, bstride, bias, y, ldy, NB, 1);     \
    else                                                          \
        FN(x, ldx, MTV, kc, b, bstride, bias, y, ldy, NB, 0);
#if TB == 2
#define KT_CASE(FN, MTV)        \
    case MTV:                   \
        if (nb == 2) {          \
            KT_CALL(FN, MTV, 2) \
        } else {                \
            KT_CALL(FN, MTV, 1) \
        }                       \
        break;
#else
#define KT_CASE(FN, MTV)    \
    case MTV:               \
        KT_CALL(FN, MTV, 1) \
        break;
#endif
#define KT_CASES_6(FN) \
    KT_CASE(FN, 1) KT_CASE(FN, 2) KT_CASE(FN, 3) KT_CASE(FN, 4) KT_CASE(FN, 5) KT_CASE(FN, 6)
#if MT > 6
#define KT_CASES(FN) \
    KT_CASES_6(FN)   \
    KT_CASE(FN, 7) KT_CASE(FN, 8) KT_CASE(FN, 9) KT_CASE(FN, 10) KT_CASE(FN, 11) KT_CASE(FN, 12)
#else
#define KT_CASES(FN) KT_CASES_6(FN)
#endif

static void ktile_dispatch(const float *x, int64_t ldx, int mt, int64_t kc, const float *b,
                           int64_t bstride, const float *bias, float *y, int64_t ldy, int nb,
                           int accumulate) {
    switch (mt) { KT_CASES(ktile) }
}

#endif
