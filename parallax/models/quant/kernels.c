/* Matmul on packed GGUF blocks: y[m, n] = x[m, k] . W[n, k]^T, W kept in ggml's block layout
 * (the legacy 32-value types, the K-quants, and MXFP4: gpt-oss' experts).
 *
 * Activations stay fp32. Every 32-value group of a weight row is decoded to fp32 in registers
 * (block scale and min folded in) and meets up to MAXR activation rows in fused multiply-adds,
 * so the result equals "dequantize, then an fp32 matmul" but for summation order. OpenMP
 * splits the output rows.
 *
 * pq_matmul_q8 (further down) is llama.cpp's way instead: activations rounded to int8 blocks,
 * integer dot products. Decoding to fp32 costs more instructions than the weight bytes take to
 * arrive on a small core, so the int8 path streams weights 1.5-2.5x faster on AVX2; it rounds
 * the activations, so the caller turns it on per model (loading.py: set_activation_int8).
 *
 * pq_gemm (AVX2 builds) is the path for many activation rows (batched decode, prefill): a tile
 * of weight rows decoded to fp32 once into an L1-sized buffer, then a register-blocked fp32
 * microkernel, which beats decoding the weight again for every MAXR rows from
 * pq_gemm_min_rows on. pq_dequantize writes the decoded values to memory: builds without
 * pq_gemm hand a tile of them to BLAS instead.
 *
 * Plain C on purpose: no torch headers, built by gcc at first use (see native.py). The x86
 * decoders are shared by the AVX2 and AVX-512 builds, which differ in vector width (8 or 16
 * fp32 lanes); any other CPU gets the portable section, vectorized by the compiler alone.
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QK 32
#define QKK 256
#define MAXR 4
#define ROW_CHUNK 16
#define PREFETCH_ROWS 4  /* weight rows fetched ahead of the one being multiplied */
#define INLINE static inline __attribute__((always_inline))

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_MXFP4 = 39 };

static long long call_count = 0;

/* ---- scalar helpers ---------------------------------------------------------------------- */

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    float f;
    if (exp == 0) {
        f = ldexpf((float)mant, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float load_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return fp16_to_fp32(h);
}

/* MXFP4's E8M0 exponent e as 2 ** (e - 128), half the block scale (ggml's
 * ggml_e8m0_to_fp32_half): the E2M1 table below holds doubled values, all integers, so every
 * decoded weight is an exact small integer times a power of two, as in the fp32 reference. */
static inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#define MXFP4_DOUBLED 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12

/* Q4_K / Q5_K header: d * (8 six-bit scales) and dmin * (8 six-bit mins) */
INLINE void k_header(const uint8_t *b, float *scale, float *min) {
    const float d = load_f16(b), dmin = load_f16(b + 2);
    const uint8_t *q = b + 4;
    for (int j = 0; j < 4; j++) {
        scale[j] = d * (float)(q[j] & 63);
        min[j] = dmin * (float)(q[j + 4] & 63);
        scale[j + 4] = d * (float)((q[j + 8] & 0xF) | ((q[j] >> 6) << 4));
        min[j + 4] = dmin * (float)((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
    }
}

/* ---- group decoders: 32 weights of one block (or K-quant sub-block) -> fp32 ---------------- */

#if defined(__AVX2__)

INLINE __m128i load16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
INLINE __m128i nib_lo(__m128i q) { return _mm_and_si128(q, _mm_set1_epi8(0x0F)); }
INLINE __m128i nib_hi(__m128i q) { return _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F)); }

#if defined(__AVX512F__)

/* 16 values per register: widening a byte vector costs one shuffle per 16 values, not per 8,
 * which is what bounds the decode (not the memory) on a core with AVX-512. */
typedef struct { __m512 v[2]; } grp_t; /* values 16s .. 16s + 15 in v[s] */
typedef struct { __m512 v[2]; } acc_t;

/* 32 unsigned values (lo: 0-15, hi: 16-31) -> q * d + mn */
INLINE void emit_u8(__m128i lo, __m128i hi, float d, float mn, grp_t *w) {
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(mn);
    w->v[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vd, vm);
    w->v[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vd, vm);
}

/* 32 signed values -> q * d0 (values 0-15), q * d1 (16-31) */
INLINE void emit_i8(__m128i lo, __m128i hi, float d0, float d1, grp_t *w) {
    w->v[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), _mm512_set1_ps(d0));
    w->v[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), _mm512_set1_ps(d1));
}

INLINE void fma_group(const int nr, const grp_t *w, const float *x, int64_t ldx, acc_t *acc) {
    for (int r = 0; r < nr; r++)
        for (int s = 0; s < 2; s++)
            acc[r].v[s] = _mm512_fmadd_ps(w->v[s], _mm512_loadu_ps(x + r * ldx + 16 * s),
                                          acc[r].v[s]);
}

INLINE void acc_zero(const int nr, acc_t *acc) {
    for (int r = 0; r < nr; r++) acc[r].v[0] = acc[r].v[1] = _mm512_setzero_ps();
}

INLINE float acc_sum(const acc_t *acc) {
    return _mm512_reduce_add_ps(_mm512_add_ps(acc->v[0], acc->v[1]));
}

INLINE void grp_store(const grp_t *w, float *out) {
    _mm512_storeu_ps(out, w->v[0]);
    _mm512_storeu_ps(out + 16, w->v[1]);
}

#else

typedef struct { __m256 v[4]; } grp_t; /* values 8s .. 8s + 7 in v[s] */
typedef struct { __m256 v[4]; } acc_t; /* per activation row: partial sums, reduced at the end */

/* 32 unsigned values (lo: 0-15, hi: 16-31) -> q * d + mn */
INLINE void emit_u8(__m128i lo, __m128i hi, float d, float mn, grp_t *w) {
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(mn);
    w->v[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
    w->v[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
    w->v[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
    w->v[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
}

/* 32 signed values -> q * d0 (values 0-15), q * d1 (16-31) */
INLINE void emit_i8(__m128i lo, __m128i hi, float d0, float d1, grp_t *w) {
    const __m256 v0 = _mm256_set1_ps(d0), v1 = _mm256_set1_ps(d1);
    w->v[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), v0);
    w->v[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), v0);
    w->v[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), v1);
    w->v[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), v1);
}

/* acc[r] += w . x[r] for nr activation rows, row r at x + r * ldx. With one or two rows, all
 * four partial sums are kept so the FMA latency chain is not the bound; with more, two. */
INLINE void fma_group(const int nr, const grp_t *w, const float *x, int64_t ldx, acc_t *acc) {
    const int na = nr <= 2 ? 4 : 2;
    for (int r = 0; r < nr; r++)
        for (int s = 0; s < 4; s++)
            acc[r].v[s % na] = _mm256_fmadd_ps(w->v[s], _mm256_loadu_ps(x + r * ldx + 8 * s),
                                               acc[r].v[s % na]);
}

INLINE void acc_zero(const int nr, acc_t *acc) {
    for (int r = 0; r < nr; r++)
        for (int s = 0; s < 4; s++) acc[r].v[s] = _mm256_setzero_ps();
}

