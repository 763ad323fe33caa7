/* Skinny GEMM for CPU decode steps: Y[M,N] = X[M,K] @ W[N,K]^T (+ bias), M small (1..32).
 *
 * Why our own: a decode step multiplies a few rows of activations by every weight matrix
 * once. The generic GEMM libraries re-block the activations on every call, and with bf16
 * weights on a CPU without bf16 arithmetic (AVX2, AVX512F, NEON) they emulate it. Here the
 * weights stay in their storage type (bf16: half the bytes to stream), are widened to fp32
 * in registers (exact: a 16-bit shift) and multiplied with fp32 FMAs -- also on CPUs with
 * AVX512-BF16, whose VDPBF16PS issues at half the rate of an fp32 FMA on the CPUs we
 * measured.
 *
 * Layout: weights packed once as [ceil(N/16)][K][16] (16 output features per k, the last
 * block zero-padded), so one weight load feeds up to MT_MAX rows of activations;
 * activations are widened to fp32 once per call and broadcast from L1. Any N and K.
 *
 * Registers: a tile is TB blocks of 16 features (NV vectors each) by MT_MAX rows, sized so
 * accumulators + weight vectors + one broadcast fit the ISA's register file (AVX2: 1 x 6,
 * AVX512: 2 x 12, NEON: 1 x 6 -- see vec.h for the widths).
 *
 * Threads: OpenMP over blocks of output features. Linked against the libgomp that torch
 * already loaded (same soname), so there is one OpenMP pool in the process, not two.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tile_shape.h"

/* nb (1..TB) blocks of 16 features, mt (1..MT_MAX) rows; every flag is a constant in the
 * specialised calls below, so the loops unroll into registers. With one or two rows, two
 * accumulator sets (even and odd k) hide the FMA latency the short chains would expose. */
INLINE void tile(const float *x, int64_t ldx, const int mt, int64_t k, const char *p,
                 int64_t block_bytes, const void *bias, void *y, int64_t ldy, const int nb,
                 const int wf32, const int yf32) {
    const int ks = mt <= 2 ? 2 : 1;
    vf acc[2][MT_MAX][ACC];
#pragma GCC unroll 16
    for (int a = 0; a < ACC; a++) {
        const vf b = bias && a < nb * NV ? load_w(bias, a * VW, yf32) : vzero();
#pragma GCC unroll 16
        for (int m = 0; m < MT_MAX; m++) acc[0][m][a] = b, acc[1][m][a] = vzero();
    }
    const int64_t es = wf32 ? 4 : 2;
    int64_t kk = 0;
    for (; kk + ks <= k; kk += ks) {
#pragma GCC unroll 2
        for (int s = 0; s < ks; s++) {
            if (wf32 || ((kk + s) & 1) == 0) /* one 64-byte line per k (fp32) or 2 k (bf16) */
#pragma GCC unroll 2
                for (int t = 0; t < nb; t++)
                    __builtin_prefetch(p + t * block_bytes + ((kk + s) * 16 + 1024) * es, 0, 3);
            vf w[ACC];
#pragma GCC unroll 16
            for (int a = 0; a < ACC; a++)
                w[a] = a < nb * NV
                           ? load_w(p + (a / NV) * block_bytes, (kk + s) * 16 + (a % NV) * VW, wf32)
                           : vzero();
#pragma GCC unroll 16
            for (int m = 0; m < MT_MAX; m++) {
                if (m < mt) {
                    const vf xv = splat(x[m * ldx + kk + s]);
#pragma GCC unroll 16
                    for (int a = 0; a < ACC; a++)
                        if (a < nb * NV) acc[s][m][a] += xv * w[a];
                }
            }
        }
    }
    for (; kk < k; kk++) { /* odd k with two sets */
#pragma GCC unroll 16
        for (int a = 0; a < ACC; a++) {
            if (a >= nb * NV) continue;
            const vf w = load_w(p + (a / NV) * block_bytes, kk * 16 + (a % NV) * VW, wf32);
#pragma GCC unroll 16
            for (int m = 0; m < MT_MAX; m++)
                if (m < mt) acc[0][m][a] += splat(x[m * ldx + kk]) * w;
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT_MAX; m++)
        if (m < mt)
#pragma GCC unroll 16
            for (int a = 0; a < ACC; a++)
                if (a < nb * NV)
                    store_y(y, m * ldy + a * VW, ks == 2 ? acc[0][m][a] + acc[1][m][a] : acc[0][m][a],
                            yf32);
}

#define TILE_NB(MT, NB)                                                          \
    if (wf32)                                                                    \
        tile(x, ldx, MT, k, p, block_bytes, bias, y, ldy, NB, 1, 1);             \
    else if (yf32)                                                               \
        tile(x, ldx, MT, k, p, block_bytes, bias, y, ldy, NB, 0, 1);             \
    else                                                                         \
        tile(x, ldx, MT, k, p, block_bytes, bias, y, ldy, NB, 0, 0);
#if TB == 2
#define TILE_CASE(MT)      \
    case MT:               \
        if (nb == 2) {     \
            TILE_NB(MT, 2) \
        } else {           \
            TILE_NB(MT, 1) \
        }                  \
        break;
#else
#define TILE_CASE(MT)  \
    case MT:           \
        TILE_NB(MT, 1) \
        break;
#endif

static void tile_dispatch(const float *x, int64_t ldx, int mt, int64_t k, const char *p,
                          int64_t block_bytes, const void *bias, void *y, int64_t ldy, int nb,
                          int wf32, int yf32) {
    switch (mt) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
#if MT_MAX > 6
        TILE_CASE(7)
        TILE_CASE(8)
        TILE_CASE(9)
        TILE_CASE(10)
        TILE_CASE(11)
        TILE_CASE(12)
#endif
    }
}

