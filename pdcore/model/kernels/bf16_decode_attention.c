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

#define MAX_DIM 256

/* Sixteen horizontal sums at once: a tree of in-register shuffles and adds (~45
 * instructions for 16 sums instead of ~8 each). The sums come out in a shuffled lane order;
 * `order` (found once by probing, see reduce16_order) puts them back. */
static inline __m512 sum_pairs_256(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
static inline __m512 sum_pairs_128(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}
static inline __m512 sum_pairs_64(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
static inline __m512 sum_pairs_32(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}
static inline __m512 reduce16_raw(const __m512 *v) {
    __m512 l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; i++) l1[i] = sum_pairs_256(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 4; i++) l2[i] = sum_pairs_128(l1[2 * i], l1[2 * i + 1]);
    for (int i = 0; i < 2; i++) l3[i] = sum_pairs_64(l2[2 * i], l2[2 * i + 1]);
    return sum_pairs_32(l3[0], l3[1]);
}
static inline __m512 reduce16(const __m512 *v, __m512i order) {
    return _mm512_permutexvar_ps(order, reduce16_raw(v));
}
/* Feed vector i with the value i in every lane: output lane j then holds 16 * (the
 * token it summed), which gives the permutation that restores token order. */
static __m512i reduce16_order(void) {
    __m512 probe[16];
    for (int i = 0; i < 16; i++) probe[i] = _mm512_set1_ps((float)i);
    float raw[16];
    _mm512_storeu_ps(raw, reduce16_raw(probe));
    int32_t idx[16];
    for (int j = 0; j < 16; j++) idx[(int)(raw[j] / 16.0f + 0.5f)] = j;
    return _mm512_loadu_si512((const void *)idx);
}

/* Scores scratch per OpenMP thread, grown as needed and kept: no malloc per sequence. */
static float *scratch(int64_t n) {
    static __thread float *buf = NULL;
    static __thread int64_t cap = 0;
    if (n > cap) {
        free(buf);
        cap = n * 2;
        buf = (float *)malloc(sizeof(float) * cap);
        if (buf == NULL) abort(); /* out of memory: fail loudly, never write through NULL */
    }
    return buf;
}

/* One (sequence, KV head): its group's query heads against its tokens. `d` is a constant
 * in the specialised calls below, so the per-row loops unroll and stay in registers. */
static inline __attribute__((always_inline)) void attend_one(
    const uint16_t *q, const uint16_t *kc, const uint16_t *vc, const int64_t *sl, int64_t len,
    int64_t row, int64_t kh, int64_t group, const int64_t d, float scale, __m512i order,
    uint16_t *out) {
    float *scores = scratch(group * (len + 16));
    /* pass 1: scores = q . k * scale; 16 tokens at a time share one tree reduction */
    for (int64_t g = 0; g < group; g++) {
        __m512bh qv[MAX_DIM / 32];
        for (int64_t c = 0; c < d / 32; c++)
            qv[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + (kh * group + g) * d + c * 32));
        float *sc = scores + g * len;
        int64_t t = 0;
        for (; t + 16 <= len; t += 16) {
            __m512 acc[16];
            for (int j = 0; j < 16; j++) {
                const uint16_t *kr = kc + sl[t + j] * row + kh * d;
                __m512 a = _mm512_setzero_ps();
                for (int64_t c = 0; c < d / 32; c++)
                    a = _mm512_dpbf16_ps(a, qv[c],
                                         (__m512bh)_mm512_loadu_si512((const void *)(kr + c * 32)));
                acc[j] = a;
            }
            _mm512_storeu_ps(sc + t, _mm512_mul_ps(reduce16(acc, order), _mm512_set1_ps(scale)));
        }
        for (; t < len; t++) {
            const uint16_t *kr = kc + sl[t] * row + kh * d;
            __m512 a = _mm512_setzero_ps();
            for (int64_t c = 0; c < d / 32; c++)
                a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512((const void *)(kr + c * 32)));
            sc[t] = _mm512_reduce_add_ps(a) * scale;
        }
        /* softmax, in place */
        float mx = -INFINITY;
        for (int64_t i = 0; i < len; i++) mx = sc[i] > mx ? sc[i] : mx;
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 vsum = _mm512_setzero_ps();
        for (t = 0; t < len; t += 16) {
            const __mmask16 m = len - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - t)) - 1);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), vmx));
            _mm512_mask_storeu_ps(sc + t, m, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        }
        /* pass 2: out = sum_t p_t v_t / sum_t p_t (V rows are in cache after the first head) */
        __m512 acc[MAX_DIM / 16];
        for (int64_t c = 0; c < d / 16; c++) acc[c] = _mm512_setzero_ps();
        for (t = 0; t < len; t++) {
            const uint16_t *vr = vc + sl[t] * row + kh * d;
            const __m512 p = _mm512_set1_ps(sc[t]);
            for (int64_t c = 0; c < d / 16; c++)
                acc[c] = _mm512_fmadd_ps(p, load_bf16(vr + c * 16), acc[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        uint16_t *o = out + (kh * group + g) * d;
        for (int64_t c = 0; c < d / 16; c++) store_bf16(o + c * 16, _mm512_mul_ps(acc[c], inv));
    }
}

/* q:      [b, h, d] rows of stride ldq (head stride d)      -- this step's queries
 * k_new:  [b, kvh, d] rows of stride ldk; v_new likewise ldv -- this step's keys/values
 * kc, vc: the layer's pool as flat slots [slots, kvh, d]
 * slots:  [b, max_len] flat slot of every token of each sequence (new token included)
 * out_slots: [b] where this step's K/V rows go (the batch's out_slots; = slots[len - 1])
 * lens:   [b] tokens per sequence (new token included)
 * out:    [b, h * d]
 * d % 32 == 0, d <= MAX_DIM (the caller checks). */
void pdcore_bf16_decode_attention(const uint16_t *q, int64_t ldq, const uint16_t *k_new,
                                  int64_t ldk, const uint16_t *v_new, int64_t ldv, uint16_t *kc,
                                  uint16_t *vc, const int64_t *slots, int64_t max_len,
                                  const int64_t *out_slots,
                                  const int64_t *lens, int64_t b, int64_t h, int64_t kvh,
                                  int64_t d, float scale, uint16_t *out, int threads) {
    const int64_t group = h / kvh;
    const int64_t row = kvh * d; /* elements per slot */
    const __m512i order = reduce16_order();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < b * kvh; item++) {
        const int64_t s = item / kvh, kh = item % kvh;
        const int64_t len = lens[s];
        const int64_t *sl = slots + s * max_len;
        if (len <= 0) { /* no tokens: nothing to attend to (the engine never sends this) */
            memset(out + s * h * d + kh * group * d, 0, group * d * sizeof(uint16_t));
            continue;
        }
        /* this step's K/V row goes into its slot (the sequence's last token) first */
        const int64_t last = out_slots[s];
        memcpy(kc + last * row + kh * d, k_new + s * ldk + kh * d, d * sizeof(uint16_t));
        memcpy(vc + last * row + kh * d, v_new + s * ldv + kh * d, d * sizeof(uint16_t));
        const uint16_t *qs = q + s * ldq;
        uint16_t *os = out + s * h * d;
        if (d == 64)
            attend_one(qs, kc, vc, sl, len, row, kh, group, 64, scale, order, os);
        else if (d == 128)
            attend_one(qs, kc, vc, sl, len, row, kh, group, 128, scale, order, os);
        else
            attend_one(qs, kc, vc, sl, len, row, kh, group, d, scale, order, os);
    }
}