INLINE float acc_sum(const acc_t *acc) {
    const __m256 x = _mm256_add_ps(_mm256_add_ps(acc->v[0], acc->v[1]),
                                   _mm256_add_ps(acc->v[2], acc->v[3]));
    __m128 res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

INLINE void grp_store(const grp_t *w, float *out) {
    for (int s = 0; s < 4; s++) _mm256_storeu_ps(out + 8 * s, w->v[s]);
}

#endif /* __AVX512F__ */

/* a little-endian uint32 -> 0x10 in byte i where bit i is set (legacy 5-bit types) */
INLINE void bits5(const uint8_t *p, __m128i *lo, __m128i *hi) {
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m128i v = _mm_set1_epi32((int)x32), sel = _mm_set1_epi64x(0x8040201008040201);
    const __m128i b0 = _mm_shuffle_epi8(v, _mm_set_epi64x(0x0101010101010101, 0));
    const __m128i b1 = _mm_shuffle_epi8(v, _mm_set_epi64x(0x0303030303030303, 0x0202020202020202));
    *lo = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(b0, sel), sel), _mm_set1_epi8(0x10));
    *hi = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(b1, sel), sel), _mm_set1_epi8(0x10));
}

/* bits [shift, shift + width) of every byte of 16, moved to bit 4 (K-quant high bits) */
INLINE __m128i high_bits(const uint8_t *p, int shift, int mask) {
    const __m128i v = _mm_srl_epi16(load16(p), _mm_cvtsi32_si128(shift));
    return _mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi8((char)mask)), 4);
}

INLINE void dec_q4_0(const uint8_t *b, grp_t *w) {
    const __m128i q = load16(b + 2), eight = _mm_set1_epi8(8);
    const float d = load_f16(b);
    emit_i8(_mm_sub_epi8(nib_lo(q), eight), _mm_sub_epi8(nib_hi(q), eight), d, d, w);
}

INLINE void dec_q4_1(const uint8_t *b, grp_t *w) {
    const __m128i q = load16(b + 4);
    emit_u8(nib_lo(q), nib_hi(q), load_f16(b), load_f16(b + 2), w);
}

INLINE void dec_q5_0(const uint8_t *b, grp_t *w) {
    __m128i h0, h1;
    bits5(b + 2, &h0, &h1);
    const __m128i q = load16(b + 6), off = _mm_set1_epi8(16);
    const float d = load_f16(b);
    emit_i8(_mm_sub_epi8(_mm_or_si128(nib_lo(q), h0), off),
            _mm_sub_epi8(_mm_or_si128(nib_hi(q), h1), off), d, d, w);
}

INLINE void dec_q5_1(const uint8_t *b, grp_t *w) {
    __m128i h0, h1;
    bits5(b + 4, &h0, &h1);
    const __m128i q = load16(b + 8);
    emit_u8(_mm_or_si128(nib_lo(q), h0), _mm_or_si128(nib_hi(q), h1), load_f16(b),
            load_f16(b + 2), w);
}

INLINE void dec_q8_0(const uint8_t *b, grp_t *w) {
    const float d = load_f16(b);
    emit_i8(load16(b + 2), load16(b + 18), d, d, w);
}

/* MXFP4: exponent byte, then value j in the low nibble of byte j, j + 16 in the high one */
INLINE void dec_mxfp4(const uint8_t *b, grp_t *w) {
    const __m128i lut = _mm_setr_epi8(MXFP4_DOUBLED), q = load16(b + 1);
    const float d = e8m0_half(b[0]);
    emit_i8(_mm_shuffle_epi8(lut, nib_lo(q)), _mm_shuffle_epi8(lut, nib_hi(q)), d, d, w);
}

/* K-quant sub-block j: nibbles of 32 bytes at q, low (j even) or high (j odd) */
INLINE void k_nibbles(const uint8_t *q, int j, __m128i *lo, __m128i *hi) {
    *lo = j & 1 ? nib_hi(load16(q)) : nib_lo(load16(q));
    *hi = j & 1 ? nib_hi(load16(q + 16)) : nib_lo(load16(q + 16));
}

INLINE void dec_q4_k(const uint8_t *b, int j, float scale, float min, grp_t *w) {
    __m128i lo, hi;
    k_nibbles(b + 16 + 32 * (j >> 1), j, &lo, &hi);
    emit_u8(lo, hi, scale, -min, w);
}

INLINE void dec_q5_k(const uint8_t *b, int j, float scale, float min, grp_t *w) {
    __m128i lo, hi;
    k_nibbles(b + 48 + 32 * (j >> 1), j, &lo, &hi);
    emit_u8(_mm_or_si128(lo, high_bits(b + 16, j, 1)), _mm_or_si128(hi, high_bits(b + 32, j, 1)),
            scale, -min, w);
}

/* Q6_K sub-block g = 4h + k holds values 128h + 32k + l, with a scale per 16 */
INLINE void dec_q6_k(const uint8_t *b, int g, float d, grp_t *w) {
    const int h = g >> 2, k = g & 3;
    const uint8_t *ql = b + 64 * h + 32 * (k & 1), *qh = b + 128 + 32 * h;
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * h + 2 * k;
    __m128i lo, hi;
    k_nibbles(ql, k >> 1, &lo, &hi);
    const __m128i off = _mm_set1_epi8(32);
    lo = _mm_sub_epi8(_mm_or_si128(lo, high_bits(qh, 2 * k, 3)), off);
    hi = _mm_sub_epi8(_mm_or_si128(hi, high_bits(qh + 16, 2 * k, 3)), off);
    emit_i8(lo, hi, d * (float)sc[0], d * (float)sc[1], w);
}

#else /* portable C: the compiler vectorizes the 32-wide loops (NEON on ARM, untested) */

typedef struct { float v[QK]; } grp_t;
typedef struct { float v[QK]; } acc_t;

INLINE void emit_u8(const uint8_t *q, float d, float mn, grp_t *w) {
    for (int i = 0; i < QK; i++) w->v[i] = (float)q[i] * d + mn;
}

INLINE void emit_i8(const int8_t *q, float d0, float d1, grp_t *w) {
    for (int i = 0; i < QK; i++) w->v[i] = (float)q[i] * (i < 16 ? d0 : d1);
}

/* legacy 4/5-bit: value i < 16 in the low nibble of qs[i], i >= 16 in the high nibble of
 * qs[i - 16]; the 5th bit is bit i of the little-endian uint32 qh */
INLINE void legacy_values(const uint8_t *qs, const uint8_t *qh, int offset, int8_t *q) {
    uint32_t bits = 0;
    if (qh) memcpy(&bits, qh, 4);
    for (int i = 0; i < 16; i++) {
        q[i] = (int8_t)(((qs[i] & 0xF) | (((bits >> i) & 1) << 4)) - offset);
        q[i + 16] = (int8_t)(((qs[i] >> 4) | (((bits >> (i + 16)) & 1) << 4)) - offset);
    }
}

INLINE void dec_q4_0(const uint8_t *b, grp_t *w) {
    int8_t q[QK];
    legacy_values(b + 2, NULL, 8, q);
    emit_i8(q, load_f16(b), load_f16(b), w);
}

