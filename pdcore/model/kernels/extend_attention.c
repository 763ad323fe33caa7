/* Causal attention for prefill ("extend") batches, fp32 or bf16 KV pool, read through the
 * page table.
 *
 * Why our own: torch's CPU SDPA (flash, fp32) measured ~33 GFLOPS on SmolLM2's shapes
 * (512 tokens, 9 query / 3 KV heads, d 64) -- a fifth of a prefill's time for a twelfth of
 * its FLOPs -- and a sequence with a cached prefix first gathers its whole K/V out of the
 * pool (index_select) and builds a mask. Here, flash-style:
 *
 *   work item = (sequence, KV head, block of BQ query rows); its M = rows x group query
 *   heads share every K/V chunk:
 *     Q (scaled) -> fp32 [M][d]
 *     for each chunk of BK keys up to the block's last position:
 *         K chunk -> panels [d][16] (transposed), V chunk -> panels [BK][16]
 *         S = Q K^T                      register tiles (panel_tile.h)
 *         causal mask, online softmax    (running max and sum per row, O rescaled)
 *         O += P V                       register tiles
 *     out = O / sum
 *
 * Items are ordered longest first and scheduled dynamically (a causal block's cost grows
 * with its position). exp is vec.h's polynomial (relative error < 1e-5), as in decode.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panel_tile.h"

#define BK 64      /* keys per chunk: S is M x 64 */
#define MAX_HEAD_DIM 256
#define M_TARGET 192 /* query rows x heads per item: 32 AVX2 tiles share each K/V chunk's
                      * gather (~1.2x over 96; 288 and 384 balance worse on 2 threads) */

/* A row of d elements (fp32 or bf16) widened into dst, times `mul`. */
INLINE void widen_row(const char *src, int64_t d, float mul, float *dst, int f32) {
    for (int64_t c = 0; c < d; c += VW) store_f32(dst + c, load_w(src, c, f32) * splat(mul));
}

/* y[m][16 * panels] (+)= x[m][kdim] @ b, b as `panels` panels of [kdim][16]: both
 * products of a chunk -- S = Q K^T (x = Q, b = K transposed, kdim = d) and O += P V (x = P,
 * b = V, kdim = BK). */
static void product(const float *x, int64_t ldx, int64_t m, int64_t kdim, const float *b,
                    int64_t panels, float *y, int64_t ldy, int accumulate) {
    const int64_t tiles = (m + MT - 1) / MT;
    for (int64_t p = 0; p < panels; p += TB) {
        const int nb = (int)(panels - p < TB ? panels - p : TB);
        for (int64_t ti = 0, m0 = 0; ti < tiles; ti++) {
            const int mt = (int)((m - m0 + (tiles - ti) - 1) / (tiles - ti));
            ktile_dispatch(x + m0 * ldx, ldx, mt, kdim, b + p * kdim * 16, kdim * 16, NULL,
                           y + m0 * ldy + p * 16, ldy, nb, accumulate);
            m0 += mt;
        }
    }
}

/* One item. Buffers (per thread): qb, o [M_MAX][d]; s [M_MAX][BK]; kt, vp [BK][d];
 * mrow, lrow [M_MAX]. */
