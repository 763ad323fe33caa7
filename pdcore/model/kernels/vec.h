/* Portable SIMD helpers for pdcore's CPU kernels: one source, built once per ISA.
 *
 * Every kernel is written against `vf` (VW fp32 lanes) with GCC's vector extensions; the
 * compiler flags of each build pick the width and the instructions:
 *   -march=x86-64-v3 (AVX2+FMA)          VW = 8   16 ymm registers
 *   -march=x86-64-v4 (AVX512F/BW/VL/DQ)  VW = 16  32 zmm registers
 *   the same + -mavx512bf16              VW = 16  bf16 stores with VCVTNEPS2BF16
 *   -march=armv8-a (NEON/ASIMD)          VW = 4   32 q registers
 * native_cpu.py compiles the variant the running CPU supports (or the one PDCORE_CPU_ISA
 * names) and loads it; the C has no per-ISA intrinsics except the one bf16 store below.
 *
 * bf16 is 16-bit storage only: loads widen to fp32 in registers (exact, a 16-bit shift),
 * arithmetic is fp32, stores round to nearest even as torch does (NaN -> 0x7FC0).
 */
#ifndef PDCORE_VEC_H
#define PDCORE_VEC_H
#include <stdint.h>
#include <string.h>

#if defined(PDCORE_VW) /* tests only: another width's generic code on this CPU */
#define VW PDCORE_VW
#define VREGS 16
#elif defined(__AVX512F__)
#define VW 16
#define VREGS 32
#elif defined(__AVX2__)
#define VW 8
#define VREGS 16
#elif defined(__ARM_NEON) || defined(__aarch64__)
#define VW 4
#define VREGS 32
#else
#define VW 4 /* SSE2 or anything else: 128-bit vectors, 16 registers */
#define VREGS 16
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

#define INLINE static inline __attribute__((always_inline))

/* A broadcast: an initialiser with VW copies ((vf){0} + s would be a real add: -0 + 0). */
#if VW == 4
#define SPLAT_INIT(s) {s, s, s, s}
#elif VW == 8
#define SPLAT_INIT(s) {s, s, s, s, s, s, s, s}
#else
#define SPLAT_INIT(s) {s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}
#endif
INLINE vf splat(float s) { return (vf)SPLAT_INIT(s); }
INLINE vf vzero(void) { return (vf){0}; }

INLINE vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
INLINE void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* The widening is the one place with per-ISA code: GCC 12 lowers the generic
 * __builtin_convertvector(u16 -> u32) to four instructions on x86 (and goes through
 * general registers on ARM) instead of one or two. */
INLINE vf load_bf16(const uint16_t *p) {
#if defined(__AVX512F__) && VW == 16
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__) && VW == 8
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#elif defined(__aarch64__) && VW == 4
    return (vf)vshll_n_u16(vld1_u16(p), 16);
#else
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

/* Quantized weights (quant_gemm.c): VW bytes widened to VW int32 lanes (unsigned: 4-bit
 * pairs; signed: int8), and VW IEEE fp16 scales widened to fp32 (exact). */
typedef uint8_t vb __attribute__((vector_size(VW)));
typedef int8_t vsb __attribute__((vector_size(VW)));
INLINE vi load_u8(const uint8_t *p) {
#if defined(__AVX512F__) && VW == 16
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__) && VW == 8
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vi);
#endif
}
INLINE vi load_i8(const int8_t *p) {
#if defined(__AVX512F__) && VW == 16
    return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__) && VW == 8
    return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vsb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vi);
#endif
}
INLINE vf load_f16(const uint16_t *p) {
#if defined(__AVX512F__) && VW == 16
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__AVX2__) && VW == 8 /* x86-64-v3 includes F16C */
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#elif defined(__aarch64__) && VW == 4
    return (vf)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
#else /* exponent rebias by a multiply (subnormals come out right); inf/NaN kept */
    vh h;
    memcpy(&h, p, sizeof h);
    const vu u = __builtin_convertvector(h, vu), em = u & 0x7FFFu;
    const vu f = (vu)((vf)(em << 13) * splat(0x1.0p112f));
    const vu special = (vu)(em >= 0x7C00u);
    return (vf)(((f & ~special) | (((em << 13) | 0x7F800000u) & special)) | ((u & 0x8000u) << 16));
#endif
}

/* fp32 -> bf16 bits, round to nearest even; NaN -> quiet NaN (torch's rule). */
INLINE vh to_bf16_bits(vf x) {
#if defined(__AVX512BF16__) && VW == 16
    return (vh)_mm512_cvtneps_pbh((__m512)x);
#else
    const vu u = (vu)x;
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vu nan = (vu)(x != x);
    r = (r & ~nan) | (0x7FC0u & nan);
    return __builtin_convertvector(r, vh);
#endif
}

INLINE void store_bf16(uint16_t *p, vf x) {
    vh h = to_bf16_bits(x);
    memcpy(p, &h, sizeof h);
}

/* fp32 -> nearest bf16 -> fp32, without leaving registers. */
INLINE vf round_bf16(vf x) {
    const vu u = (vu)x;
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    const vu nan = (vu)(x != x);
    return (vf)((r & ~nan) | (0x7FC00000u & nan));
}