INLINE void dec_q4_1(const uint8_t *b, grp_t *w) {
    int8_t q[QK];
    legacy_values(b + 4, NULL, 0, q);
    emit_u8((const uint8_t *)q, load_f16(b), load_f16(b + 2), w);
}

INLINE void dec_q5_0(const uint8_t *b, grp_t *w) {
    int8_t q[QK];
    legacy_values(b + 6, b + 2, 16, q);
    emit_i8(q, load_f16(b), load_f16(b), w);
}

INLINE void dec_q5_1(const uint8_t *b, grp_t *w) {
    int8_t q[QK];
    legacy_values(b + 8, b + 4, 0, q);
    emit_u8((const uint8_t *)q, load_f16(b), load_f16(b + 2), w);
}

INLINE void dec_q8_0(const uint8_t *b, grp_t *w) {
    emit_i8((const int8_t *)(b + 2), load_f16(b), load_f16(b), w);
}

INLINE void dec_mxfp4(const uint8_t *b, grp_t *w) {
    static const int8_t lut[16] = {MXFP4_DOUBLED};
    int8_t q[QK];
    for (int i = 0; i < 16; i++) {
        q[i] = lut[b[1 + i] & 0xF];
        q[i + 16] = lut[b[1 + i] >> 4];
    }
    const float d = e8m0_half(b[0]);
    emit_i8(q, d, d, w);
}

INLINE void dec_q4_k(const uint8_t *b, int j, float scale, float min, grp_t *w) {
    const uint8_t *qs = b + 16 + 32 * (j >> 1);
    uint8_t q[QK];
    for (int l = 0; l < QK; l++) q[l] = j & 1 ? qs[l] >> 4 : qs[l] & 0xF;
    emit_u8(q, scale, -min, w);
}

INLINE void dec_q5_k(const uint8_t *b, int j, float scale, float min, grp_t *w) {
    const uint8_t *qs = b + 48 + 32 * (j >> 1), *qh = b + 16;
    uint8_t q[QK];
    for (int l = 0; l < QK; l++)
        q[l] = (uint8_t)((j & 1 ? qs[l] >> 4 : qs[l] & 0xF) | (((qh[l] >> j) & 1) << 4));
    emit_u8(q, scale, -min, w);
}

INLINE void dec_q6_k(const uint8_t *b, int g, float d, grp_t *w) {
    const int h = g >> 2, k = g & 3;
    const uint8_t *ql = b + 64 * h + 32 * (k & 1), *qh = b + 128 + 32 * h;
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * h + 2 * k;
    int8_t q[QK];
    for (int l = 0; l < QK; l++) {
        const int low = k >> 1 ? ql[l] >> 4 : ql[l] & 0xF;
        q[l] = (int8_t)((low | (((qh[l] >> (2 * k)) & 3) << 4)) - 32);
    }
    emit_i8(q, d * (float)sc[0], d * (float)sc[1], w);
}

INLINE void fma_group(const int nr, const grp_t *w, const float *x, int64_t ldx, acc_t *acc) {
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < QK; i++) acc[r].v[i] += w->v[i] * x[r * ldx + i];
}

INLINE void acc_zero(const int nr, acc_t *acc) {
    for (int r = 0; r < nr; r++) memset(&acc[r], 0, sizeof(acc_t));
}

INLINE float acc_sum(const acc_t *acc) {
    float s = 0.0f;
    for (int i = 0; i < QK; i++) s += acc->v[i];
    return s;
}

INLINE void grp_store(const grp_t *w, float *out) { memcpy(out, w->v, sizeof(w->v)); }

#endif

/* ---- row kernels: one weight row against nr activation rows, shared by every ISA ---------- */

/* The decoded group of a legacy block b, or of sub-block j of K-quant super-block b; the
 * K-quants read their header once per super-block through `hs`/`hm`. */
#define LEGACY_GROUPS(dec, ts, body)                                                        \
    for (int64_t b = 0; b < k / QK; b++) {                                                  \
        grp_t g;                                                                            \
        const int64_t off = b * QK;                                                         \
        dec(w + b * (ts), &g);                                                              \
        body;                                                                               \
    }
#define K45_GROUPS(dec, ts, body)                                                           \
    for (int64_t b = 0; b < k / QKK; b++) {                                                 \
        const uint8_t *wb = w + b * (ts);                                                   \
        float hs[8], hm[8];                                                                 \
        k_header(wb, hs, hm);                                                               \
        for (int j = 0; j < 8; j++) {                                                       \
            grp_t g;                                                                        \
            const int64_t off = b * QKK + QK * j;                                           \
            dec(wb, j, hs[j], hm[j], &g);                                                   \
            body;                                                                           \
        }                                                                                   \
    }
#define Q6K_GROUPS(body)                                                                    \
    for (int64_t b = 0; b < k / QKK; b++) {                                                 \
        const uint8_t *wb = w + b * 210;                                                    \
        const float d = load_f16(wb + 208);                                                 \
        for (int j = 0; j < 8; j++) {                                                       \
            grp_t g;                                                                        \
            const int64_t off = b * QKK + QK * j;                                           \
            dec_q6_k(wb, j, d, &g);                                                         \
            body;                                                                           \
        }                                                                                   \
    }

#define DOT_BODY fma_group(nr, &g, x + off, ldx, acc)
#define STORE_BODY grp_store(&g, out + off)

/* dot_<type>_n (nr constant after inlining) and deq_<type> (one row to fp32) */
#define KERNELS(name, groups)                                                               \
    INLINE void dot_##name##_n(int64_t k, const uint8_t *w, const float *x, int64_t ldx,    \
                               const int nr, float *out) {                                  \
        acc_t acc[MAXR];                                                                    \
        acc_zero(nr, acc);                                                                  \
        groups(DOT_BODY)                                                                    \
        for (int r = 0; r < nr; r++) out[r] = acc_sum(&acc[r]);                             \
    }                                                                                       \
    static void deq_##name(int64_t k, const uint8_t *w, float *out) { groups(STORE_BODY) }  \
    static void dot_##name(int64_t k, const uint8_t *w, const float *x, int64_t ldx, int nr,\
                           float *out) {                                                    \
        switch (nr) {                                                                       \
        case 1: dot_##name##_n(k, w, x, ldx, 1, out); break;                                \
        case 2: dot_##name##_n(k, w, x, ldx, 2, out); break;                                \
        case 3: dot_##name##_n(k, w, x, ldx, 3, out); break;                                \
        default: dot_##name##_n(k, w, x, ldx, 4, out); break;                               \
        }                                                                                   \
    }

#define G_Q4_0(body) LEGACY_GROUPS(dec_q4_0, 18, body)
#define G_Q4_1(body) LEGACY_GROUPS(dec_q4_1, 20, body)
#define G_Q5_0(body) LEGACY_GROUPS(dec_q5_0, 22, body)
#define G_Q5_1(body) LEGACY_GROUPS(dec_q5_1, 24, body)
#define G_Q8_0(body) LEGACY_GROUPS(dec_q8_0, 34, body)
#define G_MXFP4(body) LEGACY_GROUPS(dec_mxfp4, 17, body)
#define G_Q4_K(body) K45_GROUPS(dec_q4_k, 144, body)
#define G_Q5_K(body) K45_GROUPS(dec_q5_k, 176, body)
KERNELS(q4_0, G_Q4_0)
KERNELS(q4_1, G_Q4_1)
KERNELS(q5_0, G_Q5_0)
KERNELS(q5_1, G_Q5_1)
KERNELS(q8_0, G_Q8_0)
KERNELS(mxfp4, G_MXFP4)
KERNELS(q4_k, G_Q4_K)
KERNELS(q5_k, G_Q5_K)
KERNELS(q6_k, Q6K_GROUPS)

