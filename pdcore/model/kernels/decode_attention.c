/* Paged decode attention for bf16 or fp32 KV caches.
 *
 * Why: the generic path gathers every sequence's K and V out of the page pool into new
 * tensors (index_select), then runs SDPA over a padded batch with a mask -- at batch 32
 * that is two copies of the whole live KV cache per layer per step. Here each (sequence,
 * KV head) reads its K/V rows straight from the pool through the slot table, once, for
 * all the query heads of its GQA group, and the step's new K/V rows are written into the
 * pool by the same pass. Softmax is exact (two passes over the scores, in fp32); bf16 rows
 * are widened to fp32 in registers.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define MAX_DIM 256
#define CHUNK (8 * VW) /* output columns per sweep over V: 8 accumulators */

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

/* q . k for one key row (q already fp32). */
INLINE vf dot_row(const float *qf, const char *kr, const int64_t d, int f32) {
    vf a = vzero();
    for (int64_t c = 0; c < d; c += VW) a += load_f32(qf + c) * load_w(kr, c, f32);
    return a;
}

/* One (sequence, KV head): its group's query heads against its tokens. `d` and `f32` are
 * constants in the specialised calls below, so the per-row loops unroll into registers. */
INLINE void attend_one(const char *q, const char *kc, const char *vc, const int64_t *sl,
                       int64_t len, int64_t row, int64_t kh, int64_t group, const int64_t d,
                       float scale, vi unorder, char *out, int f32) {
    const int64_t es = f32 ? 4 : 2, rowb = row * es, stride = len + VW;
    float *scores = scratch(group * stride);
    float qf[MAX_DIM];
    for (int64_t g = 0; g < group; g++) {
        const char *qv = q + (kh * group + g) * d * es;
        for (int64_t c = 0; c < d; c += VW) store_f32(qf + c, load_w(qv, c, f32));
        float *sc = scores + g * stride;
        /* pass 1: scores = q . k * scale; VW tokens at a time share one tree reduction */
        int64_t t = 0;
        for (; t + VW <= len; t += VW) {
            vf acc[VW];
#pragma GCC unroll 16
            for (int j = 0; j < VW; j++) acc[j] = dot_row(qf, kc + sl[t + j] * rowb + kh * d * es, d, f32);
            /* lanes back in token order: one permute, one store */
            store_f32(sc + t, __builtin_shuffle(reduce_vw_raw(acc) * splat(scale), unorder));
        }
        for (; t < len; t++) sc[t] = hsum(dot_row(qf, kc + sl[t] * rowb + kh * d * es, d, f32)) * scale;
        /* softmax numerators, in place */
        vf vmx = splat(-INFINITY);
        int64_t i = 0;
        for (; i + VW <= len; i += VW) vmx = vmax(load_f32(sc + i), vmx);
        float mx = hmax(vmx);
        for (; i < len; i++) mx = sc[i] > mx ? sc[i] : mx;
        vf vsum = vzero();
        for (t = 0; t + VW <= len; t += VW) {
            const vf e = exp_vf(load_f32(sc + t) - splat(mx));
            store_f32(sc + t, e);
            vsum += e;
        }
        float sum = hsum(vsum);
        for (; t < len; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        /* pass 2: out = sum_t p_t v_t / sum_t p_t, CHUNK columns per sweep over the rows */
        const vf inv = splat(1.0f / sum);
        char *o = out + (kh * group + g) * d * es;
        for (int64_t c0 = 0; c0 < d; c0 += CHUNK) {
            const int64_t cols = d - c0 < CHUNK ? d - c0 : CHUNK;
            vf acc[8];
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) acc[c] = vzero();
            for (t = 0; t < len; t++) {
                const char *vr = vc + sl[t] * rowb + (kh * d + c0) * es;
                const vf p = splat(sc[t]);
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++)
                    if (c * VW < cols) acc[c] += p * load_w(vr, c * VW, f32);
            }
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++)
                if (c * VW < cols) store_y(o, c0 + c * VW, acc[c] * inv, f32);
        }
    }
}

static void decode_attention(const char *q, int64_t ldq, const char *k_new, int64_t ldk,
                             const char *v_new, int64_t ldv, char *kc, char *vc,
                             const int64_t *slots, int64_t max_len, const int64_t *out_slots,
                             const int64_t *lens, int64_t b, int64_t h, int64_t kvh, int64_t d,
                             float scale, char *out, int threads, int f32) {
    const int64_t group = h / kvh, es = f32 ? 4 : 2;
    const int64_t row = kvh * d; /* elements per slot */
    /* the lane order of reduce_vw_raw (feed vector i with i in every lane) and its
     * inverse: lane j of unorder picks the reduced lane holding token j */
    vi unorder;
    {
        vf probe[VW];
        for (int i = 0; i < VW; i++) probe[i] = splat((float)i);
        const vf r = reduce_vw_raw(probe);
        for (int j = 0; j < VW; j++) unorder[(int)(r[j] / VW + 0.5f)] = j;
    }
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
                attend_one(qs, kc, vc, sl, len, row, kh, group, 64, scale, unorder, os, 1);
            else if (d == 128)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 128, scale, unorder, os, 1);
            else
                attend_one(qs, kc, vc, sl, len, row, kh, group, d, scale, unorder, os, 1);
        } else {
            if (d == 64)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 64, scale, unorder, os, 0);
            else if (d == 128)
                attend_one(qs, kc, vc, sl, len, row, kh, group, 128, scale, unorder, os, 0);
            else
                attend_one(qs, kc, vc, sl, len, row, kh, group, d, scale, unorder, os, 0);
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