/* One item: nb (1..TB) blocks of 16 features starting at `p`, all m rows; `cols` (up to
 * 16 * nb) columns of y (and bias) are real, the rest padding. */
static void item(const float *xf, int64_t ldx, int64_t m, int64_t k, const char *p, int64_t block_bytes,
                 const void *bias, int nb, int64_t cols, void *y, int64_t ldy, int wf32,
                 int yf32) {
    const int64_t yes = yf32 ? 4 : 2;
    /* a ragged last item computes into padded scratch (bias too), then copies out */
    const int ragged = cols < 16 * nb;
    char pad_bias[16 * TB * 4], pad_y[MT_MAX * 16 * TB * 4];
    const void *bb = bias;
    if (ragged && bias) {
        memset(pad_bias, 0, sizeof pad_bias);
        memcpy(pad_bias, bb, cols * yes);
        bb = pad_bias;
    }
    /* rows split evenly over ceil(m / MT_MAX) tiles (32 = 6+6+5+5+5+5, not 6*5+2):
     * every tile re-streams the weights, so no tile should be a short one */
    const int64_t tiles = (m + MT_MAX - 1) / MT_MAX;
    for (int64_t ti = 0, m0 = 0; ti < tiles; ti++) {
        const int mt = (int)((m - m0 + (tiles - ti) - 1) / (tiles - ti));
        char *yt = (char *)y + m0 * ldy * yes;
        if (!ragged) {
            tile_dispatch(xf + m0 * ldx, ldx, mt, k, p, block_bytes, bb, yt,
                          ldy, nb, wf32, yf32);
        } else {
            tile_dispatch(xf + m0 * ldx, ldx, mt, k, p, block_bytes, bb,
                          pad_y, 16 * TB, nb, wf32, yf32);
            for (int r = 0; r < mt; r++)
                memcpy(yt + r * ldy * yes, pad_y + r * 16 * TB * yes, cols * yes);
        }
        m0 += mt;
    }
}