static void attend_block(const char *q, int64_t ldq, const char *kc, const char *vc,
                         const int64_t *sl, int64_t prefix, int64_t r0, int64_t r1,
                         int64_t kh, int64_t kvh, int64_t group, int64_t d, float scale,
                         char *out, int64_t ldo, int f32, float *qb, float *o, float *s,
                         float *kt, float *vp, float *mrow, float *lrow) {
    const int64_t es = f32 ? 4 : 2, row = kvh * d * es, m = (r1 - r0) * group;
    for (int64_t i = 0; i < m; i++) {
        const int64_t r = r0 + i / group, h = kh * group + i % group;
        widen_row(q + (r * ldq + h * d) * es, d, scale, qb + i * d, f32);
        mrow[i] = -INFINITY, lrow[i] = 0.0f;
    }
    memset(o, 0, sizeof(float) * (size_t)(m * d));
    const int64_t first_pos = prefix + r0, keys = prefix + r1; /* the block sees keys < keys */
    vi lane;
    for (int l = 0; l < VW; l++) lane[l] = l;
    for (int64_t j0 = 0; j0 < keys; j0 += BK) {
        const int64_t bk = keys - j0 < BK ? keys - j0 : BK;
        /* K transposed into 16-key panels [d][16]; V into 16-column panels [BK][16];
         * keys past bk are zero (their scores are masked, their P is 0) */
        for (int64_t j = 0; j < BK; j++) {
            float kr[MAX_HEAD_DIM], *vr = kr;
            if (j < bk) {
                widen_row(kc + sl[j0 + j] * row + kh * d * es, d, 1.0f, kr, f32);
                for (int64_t c = 0; c < d; c++) kt[(j / 16) * d * 16 + c * 16 + j % 16] = kr[c];
                widen_row(vc + sl[j0 + j] * row + kh * d * es, d, 1.0f, vr, f32);
            } else {
                memset(kr, 0, sizeof(float) * (size_t)d);
                for (int64_t c = 0; c < d; c++) kt[(j / 16) * d * 16 + c * 16 + j % 16] = 0.0f;
            }
            for (int64_t p = 0; p < d / 16; p++) memcpy(vp + p * BK * 16 + j * 16, vr + p * 16, 64);
        }
        product(qb, d, m, d, kt, BK / 16, s, BK, 0); /* S = Q K^T */
        const int masked = j0 + BK - 1 > first_pos; /* some key of the chunk is in the future */
        for (int64_t i = 0; i < m; i++) {
            float *si = s + i * BK;
            const int64_t visible = masked ? prefix + r0 + i / group + 1 - j0 : BK; /* keys */
            const int64_t vis = visible < bk ? visible : bk;
            /* future and padding keys: -inf, so they neither set the max nor weigh */
            vf vmx = splat(-INFINITY);
            for (int64_t j = 0; j < BK; j += VW) {
                const vi keep = lane + (int32_t)j < (int32_t)vis; /* -1 where visible */
                const vf sv = (vf)(((vi)load_f32(si + j) & keep) | ((vi)splat(-INFINITY) & ~keep));
                store_f32(si + j, sv);
                vmx = vmax(vmx, sv);
            }
            const float mx = hmax(vmx), mnew = mx > mrow[i] ? mx : mrow[i];
            const float corr = expf(mrow[i] - mnew); /* 0 on the first chunk */
            vf vsum = vzero();
            for (int64_t j = 0; j < BK; j += VW) {
                const vf sv = load_f32(si + j);
                const vi keep = sv != splat(-INFINITY);
                const vf pv = (vf)((vi)exp_vf(sv - splat(mnew)) & keep);
                store_f32(si + j, pv);
                vsum += pv;
            }
            lrow[i] = lrow[i] * corr + hsum(vsum);
            mrow[i] = mnew;
            if (corr != 1.0f)
                for (int64_t c = 0; c < d; c += VW)
                    store_f32(o + i * d + c, load_f32(o + i * d + c) * splat(corr));
        }
        product(s, BK, m, BK, vp, d / 16, o, d, 1); /* O += P V */
    }
    for (int64_t i = 0; i < m; i++) {
        const int64_t r = r0 + i / group, h = kh * group + i % group;
        const vf inv = splat(1.0f / lrow[i]);
        for (int64_t c = 0; c < d; c += VW)
            store_y(out + (r * ldo + h * d) * es, c, load_f32(o + i * d + c) * inv, f32);
    }
}

static int by_cost_desc(const void *a, const void *b) {
    const int64_t ca = ((const int64_t *)a)[4], cb = ((const int64_t *)b)[4];
    return ca < cb ? 1 : ca > cb ? -1 : 0;
}