typedef void (*dot_fn)(int64_t, const uint8_t *, const float *, int64_t, int, float *);
typedef void (*deq_fn)(int64_t, const uint8_t *, float *);
typedef struct { int block; int type_size; dot_fn dot; deq_fn deq; } type_info;

static int info_for(int qtype, type_info *t) {
    switch (qtype) {
    case T_Q8_0: *t = (type_info){QK, 34, dot_q8_0, deq_q8_0}; return 1;
    case T_Q4_0: *t = (type_info){QK, 18, dot_q4_0, deq_q4_0}; return 1;
    case T_Q4_1: *t = (type_info){QK, 20, dot_q4_1, deq_q4_1}; return 1;
    case T_Q5_0: *t = (type_info){QK, 22, dot_q5_0, deq_q5_0}; return 1;
    case T_Q5_1: *t = (type_info){QK, 24, dot_q5_1, deq_q5_1}; return 1;
    case T_Q4_K: *t = (type_info){QKK, 144, dot_q4_k, deq_q4_k}; return 1;
    case T_Q5_K: *t = (type_info){QKK, 176, dot_q5_k, deq_q5_k}; return 1;
    case T_Q6_K: *t = (type_info){QKK, 210, dot_q6_k, deq_q6_k}; return 1;
    case T_MXFP4: *t = (type_info){QK, 17, dot_mxfp4, deq_mxfp4}; return 1;
    default: return 0;
    }
}

/* ---- int8 activations: llama.cpp's way, for the batch-small (decode) matmul --------------
 *
 * Each activation row is quantized once per matmul to blocks of 32 int8 values with an fp32
 * scale d and s = d * sum(q) (for the weights' min or offset).
 * A weight block is then decoded to 32 int8 values only (no fp32 widening) and meets each
 * activation block in an integer dot product: AVX2 maddubs (u8 x s8 -> s16 pairs) + madd
 * (-> s32), or one AVX-512 VNNI dpbusd where the build targets it. The int32 sums are scaled
 * by d_w * d_x in fp32. The result differs from the fp32-activation kernels above only by the
 * activations' rounding to int8 (relative error ~5e-3 of a dot product). Weights with a
 * fixed offset (Q4_0: q - 8, Q5_0: q - 16, MXFP4) multiply unsigned and take the offset back
 * through s, cheaper than the sign trick that Q8_0 uses (|w| times x carrying w's sign).
 * The activation blocks are per 32 values for every type but Q4_K and Q6_K, which meet
 * activations rounded per 256 (llama.cpp's Q8_K; see q8k_q4_k_n below): Q5_K still takes
 * per-32 blocks, one per sub-block. */
#if defined(__AVX2__)
#define HAS_Q8 1

typedef struct { float d, s; int8_t q[QK]; } xblock_t;

INLINE float hsum_ps(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

INLINE int hsum_epi32(__m256i x) {
    __m128i r = _mm_add_epi32(_mm256_extracti128_si256(x, 1), _mm256_castsi256_si128(x));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4E));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xB1));
    return _mm_cvtsi128_si32(r);
}

/* 32 floats -> int8 q = round(x / d), d = max|x| / 127 (0 for an all-zero block) */
static void quantize_block(const float *x, xblock_t *o) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float a = _mm_cvtss_f32(m), d = a / 127.0f;
    const __m256 id = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const int sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                                _mm256_add_epi32(q[2], q[3])));
    /* packs interleave the 128-bit lanes: dwords come out as 0 2 4 6 1 3 5 7 of the wanted */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                         _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)o->q,
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    o->d = d;
    o->s = d * (float)sum;
}

INLINE __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
INLINE __m256i join(__m128i lo, __m128i hi) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
/* 16 bytes of legacy nibbles -> values 0-15 (low nibbles), then 16-31 (high nibbles) */
INLINE __m256i nib32(const uint8_t *p) {
    const __m128i q = load16(p);
    return join(nib_lo(q), nib_hi(q));
}
/* 32 bytes of K-quant nibbles: the low (hi_half = 0) or high nibble of each */
INLINE __m256i knib(const uint8_t *p, int hi_half) {
    const __m256i q = load32(p);
    return _mm256_and_si256(hi_half ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(0x0F));
}
/* bits [shift, shift + width) of each of 32 bytes, moved to bit 4 */
INLINE __m256i khigh(const uint8_t *p, int shift, int mask) {
    const __m256i v = _mm256_srl_epi16(load32(p), _mm_cvtsi32_si128(shift));
    return _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi8((char)mask)), 4);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAS_DPBUSD 1
/* unsigned u8 x signed s8 -> 8 int32 sums of 4 products: one VNNI instruction (never run on
 * this project's AVX2-only machine; the code around it is, through the emulation below) */
INLINE __m256i dpbusd(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}
#elif defined(PQ_EMULATE_DPBUSD)
#define HAS_DPBUSD 1
/* Tests only (native.py's "avx2-dpbusd-emu" variant): dpbusd's exact result from AVX2, so the
 * VNNI build's int8 kernels are checked on a CPU without VNNI. */
INLINE __m256i dpbusd(__m256i u, __m256i s) {
    const __m256i lo = _mm256_set1_epi16(0x00FF);
    const __m256i u_even = _mm256_and_si256(u, lo), u_odd = _mm256_srli_epi16(u, 8);
    const __m256i s_even = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8);
    const __m256i s_odd = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(_mm256_madd_epi16(u_even, s_even), _mm256_madd_epi16(u_odd, s_odd));
}
#endif

#if defined(HAS_DPBUSD)
INLINE __m256i dot_us(__m256i u, __m256i s) { return dpbusd(u, s); }
/* Q6_K: int32 lanes 0-3 hold values 0-15, lanes 4-7 values 16-31: times the two scales */
INLINE __m256i dot_ss_scaled(__m256i w, __m256i x, int sc0, int sc1) {
    const __m256i p = dpbusd(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_mullo_epi32(p, join(_mm_set1_epi32(sc0), _mm_set1_epi32(sc1)));
}
#else
/* maddubs: |pair sums| <= 2 * 128 * 127 < 32768 for every type here, so it never saturates */
INLINE __m256i dot_us(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
/* Q6_K: int16 lanes 0-7 hold values 0-15, lanes 8-15 values 16-31: madd by their scales */
INLINE __m256i dot_ss_scaled(__m256i w, __m256i x, int sc0, int sc1) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, join(_mm_set1_epi16((short)sc0), _mm_set1_epi16((short)sc1)));
}
#endif
/* signed weights: |w| times x carrying w's sign */
INLINE __m256i dot_ss(__m256i w, __m256i x) {
    return dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

#define Q8_ARGS int64_t k, const uint8_t *w, const xblock_t *x, int64_t nbx, const int nr, \
                float *out
#define Q8_BEGIN                                                                            \
    __m256 acc[MAXR];                                                                       \
    float mn[MAXR];                                                                         \
    for (int r = 0; r < nr; r++) { acc[r] = _mm256_setzero_ps(); mn[r] = 0.0f; }
#define Q8_END for (int r = 0; r < nr; r++) out[r] = hsum_ps(acc[r]) + mn[r];
/* the decoded weight group `wq` (scale dw, min term mw * s_x) against activation block xb of
 * every row: DOT(wq, x) -> 8 int32 partial sums */
#define Q8_ROWS(xb_index, DOT, dw, MIN)                                                     \
    for (int r = 0; r < nr; r++) {                                                          \
        const xblock_t *xb = x + r * nbx + (xb_index);                                      \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(wq, load32((const uint8_t *)xb->q))), \
                                 _mm256_set1_ps((dw) * xb->d), acc[r]);                     \
        MIN;                                                                                \
    }
