/* Helpers shared by the bf16 CPU kernels (AVX512F + AVX512-BF16). */
#ifndef PDCORE_BF16_COMMON_H
#define PDCORE_BF16_COMMON_H
#include <immintrin.h>
#include <stdint.h>

static inline __m512 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline __m512 round_bf16(__m512 x) { /* fp32 -> nearest bf16 -> fp32 */
    __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline void store_bf16(uint16_t *p, __m512 x) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}

/* exp(x) for x <= 88: 2^(x log2 e) split into 2^n (vscalefps) times a degree-6 polynomial
 * of 2^f, f in [-0.5, 0.5]; relative error below 1e-5, far below bf16's 4e-3. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* NaN stays NaN (2nd operand wins) */
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* bf16 or fp32 element access; `f32` is a compile-time constant at every call site, so
 * each kernel is specialised per element type (an fp32 model gets the same kernels). */
static inline __m512 load_w(const void *p, int64_t i, int f32) {
    return f32 ? _mm512_loadu_ps((const float *)p + i) : load_bf16((const uint16_t *)p + i);
}

static inline void store_y(void *p, int64_t i, __m512 v, int f32) {
    if (f32)
        _mm512_storeu_ps((float *)p + i, v);
    else
        store_bf16((uint16_t *)p + i, v);
}
#endif
