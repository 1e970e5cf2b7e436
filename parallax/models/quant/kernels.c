/* Matmul on packed GGUF blocks: y[m, n] = x[m, k] . W[n, k]^T, W kept in ggml's block layout
 * (the legacy 32-value types, the K-quants, and MXFP4: gpt-oss' experts).
 *
 * Activations stay fp32. Every 32-value group of a weight row is decoded to fp32 in registers
 * (block scale and min folded in) and meets up to MAXR activation rows in fused multiply-adds,
 * so the result equals "dequantize, then an fp32 matmul" but for summation order. Why not
 * llama.cpp's 8-bit activations with integer dot products: on SmolLM2 Q4_1 they flipped 4 % of
 * the top-1 tokens against the fp32 model (issue 12), and batch-1 decode is bound by the weight
 * bytes read, which decoding in registers does not change. OpenMP splits the output rows.
 *
 * pq_dequantize writes the same decoded values to memory: the caller's GEMM for large batches
 * (prefill) dequantizes a tile of rows at a time and hands it to BLAS, which beats decoding the
 * weight again for every MAXR activation rows.
 *
 * Plain C on purpose: no torch headers, built by gcc at first use (see native.py). The x86
 * decoders are shared by the AVX2 and AVX-512 builds, which differ in vector width (8 or 16
 * fp32 lanes); any other CPU gets the portable section, vectorized by the compiler alone.
 */
#include <math.h>
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

/* ---- exported ---------------------------------------------------------------------------- */

/* The ISA this build was compiled for (the loader checks it matches what it asked for). */
const char *pq_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
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

static int check(int qtype, int64_t row_bytes, int64_t k, type_info *t) {
    return pq_supports(qtype, k) && info_for(qtype, t) && row_bytes == k / t->block * t->type_size;
}

/* y[i * ldy + j] = sum_k x[i * k + k'] * W[j, k'] for i < m, j < n; W: n rows of row_bytes.
 * Returns 0, or -1 on a type or shape this library cannot do. */
int pq_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
              const float *x, int64_t m, float *y, int64_t ldy, int nthreads) {
    type_info t;
    if (!check(qtype, row_bytes, k, &t)) return -1;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
    const int64_t nchunks = (n + ROW_CHUNK - 1) / ROW_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads < 1 ? 1 : nthreads)
    for (int64_t c = 0; c < nchunks; c++) {
        const int64_t r0 = c * ROW_CHUNK, r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
        for (int64_t m0 = 0; m0 < m; m0 += MAXR) {
            const int nr = m - m0 < MAXR ? (int)(m - m0) : MAXR;
            for (int64_t j = r0; j < r1; j++) {
                float out[MAXR];
                if (m0 == 0) prefetch_row(w, row_bytes, n, j + PREFETCH_ROWS);
                t.dot(k, w + j * row_bytes, x + m0 * k, k, nr, out);
                for (int r = 0; r < nr; r++) y[(m0 + r) * ldy + j] = out[r];
            }
        }
    }
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