/* wf32: fp32 weights (else bf16); yf32: fp32 bias and output (else bf16). */
static void gemm(const float *xf, int64_t ldx, int64_t m, const void *packed, const void *bias,
                 int64_t n, int64_t k, void *y, int64_t ldy, int threads, int wf32, int yf32) {
    const int64_t wes = wf32 ? 4 : 2, yes = yf32 ? 4 : 2;
    const int64_t blocks = (n + 15) / 16;
    const int64_t items = (blocks + TB - 1) / TB;
    const int64_t block_bytes = k * 16 * wes;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t it = 0; it < items; it++) {
        const int64_t b0 = it * TB;
        const int nb = (int)(blocks - b0 < TB ? blocks - b0 : TB);
        const int64_t c0 = b0 * 16, cols = n - c0 < 16 * nb ? n - c0 : 16 * nb;
        item(xf, ldx, m, k, (const char *)packed + b0 * block_bytes, block_bytes,
             bias ? (const char *)bias + c0 * yes : NULL, nb, cols, (char *)y + c0 * yes, ldy,
             wf32, yf32);
    }
}

/* For quant_gemm.c (one thread's share): y[:, :cols] = x @ panel (+ bias) for one block of
 * 16 features whose weights are fp32 [k][16] -- a dequantized panel of quantized ones. */
void pdcore_internal_f32_panel(const float *x, int64_t ldx, int64_t m, const float *panel,
                               const float *bias, int64_t cols, int64_t k, float *y,
                               int64_t ldy) {
    item(x, ldx, m, k, (const char *)panel, k * 16 * 4, bias, 1, cols, y, ldy, 1, 1);
}

static float *widen_rows(const uint16_t *x, int64_t m, int64_t ldx, int64_t k) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)(m * k) + 64);
    if (xf == NULL) abort(); /* out of memory: fail loudly */
    for (int64_t r = 0; r < m; r++) {
        int64_t i = 0;
        for (; i + VW <= k; i += VW) store_f32(xf + r * k + i, load_bf16(x + r * ldx + i));
        for (; i < k; i++) {
            const uint32_t u = (uint32_t)x[r * ldx + i] << 16;
            memcpy(xf + r * k + i, &u, 4);
        }
    }
    return xf;
}

/* x: [m, k] bf16 (row stride ldx); packed: [ceil(n/16)][k][16] bf16; bias: [n] bf16 or
 * NULL; y: [m, n] bf16 (row stride ldy). */
void pdcore_bf16_skinny_gemm(const uint16_t *x, int64_t m, int64_t ldx, const uint16_t *packed,
                             const uint16_t *bias, int64_t n, int64_t k, uint16_t *y,
                             int64_t ldy, int threads) {
    float *xf = widen_rows(x, m, ldx, k);
    gemm(xf, k, m, packed, bias, n, k, y, ldy, threads, 0, 0);
    free(xf);
}

/* The same for an fp32 model: x [m, k] fp32 (row stride ldx), packed fp32, bias [n] fp32
 * or NULL, y [m, n] fp32. */
void pdcore_f32_skinny_gemm(const float *x, int64_t m, int64_t ldx, const float *packed,
                            const float *bias, int64_t n, int64_t k, float *y, int64_t ldy,
                            int threads) {
    gemm(x, ldx, m, packed, bias, n, k, y, ldy, threads, 1, 1);
}

/* fp32 compute with bf16 weights (half the bytes to stream): x [m, k] fp32, packed bf16,
 * bias [n] fp32 or NULL, y [m, n] fp32. */
void pdcore_f32_bf16w_skinny_gemm(const float *x, int64_t m, int64_t ldx,
                                  const uint16_t *packed, const float *bias, int64_t n,
                                  int64_t k, float *y, int64_t ldy, int threads) {
    gemm(x, ldx, m, packed, bias, n, k, y, ldy, threads, 0, 1);
}