#define NO_MIN (void)0
#define Q8_DISPATCH(name)                                                                   \
    static void q8_##name(Q8_ARGS) {                                                        \
        switch (nr) {                                                                       \
        case 1: q8_##name##_n(k, w, x, nbx, 1, out); break;                                 \
        case 2: q8_##name##_n(k, w, x, nbx, 2, out); break;                                 \
        case 3: q8_##name##_n(k, w, x, nbx, 3, out); break;                                 \
        default: q8_##name##_n(k, w, x, nbx, 4, out); break;                                \
        }                                                                                   \
    }

INLINE void q8_q4_0_n(Q8_ARGS) {
    Q8_BEGIN
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *wb = w + b * 18;
        const __m256i wq = nib32(wb + 2);
        const float d = load_f16(wb), off = -8.0f * d;
        Q8_ROWS(b, dot_us, d, mn[r] += off * xb->s)
    }
    Q8_END
}

INLINE void q8_q4_1_n(Q8_ARGS) {
    Q8_BEGIN
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *wb = w + b * 20;
        const __m256i wq = nib32(wb + 4);
        const float m = load_f16(wb + 2);
        Q8_ROWS(b, dot_us, load_f16(wb), mn[r] += m * xb->s)
    }
    Q8_END
}

INLINE __m256i legacy5(const uint8_t *qh, const uint8_t *qs) {
    __m128i h0, h1;
    bits5(qh, &h0, &h1);
    return _mm256_or_si256(nib32(qs), join(h0, h1));
}

INLINE void q8_q5_0_n(Q8_ARGS) {
    Q8_BEGIN
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *wb = w + b * 22;
        const __m256i wq = legacy5(wb + 2, wb + 6);
        const float d = load_f16(wb), off = -16.0f * d;
        Q8_ROWS(b, dot_us, d, mn[r] += off * xb->s)
    }
    Q8_END
}

INLINE void q8_q5_1_n(Q8_ARGS) {
    Q8_BEGIN
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *wb = w + b * 24;
        const __m256i wq = legacy5(wb + 4, wb + 8);
        const float m = load_f16(wb + 2);
        Q8_ROWS(b, dot_us, load_f16(wb), mn[r] += m * xb->s)
    }
    Q8_END
}

INLINE void q8_q8_0_n(Q8_ARGS) {
    Q8_BEGIN
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *wb = w + b * 34;
        const __m256i wq = load32(wb + 2);
        Q8_ROWS(b, dot_ss, load_f16(wb), NO_MIN)
    }
    Q8_END
}

/* MXFP4: the doubled E2M1 values plus 12 (0..24, unsigned), the 12 taken back through s_x */
INLINE void q8_mxfp4_n(Q8_ARGS) {
    const __m128i lut = _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
    Q8_BEGIN
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *wb = w + b * 17;
        const __m128i q = load16(wb + 1);
        const __m256i wq = join(_mm_shuffle_epi8(lut, nib_lo(q)), _mm_shuffle_epi8(lut, nib_hi(q)));
        const float d = e8m0_half(wb[0]), off = -12.0f * d;
        Q8_ROWS(b, dot_us, d, mn[r] += off * xb->s)
    }
    Q8_END
}

/* Q4_K / Q5_K: sub-block j of super-block b meets activation block 8b + j */
#define Q8_K45(name, ts, qs_off, HIGH)                                                      \
    INLINE void q8_##name##_n(Q8_ARGS) {                                                    \
        Q8_BEGIN                                                                            \
        for (int64_t b = 0; b < k / QKK; b++) {                                             \
            const uint8_t *wb = w + b * (ts);                                               \
            float hs[8], hm[8];                                                             \
            k_header(wb, hs, hm);                                                           \
            for (int j = 0; j < 8; j++) {                                                   \
                const __m256i wq = HIGH(knib(wb + (qs_off) + 32 * (j >> 1), j & 1));        \
                const float m = hm[j];                                                      \
                Q8_ROWS(8 * b + j, dot_us, hs[j], mn[r] -= m * xb->s)                       \
            }                                                                               \
        }                                                                                   \
        Q8_END                                                                              \
    }
#define NO_HIGH(v) (v)
#define Q5K_HIGH(v) _mm256_or_si256((v), khigh(wb + 16, j, 1))
Q8_K45(q4_k, 144, 16, NO_HIGH)
Q8_K45(q5_k, 176, 48, Q5K_HIGH)

/* Q4_K against activations rounded per 256 values (llama.cpp's Q8_K), not per 32: the eight
 * sub-blocks of a super-block then accumulate in int32 with their 6-bit integer scales, and
 * only one float conversion and one multiply-add per 256 values remain. Per-32 activation
 * scales cost a conversion, a scalar scale product and a multiply-add per 32 values, which
 * bounded this kernel on AVX2: one thread, 2048 -> 8192, went from 4.35 to 5.7-6.2 GB/s
 * (Q6_K below: 3.8 to 5.1), for somewhat coarser rounding of the activations (relative error
 * of a dot product ~7e-3 instead of ~5e-3 on Gaussian inputs; llama.cpp rounds the same). */
typedef struct { float d; int32_t bsums[16]; /* per 16 values */ int8_t q[QKK]; } xkblock_t;