/* bf16 or fp32 element access; `f32` is a compile-time constant at every call site. */
INLINE vf load_w(const void *p, int64_t i, int f32) {
    return f32 ? load_f32((const float *)p + i) : load_bf16((const uint16_t *)p + i);
}
INLINE void store_y(void *p, int64_t i, vf v, int f32) {
    if (f32)
        store_f32((float *)p + i, v);
    else
        store_bf16((uint16_t *)p + i, v);
}
INLINE vf round_to(vf v, int f32) { return f32 ? v : round_bf16(v); }

INLINE vf vmax(vf a, vf b) { /* NaN in a stays NaN */
    const vi lt = a < b;
    return (vf)(((vi)b & lt) | ((vi)a & ~lt));
}

INLINE vf vmin(vf a, vf b) { /* NaN in a stays NaN */
    const vi gt = a > b;
    return (vf)(((vi)b & gt) | ((vi)a & ~gt));
}

INLINE float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}
INLINE float hmax(vf v) {
    float s = v[0];
    for (int i = 1; i < VW; i++) s = v[i] > s ? v[i] : s;
    return s;
}

/* exp(x), x clamped to [-87, 88] (2^n stays a normal float): 2^n (built in the exponent
 * bits) times a degree-6 polynomial of e^f, f in [-ln2/2, ln2/2]; relative error below
 * 1e-5, far below bf16's 4e-3. */
INLINE vf exp_vf(vf x) {
    x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
    const vf t = x * splat(1.44269504088896341f);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (t + magic) - magic;
    const vf f = (t - n) * splat(0.69314718055994531f);
    vf p = splat(1.0f / 720.0f);
    p = p * f + splat(1.0f / 120.0f);
    p = p * f + splat(1.0f / 24.0f);
    p = p * f + splat(1.0f / 6.0f);
    p = p * f + splat(0.5f);
    p = p * f + splat(1.0f);
    p = p * f + splat(1.0f);
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* VW horizontal sums at once: log2(VW) levels of "add the two halves of a pair of vectors,
 * side by side" (shuffles + adds). Lane j of the result holds the sum of vector
 * reduce_order()[j]. */
#define LO_IDX(i, s) ((i) % (2 * (s)) < (s) ? ((i) / (2 * (s))) * 2 * (s) + (i) % (2 * (s)) \
                                            : VW + ((i) / (2 * (s))) * 2 * (s) + (i) % (2 * (s)) - (s))
#define HI_IDX(i, s) (LO_IDX(i, s) + (s))
#if VW == 4
#define IDX_LIST(M, s) M(0, s), M(1, s), M(2, s), M(3, s)
#elif VW == 8
#define IDX_LIST(M, s) M(0, s), M(1, s), M(2, s), M(3, s), M(4, s), M(5, s), M(6, s), M(7, s)
#else
#define IDX_LIST(M, s)                                                                      \
    M(0, s), M(1, s), M(2, s), M(3, s), M(4, s), M(5, s), M(6, s), M(7, s), M(8, s), M(9, s), \
        M(10, s), M(11, s), M(12, s), M(13, s), M(14, s), M(15, s)
#endif
#define PAIR_LEVEL(S)                                                                        \
    do {                                                                                     \
        for (int i = 0; i < n / 2; i++)                                                      \
            v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], ((vi){IDX_LIST(LO_IDX, S)})) +  \
                   __builtin_shuffle(v[2 * i], v[2 * i + 1], ((vi){IDX_LIST(HI_IDX, S)})); \
        n /= 2;                                                                              \
    } while (0)
INLINE vf reduce_vw_raw(vf *v) { /* overwrites v */
    int n = VW;
    PAIR_LEVEL(VW / 2);
    PAIR_LEVEL(VW / 4);
#if VW >= 8
    PAIR_LEVEL(VW / 8);
#endif
#if VW >= 16
    PAIR_LEVEL(VW / 16);
#endif
    return v[0];
}
/* ---- 8-lane int8 dot products (quant_gemm.c's int8-activation path) ----
 * Fixed 256-bit types whatever VW is: one 32-byte unit of packed weights holds 8 rows x 4
 * consecutive k, so lane r of a 4-byte dot product is row r's partial sum (no horizontal
 * reduction). x86 (v3 and v4) uses AVX2's VPMADDUBSW / VPMADDWD; elsewhere GCC lowers the
 * generic code below (two 128-bit halves on NEON). */