static void extend_attention(const char *q, int64_t ldq, const char *kc, const char *vc,
                             const int64_t *slots, const int64_t *seqs, int64_t nseq, int64_t h,
                             int64_t kvh, int64_t d, float scale, char *out, int threads,
                             int f32) {
    const int64_t group = h / kvh;
    const int64_t bq = M_TARGET / group > 0 ? M_TARGET / group : 1, m_max = bq * group;
    int64_t count = 0;
    for (int64_t s = 0; s < nseq; s++) count += (seqs[s * 4 + 1] + bq - 1) / bq * kvh;
    /* items as [seq, kh, r0, r1, cost] rows, longest first */
    int64_t *items = (int64_t *)malloc(sizeof(int64_t) * 5 * (size_t)(count > 0 ? count : 1));
    if (items == NULL) abort(); /* out of memory: fail loudly */
    int64_t n = 0;
    for (int64_t s = 0; s < nseq; s++) {
        const int64_t ext = seqs[s * 4 + 1], prefix = seqs[s * 4 + 2] - ext;
        for (int64_t r0 = 0; r0 < ext; r0 += bq)
            for (int64_t kh = 0; kh < kvh; kh++) {
                const int64_t r1 = ext - r0 < bq ? ext : r0 + bq;
                int64_t *it = items + 5 * n++;
                it[0] = s, it[1] = kh, it[2] = r0, it[3] = r1, it[4] = (prefix + r1) * (r1 - r0);
            }
    }
    qsort(items, (size_t)n, sizeof(int64_t) * 5, by_cost_desc);
    if (threads > n) threads = n > 0 ? (int)n : 1;
    const int64_t es = f32 ? 4 : 2;
#pragma omp parallel num_threads(threads)
    {
        const size_t floats = (size_t)(2 * m_max * d + m_max * BK + 2 * BK * d + 2 * m_max);
        float *buf = (float *)malloc(sizeof(float) * floats + 64);
        if (buf == NULL) abort(); /* out of memory: fail loudly */
        float *qb = buf, *o = qb + m_max * d, *s = o + m_max * d, *kt = s + m_max * BK;
        float *vp = kt + BK * d, *mrow = vp + BK * d, *lrow = mrow + m_max;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; i++) {
            const int64_t *it = items + 5 * i, *sq = seqs + it[0] * 4;
            const int64_t start = sq[0], ext = sq[1], len = sq[2], off = sq[3];
            attend_block(q + start * ldq * es, ldq, kc, vc, slots + off, len - ext, it[2], it[3],
                         it[1], kvh, group, d, scale, out + start * h * d * es, h * d, f32, qb,
                         o, s, kt, vp, mrow, lrow);
        }
        free(buf);
    }
    free(items);
}

/* q:     [T, h, d] rows of stride ldq (heads packed) -- every sequence's new tokens, in order
 * kc, vc: the layer's pool as flat slots [slots, kvh, d], this batch's K/V rows written
 * slots: every sequence's token slots (its whole length, prefix included), concatenated
 * seqs:  [nseq][4] int64: first row in q, new tokens (ext), length (prefix + ext), offset
 *        of its slots in `slots`. Query row r of a sequence sees keys 0 .. prefix + r.
 * out:   [T, h * d]
 * Strides are in elements. d % 16 == 0, d <= MAX_HEAD_DIM (the caller checks). */
void pdcore_bf16_extend_attention(const uint16_t *q, int64_t ldq, const uint16_t *kc,
                                  const uint16_t *vc, const int64_t *slots, const int64_t *seqs,
                                  int64_t nseq, int64_t h, int64_t kvh, int64_t d, float scale,
                                  uint16_t *out, int threads) {
    extend_attention((const char *)q, ldq, (const char *)kc, (const char *)vc, slots, seqs, nseq,
                     h, kvh, d, scale, (char *)out, threads, 0);
}

/* The same for an fp32 model (every tensor fp32). */
void pdcore_f32_extend_attention(const float *q, int64_t ldq, const float *kc, const float *vc,
                                 const int64_t *slots, const int64_t *seqs, int64_t nseq,
                                 int64_t h, int64_t kvh, int64_t d, float scale, float *out,
                                 int threads) {
    extend_attention((const char *)q, ldq, (const char *)kc, (const char *)vc, slots, seqs, nseq,
                     h, kvh, d, scale, (char *)out, threads, 1);
}