static void quantize_kblock(const float *x, xkblock_t *o) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < QKK; i += 8)
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float a = _mm_cvtss_f32(m);
    const __m256 id = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
    for (int j = 0; j < 8; j++) {
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(
                _mm256_mul_ps(_mm256_loadu_ps(x + 32 * j + 8 * i), id),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        o->bsums[2 * j] = hsum_epi32(_mm256_add_epi32(q[0], q[1]));
        o->bsums[2 * j + 1] = hsum_epi32(_mm256_add_epi32(q[2], q[3]));
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                             _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(o->q + 32 * j), _mm256_permutevar8x32_epi32(
                                p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    o->d = a / 127.0f;
}

/* unsigned weights u times signed activations s, each sum of products times `scale` */
INLINE __m256i dot_us_scaled(__m256i u, __m256i s, int scale) {
#if defined(HAS_DPBUSD)
    return _mm256_mullo_epi32(dpbusd(u, s), _mm256_set1_epi32(scale));
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16((short)scale));
#endif
}

INLINE void q8k_q4_k_n(int64_t k, const uint8_t *w, const xkblock_t *x, int64_t nsb,
                       const int nr, float *out) {
    __m256 acc[MAXR];
    float mn[MAXR];
    for (int r = 0; r < nr; r++) { acc[r] = _mm256_setzero_ps(); mn[r] = 0.0f; }
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *wb = w + b * 144, *q = wb + 4;
        const float d = load_f16(wb), dmin = load_f16(wb + 2);
        int sc[8], mins[8];
        for (int j = 0; j < 4; j++) {
            sc[j] = q[j] & 63;
            mins[j] = q[j + 4] & 63;
            sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
            mins[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
        }
        __m256i wq[8];
        for (int j = 0; j < 8; j++) wq[j] = knib(wb + 16 + 32 * (j >> 1), j & 1);
        for (int r = 0; r < nr; r++) {
            const xkblock_t *xb = x + r * nsb + b;
            __m256i sum = _mm256_setzero_si256();
            int min_sum = 0;
            for (int j = 0; j < 8; j++) {
                sum = _mm256_add_epi32(sum, dot_us_scaled(wq[j], load32((const uint8_t *)xb->q + 32 * j), sc[j]));
                min_sum += mins[j] * (xb->bsums[2 * j] + xb->bsums[2 * j + 1]);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * xb->d), acc[r]);
            mn[r] -= dmin * xb->d * (float)min_sum;
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum_ps(acc[r]) + mn[r];
}

/* Q6_K the same way: the 6-bit values unsigned (0-63) against the activations, one int8 scale
 * per 16 values applied in the pair-sum step, and the offset of 32 taken back through the
 * activations' sums per 16 */
INLINE void q8k_q6_k_n(int64_t k, const uint8_t *w, const xkblock_t *x, int64_t nsb,
                       const int nr, float *out) {
    __m256 acc[MAXR];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *wb = w + b * 210;
        const float d = load_f16(wb + 208);
        const int8_t *sc = (const int8_t *)(wb + 192);
        __m256i wq[8], scales[8];
        for (int g = 0; g < 8; g++) { /* sub-block g = 4h + t: values 128h + 32t + l */
            const int h = g >> 2, t = g & 3;
            wq[g] = _mm256_or_si256(knib(wb + 64 * h + 32 * (t & 1), t >> 1),
                                    khigh(wb + 128 + 32 * h, 2 * t, 3));
#if defined(HAS_DPBUSD)
            scales[g] = join(_mm_set1_epi32(sc[8 * h + 2 * t]), _mm_set1_epi32(sc[8 * h + 2 * t + 1]));
#else
            scales[g] = join(_mm_set1_epi16(sc[8 * h + 2 * t]), _mm_set1_epi16(sc[8 * h + 2 * t + 1]));
#endif
        }
        for (int r = 0; r < nr; r++) {
            const xkblock_t *xb = x + r * nsb + b;
            __m256i sum = _mm256_setzero_si256();
            int offset = 0;
            for (int g = 0; g < 8; g++) {
                const __m256i xq = load32((const uint8_t *)xb->q + 32 * g);
#if defined(HAS_DPBUSD)  /* lanes 0-3: values 0-15 of the sub-block, lanes 4-7: 16-31 */
                sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(dpbusd(wq[g], xq), scales[g]));
#else
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(wq[g], xq),
                                                              scales[g]));
#endif
                const int h = g >> 2, t = g & 3;
                offset += sc[8 * h + 2 * t] * xb->bsums[2 * g] +
                          sc[8 * h + 2 * t + 1] * xb->bsums[2 * g + 1];
            }
            sum = _mm256_sub_epi32(sum, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * xb->d), acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum_ps(acc[r]);
}

typedef void (*q8k_fn)(int64_t, const uint8_t *, const xkblock_t *, int64_t, int, float *);
#define Q8K_DISPATCH(name)                                                                  \
    static void q8k_##name(int64_t k, const uint8_t *w, const xkblock_t *x, int64_t nsb,    \
                           int nr, float *out) {                                            \
        switch (nr) {                                                                       \
        case 1: q8k_##name##_n(k, w, x, nsb, 1, out); break;                                \
        case 2: q8k_##name##_n(k, w, x, nsb, 2, out); break;                                \
        case 3: q8k_##name##_n(k, w, x, nsb, 3, out); break;                                \
        default: q8k_##name##_n(k, w, x, nsb, 4, out); break;                               \
        }                                                                                   \
    }
Q8K_DISPATCH(q4_k)
Q8K_DISPATCH(q6_k)

/* Q6_K sub-block g = 4h + t holds values 128h + 32t + l, with one int8 scale per 16 */
INLINE void q8_q6_k_n(Q8_ARGS) {
    Q8_BEGIN
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *wb = w + b * 210;
        const float d = load_f16(wb + 208);
        const int8_t *sc = (const int8_t *)(wb + 192);
        for (int g = 0; g < 8; g++) {
            const int h = g >> 2, t = g & 3;
            const __m256i low = knib(wb + 64 * h + 32 * (t & 1), t >> 1);
            const __m256i wq = _mm256_sub_epi8(
                _mm256_or_si256(low, khigh(wb + 128 + 32 * h, 2 * t, 3)), _mm256_set1_epi8(32));
            const int s0 = sc[8 * h + 2 * t], s1 = sc[8 * h + 2 * t + 1];
#define Q6_DOT(a, bx) dot_ss_scaled(a, bx, s0, s1)
            Q8_ROWS(8 * b + g, Q6_DOT, d, NO_MIN)
#undef Q6_DOT
        }
    }
    Q8_END
}

Q8_DISPATCH(q4_0)
Q8_DISPATCH(q4_1)
Q8_DISPATCH(q5_0)
Q8_DISPATCH(q5_1)
Q8_DISPATCH(q8_0)
Q8_DISPATCH(mxfp4)
Q8_DISPATCH(q4_k)
Q8_DISPATCH(q5_k)
Q8_DISPATCH(q6_k)

typedef void (*q8_fn)(Q8_ARGS);

static q8_fn q8_for(int qtype) {
    switch (qtype) {
    case T_Q4_0: return q8_q4_0;
    case T_Q4_1: return q8_q4_1;
    case T_Q5_0: return q8_q5_0;
    case T_Q5_1: return q8_q5_1;
    case T_Q8_0: return q8_q8_0;
    case T_MXFP4: return q8_mxfp4;
    case T_Q4_K: return q8_q4_k;
    case T_Q5_K: return q8_q5_k;
    case T_Q6_K: return q8_q6_k;
    default: return NULL;
    }
}
#else
#define HAS_Q8 0
#endif /* __AVX2__ */

/* ---- exported ---------------------------------------------------------------------------- */

/* The ISA this build was compiled for (the loader checks it matches what it asked for). */
const char *pq_isa(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return "avx512vnni";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(PQ_EMULATE_DPBUSD)
    return "avx2-dpbusd-emu";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}

long long pq_call_count(void) { return __atomic_load_n(&call_count, __ATOMIC_RELAXED); }

/* 1 when this library multiplies the type at this K, else 0 (the caller uses torch). */
int pq_supports(int qtype, int64_t k) {
    type_info t;
    return info_for(qtype, &t) && k > 0 && k % t.block == 0;
}