typedef int8_t i8x32 __attribute__((vector_size(32)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

INLINE u8x32 load_u8x32(const uint8_t *p) {
    u8x32 v;
    memcpy(&v, p, sizeof v);
    return v;
}
/* 4 bytes (an int8 quad of x) repeated in every lane */
INLINE i8x32 bcast_quad(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return (i8x32)(i32x8){v, v, v, v, v, v, v, v};
}
#if defined(__AVX2__) && !defined(PDCORE_GENERIC_DOT) /* tests: the generic code on x86 */
#define DOT_AVX2 1
#else
#define DOT_AVX2 0
#endif
/* bytes 0, 2, ..., 30 and 1, 3, ..., 31 of a 32-byte vector (the generic dot products) */
#define EVEN_BYTES(v) \
    __builtin_shufflevector(v, v, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define ODD_BYTES(v) \
    __builtin_shufflevector(v, v, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
/* lane j: w[2j] x[2j] + w[2j+1] x[2j+1] in int16, for w and x of any byte signedness */
#define DOT2_GENERIC(w, x)                                                          \
    (__builtin_convertvector(EVEN_BYTES(w), i16x16) *                               \
         __builtin_convertvector(EVEN_BYTES(x), i16x16) +                           \
     __builtin_convertvector(ODD_BYTES(w), i16x16) * __builtin_convertvector(ODD_BYTES(x), i16x16))
/* lane j: w[2j] * x[2j] + w[2j+1] * x[2j+1], w unsigned, x signed (|sum| < 2^15 here) */
INLINE i16x16 dot2_u8s8(u8x32 w, i8x32 x) {
#if DOT_AVX2
    return (i16x16)_mm256_maddubs_epi16((__m256i)w, (__m256i)x);
#else
    return DOT2_GENERIC(w, x);
#endif
}
/* the same with signed w (|w| <= 128: |sum| <= 2 * 128 * 127 < 2^15) */
INLINE i16x16 dot2_s8s8(i8x32 w, i8x32 x) {
#if DOT_AVX2
    return (i16x16)_mm256_maddubs_epi16(_mm256_sign_epi8((__m256i)w, (__m256i)w),
                                        _mm256_sign_epi8((__m256i)x, (__m256i)w));
#else
    return DOT2_GENERIC(w, x);
#endif
}
/* AVX512-VNNI (every AVX512-BF16 CPU has it; the avx512bf16 variant is built with it):
 * VPDPBUSD adds a 4-byte u8 x s8 dot product to each int32 lane in one instruction --
 * what dot2 + pairs_i32 + an add take three for (measured below, docs/benchmarks.md). */
#if DOT_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_VNNI 1
#else
#define DOT_VNNI 0
#endif
/* lane j: v[2j] + v[2j+1], widened to int32 */
INLINE i32x8 pairs_i32(i16x16 v) {
#if DOT_AVX2
    return (i32x8)_mm256_madd_epi16((__m256i)v, _mm256_set1_epi16(1));
#else
    typedef int16_t i16x8 __attribute__((vector_size(16)));
    const i16x8 e = __builtin_shufflevector(v, v, 0, 2, 4, 6, 8, 10, 12, 14);
    const i16x8 o = __builtin_shufflevector(v, v, 1, 3, 5, 7, 9, 11, 13, 15);
    return __builtin_convertvector(e, i32x8) + __builtin_convertvector(o, i32x8);
#endif
}
/* acc + lane j: the 4-byte dot product w[4j..4j+3] . x[4j..4j+3], w unsigned, x signed */
INLINE i32x8 dot4_u8s8(i32x8 acc, u8x32 w, i8x32 x) {
#if DOT_VNNI
    return (i32x8)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)w, (__m256i)x);
#else
    return acc + pairs_i32(dot2_u8s8(w, x));
#endif
}
/* The same with signed w (Q8 weights, as stored): acc + lane j: (w + Q8_BIAS) . x over
 * 4 bytes. VPDPBUSD takes unsigned w, so VNNI builds feed w + 128 (one XOR, shared by every
 * row that reuses w) and the caller takes 128 x sum(x) off once per block -- two VPSIGNBs
 * per product cost 1.37x at 32 rows; elsewhere w goes in signed (Q8_BIAS 0: VPMADDUBSW
 * would saturate on w + 128). */
#define Q8_BIAS (DOT_VNNI ? 128 : 0)
INLINE i32x8 dot4_q8(i32x8 acc, u8x32 w, i8x32 x) {
#if DOT_VNNI
    return dot4_u8s8(acc, w ^ 0x80, x);
#else
    return acc + pairs_i32(dot2_s8s8((i8x32)w, x));
#endif
}
/* 8 IEEE fp16 -> fp32 (exact) */
INLINE f32x8 load_f16x8(const uint16_t *p) {
#if DOT_AVX2 /* x86-64-v3 and v4 include F16C */
    return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#elif defined(__aarch64__)
    const float32x4_t lo = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
    const float32x4_t hi = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4)));
    f32x8 r;
    memcpy(&r, &lo, 16);
    memcpy((char *)&r + 16, &hi, 16);
    return r;
#else /* exponent rebias by a multiply (subnormals come out right); inf/NaN kept */
    u16x8 h;
    memcpy(&h, p, sizeof h);
    const u32x8 u = __builtin_convertvector(h, u32x8), em = u & 0x7FFFu;
    const u32x8 f = (u32x8)((f32x8)(em << 13) * 0x1.0p112f);
    const u32x8 special = (u32x8)(em >= 0x7C00u);
    return (f32x8)(((f & ~special) | (((em << 13) | 0x7F800000u) & special)) |
                   ((u & 0x8000u) << 16));
#endif
}

#endif
