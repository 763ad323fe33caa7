/* Paged decode attention for bf16 KV caches on CPUs with AVX512-BF16.
 *
 * Why: the generic path gathers every sequence's K and V out of the page pool into new
 * tensors (index_select), then runs SDPA over a padded batch with a mask -- at batch 32
 * that is two copies of the whole live KV cache per layer per step. Here each (sequence,
 * KV head) reads its K/V rows straight from the pool through the slot table, once, for
 * all the query heads of its GQA group, and the step's new K/V rows are written into the
 * pool by the same pass. Softmax is exact (two passes over the scores, in fp32).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_common.h"

#define MAX_GROUP 16
#define MAX_DIM 256

/* q:      [b, h, d] rows of stride ldq (head stride d)      -- this step's queries
 * k_new:  [b, kvh, d] rows of stride ldk; v_new likewise ldv -- this step's keys/values
 * kc, vc: the layer's pool as flat slots [slots, kvh, d]
 * slots:  [b, max_len] flat slot of every token of each sequence (new token included)
 * lens:   [b] tokens per sequence (new token included)
 * out:    [b, h * d]
 * d % 32 == 0, d <= MAX_DIM, h / kvh <= MAX_GROUP (the caller checks). */
void pdcore_bf16_decode_attention(const uint16_t *q, int64_t ldq, const uint16_t *k_new,
                                  int64_t ldk, const uint16_t *v_new, int64_t ldv, uint16_t *kc,
                                  uint16_t *vc, const int64_t *slots, int64_t max_len,
                                  const int64_t *lens, int64_t b, int64_t h, int64_t kvh,
                                  int64_t d, float scale, uint16_t *out, int threads) {
    const int64_t group = h / kvh;
    const int64_t row = kvh * d; /* elements per slot */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < b * kvh; item++) {
        const int64_t s = item / kvh, kh = item % kvh;
        const int64_t len = lens[s];
        const int64_t *sl = slots + s * max_len;
        /* this step's K/V row goes into its slot (the sequence's last token) first */
        const int64_t last = sl[len - 1];
        memcpy(kc + last * row + kh * d, k_new + s * ldk + kh * d, d * sizeof(uint16_t));
        memcpy(vc + last * row + kh * d, v_new + s * ldv + kh * d, d * sizeof(uint16_t));

        float *scores = (float *)malloc(sizeof(float) * group * (len + 16));
        __m512bh qv[MAX_GROUP][MAX_DIM / 32];
        for (int64_t g = 0; g < group; g++)
            for (int64_t c = 0; c < d / 32; c++)
                qv[g][c] = (__m512bh)_mm512_loadu_si512(
                    (const void *)(q + s * ldq + (kh * group + g) * d + c * 32));
        /* pass 1: scores = q . k * scale */
        for (int64_t t = 0; t < len; t++) {
            const uint16_t *kr = kc + sl[t] * row + kh * d;
            __m512bh kv[MAX_DIM / 32];
            for (int64_t c = 0; c < d / 32; c++)
                kv[c] = (__m512bh)_mm512_loadu_si512((const void *)(kr + c * 32));
            for (int64_t g = 0; g < group; g++) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t c = 0; c < d / 32; c++) acc = _mm512_dpbf16_ps(acc, qv[g][c], kv[c]);
                scores[g * len + t] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
        /* softmax per head, in place */
        float inv_sum[MAX_GROUP];
        for (int64_t g = 0; g < group; g++) {
            float *sc = scores + g * len;
            float mx = -INFINITY;
            for (int64_t t = 0; t < len; t++) mx = sc[t] > mx ? sc[t] : mx;
            const __m512 vmx = _mm512_set1_ps(mx);
            __m512 vsum = _mm512_setzero_ps();
            int64_t t = 0;
            for (; t + 16 <= len; t += 16) {
                __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sc + t), vmx));
                _mm512_storeu_ps(sc + t, e);
                vsum = _mm512_add_ps(vsum, e);
            }
            if (t < len) {
                __mmask16 m = (__mmask16)((1u << (len - t)) - 1);
                __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), vmx));
                _mm512_mask_storeu_ps(sc + t, m, e);
                vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
            }
            inv_sum[g] = 1.0f / _mm512_reduce_add_ps(vsum);
        }
        /* pass 2: out = sum_t p_t v_t, each V row read once for the whole group */
        __m512 acc[MAX_GROUP][MAX_DIM / 16];
        for (int64_t g = 0; g < group; g++)
            for (int64_t c = 0; c < d / 16; c++) acc[g][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            const uint16_t *vr = vc + sl[t] * row + kh * d;
            __m512 vv[MAX_DIM / 16];
            for (int64_t c = 0; c < d / 16; c++) vv[c] = load_bf16(vr + c * 16);
            for (int64_t g = 0; g < group; g++) {
                const __m512 p = _mm512_set1_ps(scores[g * len + t]);
                for (int64_t c = 0; c < d / 16; c++) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
            }
        }
        for (int64_t g = 0; g < group; g++) {
            const __m512 is = _mm512_set1_ps(inv_sum[g]);
            uint16_t *o = out + s * h * d + (kh * group + g) * d;
            for (int64_t c = 0; c < d / 16; c++) store_bf16(o + c * 16, _mm512_mul_ps(acc[g][c], is));
        }
        free(scores);
    }
}