/* Decoding is compute-heavy, so the hardware prefetcher falls behind: ask for a later row now
 * and its bytes arrive while this one is being decoded (2x on a cold-cache decode step). */
INLINE void prefetch_row(const uint8_t *w, int64_t row_bytes, int64_t n, int64_t j) {
    if (j >= n) return;
    const uint8_t *ahead = w + j * row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b);
}

/* y[r, j] for the m activation rows and n weight rows: OpenMP splits the weight rows in chunks
 * of ROW_CHUNK; each weight row meets MAXR activation rows at a time through DOT, which
 * writes out[0..nr) for weight row j and activation rows [m0, m0 + nr). */
#define SPLIT_ROWS(DOT)                                                                     \
    const int64_t nchunks = (n + ROW_CHUNK - 1) / ROW_CHUNK;                                \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads < 1 ? 1 : nthreads)")  \
    for (int64_t c = 0; c < nchunks; c++) {                                                 \
        const int64_t r0 = c * ROW_CHUNK, r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;     \
        for (int64_t m0 = 0; m0 < m; m0 += MAXR) {                                          \
            const int nr = m - m0 < MAXR ? (int)(m - m0) : MAXR;                            \
            for (int64_t j = r0; j < r1; j++) {                                             \
                float out[MAXR];                                                            \
                if (m0 == 0) prefetch_row(w, row_bytes, n, j + PREFETCH_ROWS);              \
                DOT;                                                                        \
                for (int r = 0; r < nr; r++) y[(m0 + r) * ldy + j] = out[r];                \
            }                                                                               \
        }                                                                                   \
    }

static int check(int qtype, int64_t row_bytes, int64_t k, type_info *t) {
    return pq_supports(qtype, k) && info_for(qtype, t) && row_bytes == k / t->block * t->type_size;
}

/* ---- blocked fp32 GEMM for many activation rows (batched decode, prefill) -----------------
 * The fused kernels above decode a weight group again for every MAXR activation rows, so their
 * cost grows with every row; and on AVX2 cores whose integer multiplies are no faster than their
 * FMAs (this project's machine, benchmarks/cpu_peak.py: fp32 FMA 20.1 GMAC/s, maddubs + madd
 * 17.3 per core) int8 activations do not help a compute-bound step either. Here a tile of GEMM_TN weight rows is
 * dequantized GEMM_KC values at a time into an L1-sized fp32 buffer, once, and a 6 x 16
 * register-blocked microkernel meets every activation row with it: 12 accumulators, two
 * activation loads and six weight broadcasts per 12 FMAs. The activations are repacked once
 * per call into panels of 16 rows, k-major. The result equals "dequantize, then an fp32
 * matmul" but for summation order, whatever the caller's activation setting. */
#if defined(__AVX2__) && !defined(__AVX512F__) /* AVX-512 builds keep tile + BLAS, measured
                                                  * there; this 8-lane kernel never ran there */
#define HAS_GEMM 1
#define GEMM_MR 16  /* activation rows per panel: two 8-lane registers */
#define GEMM_NR 6   /* weight rows per microkernel call */
#define GEMM_TN 24  /* weight rows dequantized together (a multiple of GEMM_NR) */
#define GEMM_KC 256 /* values of k per dequantized slice (a multiple of every block size) */
#define GEMM_MC 256 /* activation rows per pass (see gemm_blocked) */

/* c[j * ldc + i] += sum_kk w[j * GEMM_KC + kk] * xp[kk * GEMM_MR + i], j < 6, i < 8 * halves */
INLINE void gemm_micro(const float *w, const float *xp, int64_t kc, float *c, int64_t ldc,
                       const int halves) {
    __m256 acc[GEMM_NR][2];
    for (int j = 0; j < GEMM_NR; j++)
        for (int h = 0; h < halves; h++) acc[j][h] = _mm256_loadu_ps(c + j * ldc + 8 * h);
    for (int64_t kk = 0; kk < kc; kk++) {
        __m256 xv[2];
        for (int h = 0; h < halves; h++) xv[h] = _mm256_load_ps(xp + kk * GEMM_MR + 8 * h);
        for (int j = 0; j < GEMM_NR; j++) {
            const __m256 wv = _mm256_broadcast_ss(w + j * GEMM_KC + kk);
            for (int h = 0; h < halves; h++) acc[j][h] = _mm256_fmadd_ps(wv, xv[h], acc[j][h]);
        }
    }
    for (int j = 0; j < GEMM_NR; j++)
        for (int h = 0; h < halves; h++) _mm256_storeu_ps(c + j * ldc + 8 * h, acc[j][h]);
}

/* x [m, k] -> panels of GEMM_MR rows, each [k][GEMM_MR], rows past m zero */
static void pack_panels(const float *x, int64_t m, int64_t k, float *xp, int nthreads) {
    const int64_t panels = (m + GEMM_MR - 1) / GEMM_MR;
#pragma omp parallel for schedule(static) num_threads(nthreads < 1 ? 1 : nthreads)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t kk = 0; kk < k; kk++)
            for (int i = 0; i < GEMM_MR; i++) {
                const int64_t r = p * GEMM_MR + i;
                xp[(p * k + kk) * GEMM_MR + i] = r < m ? x[r * k + kk] : 0.0f;
            }
}

/* one tile of weight rows [j0, j0 + GEMM_TN) against every panel, into y */
static void gemm_tile(const type_info *t, const uint8_t *w, int64_t row_bytes, int64_t n,
                      int64_t k, const float *xp, int64_t m, float *y, int64_t ldy, int64_t j0,
                      float *wbuf, float *cbuf) {
    const int64_t panels = (m + GEMM_MR - 1) / GEMM_MR, ldc = panels * GEMM_MR;
    const int64_t rows = n - j0 < GEMM_TN ? n - j0 : GEMM_TN;
    memset(cbuf, 0, sizeof(float) * GEMM_TN * ldc);
    for (int64_t k0 = 0; k0 < k; k0 += GEMM_KC) {
        const int64_t kc = k - k0 < GEMM_KC ? k - k0 : GEMM_KC;
        const int64_t skip = k0 / t->block * t->type_size;
        for (int64_t j = 0; j < GEMM_TN; j++) {
            if (j < rows) t->deq(kc, w + (j0 + j) * row_bytes + skip, wbuf + j * GEMM_KC);
            else memset(wbuf + j * GEMM_KC, 0, sizeof(float) * GEMM_KC);
        }
        for (int64_t p = 0; p < panels; p++) {
            const float *xs = xp + (p * k + k0) * GEMM_MR;
            const int halves = m - p * GEMM_MR > 8 ? 2 : 1;
            for (int64_t j = 0; j < GEMM_TN; j += GEMM_NR) {
                float *c = cbuf + j * ldc + p * GEMM_MR;
                /* a constant `halves` per call: the compiler unrolls each variant */
                if (halves == 2) gemm_micro(wbuf + j * GEMM_KC, xs, kc, c, ldc, 2);
                else gemm_micro(wbuf + j * GEMM_KC, xs, kc, c, ldc, 1);
            }
        }
    }
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < rows; j++) y[r * ldy + j0 + j] = cbuf[j * ldc + r];
}

