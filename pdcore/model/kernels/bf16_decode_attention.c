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

/* q . k for one key row: VDPBF16PS on bf16 pairs, or fp32 FMAs for an fp32 model. */
static inline __m512 dot_row(const void *qv, const void *kr, const int64_t d, int f32) {
    __m512 a = _mm512_setzero_ps();
    if (f32) {
        for (int64_t c = 0; c < d / 16; c++)
            a = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)qv + c * 16),
                                _mm512_loadu_ps((const float *)kr + c * 16), a);
    } else {
        for (int64_t c = 0; c < d / 32; c++)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const uint16_t *)qv + c * 32),
                                 (__m512bh)_mm512_loadu_si512((const uint16_t *)kr + c * 32));
    }
    return a;
}

/* One (sequence, KV head): its group's query heads against its tokens. `d` and `f32` are
 * constants in the specialised calls below, so the per-row loops unroll into registers. */
static inline __attribute__((always_inline)) void attend_one(
    const char *q, const char *kc, const char *vc, const int64_t *sl, int64_t len, int64_t row,
    int64_t kh, int64_t group, const int64_t d, float scale, __m512i order, char *out, int f32) {
    const int64_t es = f32 ? 4 : 2, rowb = row * es;
    float *scores = scratch(group * (len + 16));
    for (int64_t g = 0; g < group; g++) {
        const char *qv = q + (kh * group + g) * d * es;
        float *sc = scores + g * len;
        /* pass 1: scores = q . k * scale; 16 tokens at a time share one tree reduction */
        int64_t t = 0;
        for (; t + 16 <= len; t += 16) {
            __m512 acc[16];
            for (int j = 0; j < 16; j++) acc[j] = dot_row(qv, kc + sl[t + j] * rowb + kh * d * es, d, f32);
            _mm512_storeu_ps(sc + t, _mm512_mul_ps(reduce16(acc, order), _mm512_set1_ps(scale)));
        }
        for (; t < len; t++)
            sc[t] = _mm512_reduce_add_ps(dot_row(qv, kc + sl[t] * rowb + kh * d * es, d, f32)) * scale;
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
            const char *vr = vc + sl[t] * rowb + kh * d * es;
            const __m512 p = _mm512_set1_ps(sc[t]);
            for (int64_t c = 0; c < d / 16; c++) acc[c] = _mm512_fmadd_ps(p, load_w(vr, c * 16, f32), acc[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        char *o = out + (kh * group + g) * d * es;
        for (int64_t c = 0; c < d / 16; c++) store_y(o, c * 16, _mm512_mul_ps(acc[c], inv), f32);
    }
}

static void decode_attention(const char *q, int64_t ldq, const char *k_new, int64_t ldk,
                             const char *v_new, int64_t ldv, char *kc, char *vc,
                             const int64_t *slots, int64_t max_len, const int64_t *out_slots,
                             const int64_t *lens, int64_t b, int64_t h, int64_t kvh, int64_t d,
                             float scale, char *out, int threads, int f32) {
    const int64_t group = h / kvh, es = f32 ? 4 : 2;
    const int64_t row = kvh * d; /* elements per slot */
    const __m512i order = reduce16_order();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < b * kvh; item++) {
        const int64_t s = item / kvh, kh = item % kvh;
        const int64_t len = lens[s];
        const int64_t *sl = slots + s * max_len;
        char *os = out + s * h * d * es;
        if (len <= 0) { /* no tokens: nothing to attend to (the engine never sends this) */
            memset(os + kh * group * d * es, 0, group * d * es);
            continue;
        }
        /* this step's K/V row goes into its slot first */
        const int64_t last = out_slots[s];
        memcpy(kc + (last * row + kh * d) * es, k_new + (s * ldk + kh * d) * es, d * es);
        memcpy(vc + (last * row + kh * d) * es, v_new + (s * ldv + kh * d) * es, d * es);
        const char *qs = q + s * ldq * es;
        if (f32) {
            if (d == 64)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 64, scale, order, os, 1);
            else if (d == 128)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 128, scale, order, os, 1);
            else
                attend_one(qs, kc, vc, sl, len, row, kh, group, d, scale, order, os, 1);
        } else {
            if (d == 64)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 64, scale, order, os, 0);
            else if (d == 128)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 128, scale, order, os, 0);
            else
                attend_one(qs, kc, vc, sl, len, row, kh, group, d, scale, order, os, 0);
        }
    }
}

/* q:      [b, h, d] rows of stride ldq (head stride d)      -- this step's queries
 * k_new:  [b, kvh, d] rows of stride ldk; v_new likewise ldv -- this step's keys/values
 * kc, vc: the layer's pool as flat slots [slots, kvh, d]
 * slots:  [b, max_len] flat slot of every token of each sequence (new token included)
 * out_slots: [b] where this step's K/V rows go (the batch's out_slots; = slots[len - 1])
 * lens:   [b] tokens per sequence (new token included)
 * out:    [b, h * d]
 * Strides are in elements. d % 32 == 0, d <= MAX_DIM (the caller checks). */
void pdcore_bf16_decode_attention(const uint16_t *q, int64_t ldq, const uint16_t *k_new,
                                  int64_t ldk, const uint16_t *v_new, int64_t ldv, uint16_t *kc,
                                  uint16_t *vc, const int64_t *slots, int64_t max_len,
                                  const int64_t *out_slots, const int64_t *lens, int64_t b,
                                  int64_t h, int64_t kvh, int64_t d, float scale, uint16_t *out,
                                  int threads) {
    decode_attention((const char *)q, ldq, (const char *)k_new, ldk, (const char *)v_new, ldv,
                     (char *)kc, (char *)vc, slots, max_len, out_slots, lens, b, h, kvh, d, scale,
                     (char *)out, threads, 0);
}

/* The same for an fp32 model (every tensor fp32). */
void pdcore_f32_decode_attention(const float *q, int64_t ldq, const float *k_new, int64_t ldk,
                                 const float *v_new, int64_t ldv, float *kc, float *vc,
                                 const int64_t *slots, int64_t max_len, const int64_t *out_slots,
                                 const int64_t *lens, int64_t b, int64_t h, int64_t kvh,
                                 int64_t d, float scale, float *out, int threads) {
    decode_attention((const char *)q, ldq, (const char *)k_new, ldk, (const char *)v_new, ldv,
                     (char *)kc, (char *)vc, slots, max_len, out_slots, lens, b, h, kvh, d, scale,
                     (char *)out, threads, 1);
}
