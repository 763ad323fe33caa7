/* Skinny bf16 GEMM for CPU decode steps: Y[M,N] = X[M,K] @ W[N,K]^T, M small (1..64).
 *
 * Why our own: a decode step multiplies a few rows of activations by every weight matrix
 * once. The generic GEMM libraries re-block the activations on every call and, on CPUs with
 * AVX512-BF16 but no AMX, run the bf16 dot-product instruction -- which on the CPUs we
 * measured issues at half the rate of an fp32 FMA (bench: 1.3 G VDPBF16PS/s vs 5.3 G
 * VFMADD/s per core). So the weights stay bf16 in memory (half the bytes to stream), are
 * widened to fp32 in registers (exact: a 16-bit shift), and multiplied with fp32 FMAs.
 *
 * Layout: weights packed once as [N/16][K][16] (16 output features per 32-byte line), so
 * one load feeds up to MT_MAX rows of activations; activations are widened to fp32 once
 * per call and broadcast from L1.
 *
 * Threads: OpenMP over blocks of output features. Linked against the libgomp that torch
 * already loaded (same soname), so there is one OpenMP pool in the process, not two.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16_common.h"

#define PREFETCH_ELEMS 1024 /* 2 KB ahead in each weight stream */
#define MT_MAX 12 /* rows per tile: 2 x 12 accumulators + 2 weight registers fit in 32 zmm */

static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, int mt,
                                                        int64_t k, const void *p0,
                                                        const void *p1, const void *bias,
                                                        void *y, int64_t ldy, int two,
                                                        int f32) {
    __m512 acc0[MT_MAX], acc1[MT_MAX];
    const __m512 b0 = bias ? load_w(bias, 0, f32) : _mm512_setzero_ps();
    const __m512 b1 = bias && two ? load_w(bias, 16, f32) : _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int m = 0; m < MT_MAX; m++) {
        acc0[m] = b0;
        acc1[m] = b1;
    }
    const int64_t esize = f32 ? 4 : 2;
    for (int64_t kk = 0; kk < k; kk++) {
        if (f32 || (kk & 1) == 0) { /* one 64-byte line per k (fp32) or two (bf16) */
            _mm_prefetch((const char *)p0 + (kk * 16 + PREFETCH_ELEMS) * esize, _MM_HINT_T0);
            if (two)
                _mm_prefetch((const char *)p1 + (kk * 16 + PREFETCH_ELEMS) * esize, _MM_HINT_T0);
        }
        const __m512 w0 = load_w(p0, kk * 16, f32);
        const __m512 w1 = two ? load_w(p1, kk * 16, f32) : w0;
#pragma GCC unroll 12
        for (int m = 0; m < MT_MAX; m++) {
            if (m < mt) {
                const __m512 xv = _mm512_set1_ps(x[m * ldx + kk]);
                acc0[m] = _mm512_fmadd_ps(xv, w0, acc0[m]);
                if (two) acc1[m] = _mm512_fmadd_ps(xv, w1, acc1[m]);
            }
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < MT_MAX; m++) {
        if (m < mt) {
            store_y(y, m * ldy, acc0[m], f32);
            if (two) store_y(y, m * ldy + 16, acc1[m], f32);
        }
    }
}

/* One specialisation per tile height and element type, so every loop above unrolls with
 * constants. */
#define TILE_CASE(MT)                                                            \
    case MT:                                                                     \
        if (f32)                                                                 \
            two ? tile(x, ldx, MT, k, p0, p1, bias, y, ldy, 1, 1)                \
                : tile(x, ldx, MT, k, p0, p1, bias, y, ldy, 0, 1);               \
        else                                                                     \
            two ? tile(x, ldx, MT, k, p0, p1, bias, y, ldy, 1, 0)                \
                : tile(x, ldx, MT, k, p0, p1, bias, y, ldy, 0, 0);               \
        break;

static void tile_dispatch(const float *x, int64_t ldx, int mt, int64_t k, const void *p0,
                          const void *p1, const void *bias, void *y, int64_t ldy, int two,
                          int f32) {
    switch (mt) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
        TILE_CASE(7)
        TILE_CASE(8)
        TILE_CASE(9)
        TILE_CASE(10)
        TILE_CASE(11)
        TILE_CASE(12)
    }
}

static void gemm(const float *xf, int64_t ldx, int64_t m, const void *packed, const void *bias,
                 int64_t n, int64_t k, void *y, int64_t ldy, int threads, int f32) {
    const int64_t esize = f32 ? 4 : 2;
    const int64_t blocks = n / 16;
    const int64_t pairs = (blocks + 1) / 2; /* work items: two 16-feature blocks each */
    const int64_t block_bytes = k * 16 * esize;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pi = 0; pi < pairs; pi++) {
        const int64_t b0 = pi * 2;
        const int two = b0 + 1 < blocks;
        const char *p0 = (const char *)packed + b0 * block_bytes;
        const char *p1 = two ? p0 + block_bytes : p0;
        const void *bb = bias ? (const char *)bias + b0 * 16 * esize : NULL;
        for (int64_t m0 = 0; m0 < m; m0 += MT_MAX) {
            int mt = (int)(m - m0 < MT_MAX ? m - m0 : MT_MAX);
            void *yt = (char *)y + (m0 * ldy + b0 * 16) * esize;
            tile_dispatch(xf + m0 * ldx, ldx, mt, k, p0, p1, bb, yt, ldy, two, f32);
        }
    }
}

/* x: [m, k] bf16 (row stride ldx); packed: [n/16][k][16] bf16; bias: [n] bf16 or NULL;
 * y: [m, n] bf16 (row stride ldy). n % 16 == 0 and k % 16 == 0 (the caller checks). */
void pdcore_bf16_skinny_gemm(const uint16_t *x, int64_t m, int64_t ldx, const uint16_t *packed,
                             const uint16_t *bias, int64_t n, int64_t k, uint16_t *y,
                             int64_t ldy, int threads) {
    float *xf = (float *)aligned_alloc(64, sizeof(float) * (size_t)(m * k));
    if (xf == NULL && m * k > 0) abort(); /* out of memory: fail loudly */
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < k; i += 16) _mm512_store_ps(xf + r * k + i, load_bf16(x + r * ldx + i));
    gemm(xf, k, m, packed, bias, n, k, y, ldy, threads, 0);
    free(xf);
}

/* The same for an fp32 model: x [m, k] fp32 (row stride ldx), packed [n/16][k][16] fp32,
 * bias [n] fp32 or NULL, y [m, n] fp32. */
void pdcore_f32_skinny_gemm(const float *x, int64_t m, int64_t ldx, const float *packed,
                            const float *bias, int64_t n, int64_t k, float *y, int64_t ldy,
                            int threads) {
    gemm(x, ldx, m, packed, bias, n, k, y, ldy, threads, 1);
}