/* Activation rows are taken GEMM_MC at a time, so the repacked copy stays small (8 MB at
 * K = 8192) even for a long prefill chunk; each block dequantizes the weights once more, a
 * few percent of its multiply-adds. */
static int gemm_blocked(const type_info *t, const uint8_t *w, int64_t row_bytes, int64_t n,
                        int64_t k, const float *x, int64_t m, float *y, int64_t ldy,
                        int nthreads) {
    if (m <= 0 || n <= 0) return 0;
    const int64_t rows_max = m < GEMM_MC ? m : GEMM_MC;
    const int64_t ldc_max = (rows_max + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    float *xp = aligned_alloc(32, sizeof(float) * (size_t)(ldc_max * k));
    if (xp == NULL) return -2;
    const int64_t tiles = (n + GEMM_TN - 1) / GEMM_TN;
    int failed = 0;
    for (int64_t m0 = 0; m0 < m && !failed; m0 += GEMM_MC) {
        const int64_t rows = m - m0 < GEMM_MC ? m - m0 : GEMM_MC;
        pack_panels(x + m0 * k, rows, k, xp, nthreads);
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
        {
            float *wbuf = aligned_alloc(32, sizeof(float) * GEMM_TN * GEMM_KC);
            float *cbuf = malloc(sizeof(float) * (size_t)(GEMM_TN * ldc_max));
            const int ready = wbuf != NULL && cbuf != NULL;
            if (!ready) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            /* every thread meets the worksharing loop, ready or not */
#pragma omp for schedule(static)
            for (int64_t tile = 0; tile < tiles; tile++)
                if (ready)
                    gemm_tile(t, w, row_bytes, n, k, xp, rows, y + m0 * ldy, ldy,
                              tile * GEMM_TN, wbuf, cbuf);
            free(wbuf);
            free(cbuf);
        }
    }
    free(xp);
    return failed ? -2 : 0;
}
#else
#define HAS_GEMM 0
#endif

/* Activation rows from which the blocked GEMM beats pq_matmul (int8_activations 0) or
 * pq_matmul_q8 (1); GEMM_NEVER where this build has none (the callers: packed.py and
 * decode_ops.c's linear). Measured on the 2-core AVX2 machine
 * (2 threads; Q4_K / Q6_K 2048 -> 8192, Q4_1 / Q8_0 576 -> 3072): against fp32 activations
 * the blocked GEMM wins from 9-12 rows; against int8 ones from 16, and from 32 for Q4_K,
 * whose int8 kernel meets activations rounded per 256 (README.md has the table). */
#define GEMM_NEVER (1 << 30)
int pq_gemm_min_rows(int qtype, int int8_activations) {
#if HAS_GEMM
    if (!int8_activations) return 12;
    return qtype == T_Q4_K ? 32 : 16;
#else
    (void)qtype, (void)int8_activations;
    return GEMM_NEVER;
#endif
}

/* y = x . W^T (as pq_matmul) through the blocked GEMM. Returns 0, -1 on a type, shape or
 * build without it, -2 when a buffer cannot be allocated. */
int pq_gemm(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
            const float *x, int64_t m, float *y, int64_t ldy, int nthreads) {
#if HAS_GEMM
    type_info t;
    if (!check(qtype, row_bytes, k, &t)) return -1;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
    return gemm_blocked(&t, w, row_bytes, n, k, x, m, y, ldy, nthreads);
#else
    (void)qtype, (void)w, (void)row_bytes, (void)n, (void)k, (void)x, (void)m, (void)y;
    (void)ldy, (void)nthreads;
    return -1;
#endif
}

/* y[i * ldy + j] = sum_k x[i * k + k'] * W[j, k'] for i < m, j < n; W: n rows of row_bytes.
 * Returns 0, or -1 on a type or shape this library cannot do. */
int pq_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
              const float *x, int64_t m, float *y, int64_t ldy, int nthreads) {
    type_info t;
    if (!check(qtype, row_bytes, k, &t)) return -1;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
    SPLIT_ROWS(t.dot(k, w + j * row_bytes, x + m0 * k, k, nr, out))
    return 0;
}

/* out[j * k + k'] = W[j, k'] in fp32 for j < n (a tile of rows, for the caller's GEMM). */
int pq_dequantize(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
                  float *out, int nthreads) {
    type_info t;
    if (!check(qtype, row_bytes, k, &t)) return -1;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
#pragma omp parallel for schedule(static) num_threads(nthreads < 1 ? 1 : nthreads)
    for (int64_t j = 0; j < n; j++) {
        prefetch_row(w, row_bytes, n, j + PREFETCH_ROWS);
        t.deq(k, w + j * row_bytes, out + j * k);
    }
    return 0;
}

/* 1 when pq_matmul_q8 multiplies the type at this K (AVX2 builds and up), else 0. */
int pq_supports_q8(int qtype, int64_t k) {
#if HAS_Q8
    return pq_supports(qtype, k) && q8_for(qtype) != NULL;
#else
    (void)qtype;
    (void)k;
    return 0;
#endif
}

#if HAS_Q8
/* pq_matmul_q8 for Q4_K and Q6_K: activations in 256-value blocks (xkblock_t), rows split as
 * there */
static int matmul_q8k(q8k_fn fn, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
                      const float *x, int64_t m, float *y, int64_t ldy, int nthreads) {
    const int64_t nsb = k / QKK;
    xkblock_t *xq = malloc((size_t)(m * nsb) * sizeof(xkblock_t));
    if (xq == NULL) return -2;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
    for (int64_t i = 0; i < m * nsb; i++) quantize_kblock(x + i * QKK, xq + i);
    SPLIT_ROWS(fn(k, w + j * row_bytes, xq + m0 * nsb, nsb, nr, out))
    free(xq);
    return 0;
}
#endif

/* pq_matmul with int8 activations: x is quantized once (blocks of 32, see above), then the
 * output rows are split across threads as in pq_matmul. Returns 0, -1 on a type or shape
 * this build cannot do, -2 when the activation buffer cannot be allocated. */
int pq_matmul_q8(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
                 const float *x, int64_t m, float *y, int64_t ldy, int nthreads) {
#if HAS_Q8
    type_info t;
    if (!check(qtype, row_bytes, k, &t) || !pq_supports_q8(qtype, k)) return -1;
    if (qtype == T_Q4_K || qtype == T_Q6_K)
        return matmul_q8k(qtype == T_Q4_K ? q8k_q4_k : q8k_q6_k, w, row_bytes, n, k, x, m, y, ldy,
                          nthreads);
    const q8_fn fn = q8_for(qtype);
    const int64_t nb = k / QK;
    xblock_t *xq = malloc((size_t)(m * nb) * sizeof(xblock_t));
    if (xq == NULL) return -2;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
    for (int64_t i = 0; i < m * nb; i++) quantize_block(x + i * QK, xq + i);
    SPLIT_ROWS(fn(k, w + j * row_bytes, xq + m0 * nb, nb, nr, out))
    free(xq);
    return 0;
#else
    (void)qtype, (void)w, (void)row_bytes, (void)n, (void)k, (void)x, (void)m, (void)y;
    (void)ldy, (void)nthreads;
    return -1;
#endif
}
