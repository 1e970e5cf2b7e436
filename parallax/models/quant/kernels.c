/* Matmul on packed GGUF blocks: y[m, n] = x[m, k] . W[n, k]^T, W kept in ggml's block layout.
 *
 * The way llama.cpp does it: each call quantizes the activation rows once (Q8 blocks of 32
 * for the legacy types, Q8_K-like blocks of 256 with 16-value sums for the K-quants), then every
 * weight block meets every activation block in integer dot products (AVX2 maddubs/madd, or
 * AVX-512 VNNI dpbusd where built for it; plain C otherwise). OpenMP splits the output rows;
 * a weight block is decoded once and reused across a tile of up to MAXR activation rows, so a
 * batch is not MAXR separate GEMVs over the weight.
 *
 * Plain C on purpose: no torch headers, built by gcc at first use (see native.py).
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

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef struct { float d; float s; int8_t qs[QK]; } aq8_t;  /* s = d * sum(qs) */
typedef struct { float d; int32_t pad; int16_t bsums[16]; int8_t qs[QKK]; } aqk_t;

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

/* Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins */
static inline void k_scale_min(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

/* ---- activation quantization ------------------------------------------------------------- */

static void quantize_row_q8(const float *x, aq8_t *y, int64_t k) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            const int v = (int)nearbyintf(xb[i] * id);
            y[b].qs[i] = (int8_t)v;
            sum += v;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
}

static void quantize_row_q8k(const float *x, aqk_t *y, int64_t k) {
    for (int64_t b = 0; b < k / QKK; b++) {
        const float *xb = x + b * QKK;
        float amax = 0.0f;
        for (int i = 0; i < QKK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int i = g * 16; i < g * 16 + 16; i++) {
                int v = (int)nearbyintf(xb[i] * id);
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
                y[b].qs[i] = (int8_t)v;
                sum += v;
            }
            y[b].bsums[g] = (int16_t)sum;
        }
        y[b].d = d;
        y[b].pad = 0;
    }
}

/* ---- dot products: one weight row against nr activation rows ------------------------------
 * w: the weight row's blocks; a: the first activation row's blocks, row r at a + r * as bytes;
 * out[r] = sum over the row. Each *_n is always inlined with a constant nr (see DISPATCH).
 */
#define INLINE static inline __attribute__((always_inline))
#define AQ8(r, b) ((const aq8_t *)(a + (r) * as) + (b))
#define AQK(r, b) ((const aqk_t *)(a + (r) * as) + (b))

#if defined(__AVX2__)

static inline float hsum_float_8(const __m256 x) {
    __m128 res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

static inline int hsum_i32_8(const __m256i a) {
    const __m128i sum128 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extractf128_si256(a, 1));
    const __m128i hi64 = _mm_unpackhi_epi64(sum128, sum128);
    const __m128i sum64 = _mm_add_epi32(hi64, sum128);
    const __m128i hi32 = _mm_shuffle_epi32(sum64, _MM_SHUFFLE(2, 3, 0, 1));
    return _mm_cvtsi128_si32(_mm_add_epi32(sum64, hi32));
}

/* 16 bytes of nibbles -> 32 bytes: value j (low nibble of byte j), then j + 16 (high) */
static inline __m256i bytes_from_nibbles_32(const uint8_t *p) {
    const __m128i tmp = _mm_loadu_si128((const __m128i *)p);
    const __m256i bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    return _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes);
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set */
static inline __m256i bytes_from_bits_32(const uint8_t *p) {
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* unsigned x signed bytes, summed in groups of 4 -> 8 int32 */
static inline __m256i mul_sum_us8_i32(const __m256i ax, const __m256i sy) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy);
#else
    return _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy));
#endif
}

static inline __m256 mul_sum_us8_float(const __m256i ax, const __m256i sy) {
    return _mm256_cvtepi32_ps(mul_sum_us8_i32(ax, sy));
}

/* signed legacy blocks: qx in [-16, 15] (or [-127, 127] for Q8_0) */
INLINE void dot_signed32(const int nr, const __m256i qx, const float dw, const uint8_t *a,
                         int64_t as, int64_t b, __m256 *acc) {
    const __m256i ax = _mm256_sign_epi8(qx, qx);
    for (int r = 0; r < nr; r++) {
        const aq8_t *ab = AQ8(r, b);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)ab->qs);
        const __m256 p = mul_sum_us8_float(ax, _mm256_sign_epi8(qy, qx));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab->d), p, acc[r]);
    }
}

/* unsigned legacy blocks with a min: w = d * q + m */
INLINE void dot_unsigned32(const int nr, const __m256i qx, const float dw, const float mw,
                           const uint8_t *a, int64_t as, int64_t b, __m256 *acc, float *accm) {
    for (int r = 0; r < nr; r++) {
        const aq8_t *ab = AQ8(r, b);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)ab->qs);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab->d), mul_sum_us8_float(qx, qy), acc[r]);
        accm[r] += mw * ab->s;
    }
}

/* One block of each legacy type into acc/accm (two accumulator sets alternate, see LEGACY) */
INLINE void blk_q8_0(const int nr, const uint8_t *w, const uint8_t *a, int64_t as, int64_t b,
                     __m256 *acc, float *accm) {
    (void)accm;
    const uint8_t *wb = w + b * 34;
    dot_signed32(nr, _mm256_loadu_si256((const __m256i *)(wb + 2)), load_f16(wb), a, as, b, acc);
}

INLINE void blk_q4_0(const int nr, const uint8_t *w, const uint8_t *a, int64_t as, int64_t b,
                     __m256 *acc, float *accm) {
    (void)accm;
    const uint8_t *wb = w + b * 18;
    const __m256i qx = _mm256_sub_epi8(bytes_from_nibbles_32(wb + 2), _mm256_set1_epi8(8));
    dot_signed32(nr, qx, load_f16(wb), a, as, b, acc);
}

INLINE void blk_q4_1(const int nr, const uint8_t *w, const uint8_t *a, int64_t as, int64_t b,
                     __m256 *acc, float *accm) {
    const uint8_t *wb = w + b * 20;
    dot_unsigned32(nr, bytes_from_nibbles_32(wb + 4), load_f16(wb), load_f16(wb + 2), a, as, b,
                   acc, accm);
}

INLINE void blk_q5_0(const int nr, const uint8_t *w, const uint8_t *a, int64_t as, int64_t b,
                     __m256 *acc, float *accm) {
    (void)accm;
    const uint8_t *wb = w + b * 22;
    /* high bit clear -> nibble - 16 == nibble | 0xF0 as int8 */
    const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(wb + 2), _mm256_set1_epi8((char)0xF0));
    dot_signed32(nr, _mm256_or_si256(bytes_from_nibbles_32(wb + 6), hi), load_f16(wb), a, as, b,
                 acc);
}

INLINE void blk_q5_1(const int nr, const uint8_t *w, const uint8_t *a, int64_t as, int64_t b,
                     __m256 *acc, float *accm) {
    const uint8_t *wb = w + b * 24;
    const __m256i hi = _mm256_and_si256(bytes_from_bits_32(wb + 4), _mm256_set1_epi8(0x10));
    dot_unsigned32(nr, _mm256_or_si256(bytes_from_nibbles_32(wb + 8), hi), load_f16(wb),
                   load_f16(wb + 2), a, as, b, acc, accm);
}

/* Two accumulator sets, even and odd blocks: the fmadd latency chain is halved. */
#define LEGACY(type)                                                                          \
    INLINE void dot_##type##_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as,    \
                               const int nr, float *out) {                                    \
        __m256 acc0[MAXR], acc1[MAXR];                                                        \
        float accm[MAXR];                                                                     \
        for (int r = 0; r < nr; r++) {                                                        \
            acc0[r] = acc1[r] = _mm256_setzero_ps();                                          \
            accm[r] = 0.0f;                                                                   \
        }                                                                                     \
        int64_t b = 0;                                                                        \
        for (; b + 1 < nb; b += 2) {                                                          \
            blk_##type(nr, w, a, as, b, acc0, accm);                                          \
            blk_##type(nr, w, a, as, b + 1, acc1, accm);                                      \
        }                                                                                     \
        if (b < nb) blk_##type(nr, w, a, as, b, acc0, accm);                                  \
        for (int r = 0; r < nr; r++)                                                          \
            out[r] = hsum_float_8(_mm256_add_ps(acc0[r], acc1[r])) + accm[r];                 \
    }
LEGACY(q8_0)
LEGACY(q4_0)
LEGACY(q4_1)
LEGACY(q5_0)
LEGACY(q5_1)

/* sum over 8 sub-blocks of mins * (activation sums of the sub-block) */
static inline int k_min_sum(const uint8_t *mn, const int16_t *bsums) {
    const __m256i bs = _mm256_loadu_si256((const __m256i *)bsums);
    const __m128i sums = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    uint64_t m8;
    memcpy(&m8, mn, 8);
    const __m128i prod = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)m8)), sums);
    const __m128i s2 = _mm_add_epi32(prod, _mm_unpackhi_epi64(prod, prod));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
}

/* Q4_K (hmask == NULL) and Q5_K (5th bit from hmask): 8 sub-blocks of 32, 6-bit scale/min */
INLINE void dot_k45(int64_t nb, const uint8_t *w, int64_t bytes, int qoff, int hoff,
                    const uint8_t *a, int64_t as, const int nr, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc[MAXR];
    float accm[MAXR];
    for (int r = 0; r < nr; r++) {
        acc[r] = _mm256_setzero_ps();
        accm[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * bytes;
        const float d = load_f16(wb), dmin = load_f16(wb + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(wb + 4, sc, mn);
        __m256i sumi[MAXR];
        for (int r = 0; r < nr; r++) sumi[r] = _mm256_setzero_si256();
        __m256i hb = hoff ? _mm256_loadu_si256((const __m256i *)(wb + hoff)) : _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qv = _mm256_loadu_si256((const __m256i *)(wb + qoff + 32 * j));
            __m256i lo = _mm256_and_si256(qv, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
            if (hoff) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4));
                hb = _mm256_srli_epi16(hb, 2);
            }
            const __m256i sl = _mm256_set1_epi16(sc[2 * j]), sh = _mm256_set1_epi16(sc[2 * j + 1]);
            for (int r = 0; r < nr; r++) {
                const int8_t *qy = AQK(r, b)->qs + 64 * j;
                const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)qy)), sl);
                const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(qy + 32))), sh);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
            }
        }
        for (int r = 0; r < nr; r++) {
            const aqk_t *ab = AQK(r, b);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab->d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            accm[r] += dmin * ab->d * (float)k_min_sum(mn, ab->bsums);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum_float_8(acc[r]) - accm[r];
}

INLINE void dot_q4_k_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) {
    dot_k45(nb, w, 144, 16, 0, a, as, nr, out);
}

INLINE void dot_q5_k_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) {
    dot_k45(nb, w, 176, 48, 16, a, as, nr, out);
}

INLINE void dot_q6_k_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    __m256 acc[MAXR];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * 210;
        const int8_t *scales = (const int8_t *)(wb + 192);
        const float d = load_f16(wb + 208);
        __m256i sumi[MAXR];
        /* q is stored as q + 32 (unsigned); take 32 * sum(scale * activation sums) off at the end */
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)scales));
        for (int r = 0; r < nr; r++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)AQK(r, b)->bsums);
            sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
        }
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = wb + 64 * h, *qh = wb + 128 + 32 * h;
            const int8_t *sc = scales + 8 * h;
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i hv = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hv, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2), m3), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 4), m3), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 6), m3), 4));
            for (int k = 0; k < 4; k++) {
                const __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[2 * k + 1]), _mm_set1_epi16(sc[2 * k]));
                for (int r = 0; r < nr; r++) {
                    const int8_t *qy = AQK(r, b)->qs + 128 * h + 32 * k;
                    const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)qy));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, s));
                }
            }
        }
        for (int r = 0; r < nr; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * AQK(r, b)->d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
    }
    for (int r = 0; r < nr; r++) out[r] = hsum_float_8(acc[r]);
}

#else /* portable C: the compiler vectorizes what it can (NEON on ARM, untested) */

INLINE void dot_q8_0_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) {
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * 34;
            const int8_t *qx = (const int8_t *)(wb + 2);
            const aq8_t *ab = AQ8(r, b);
            int s = 0;
            for (int i = 0; i < QK; i++) s += qx[i] * ab->qs[i];
            acc += load_f16(wb) * ab->d * (float)s;
        }
        out[r] = acc;
    }
}

/* legacy 4/5-bit blocks: value j from the low nibble of qs[j], j + 16 from the high nibble;
 * offset 8/16 for the signed types, min m for the unsigned ones */
INLINE void dot_legacy_scalar(int64_t nb, const uint8_t *w, int64_t bytes, int has_min, int has_hi,
                              const uint8_t *a, int64_t as, const int nr, float *out) {
    const int qoff = 2 + 2 * has_min + 4 * has_hi;
    const int offset = has_min ? 0 : (has_hi ? 16 : 8);
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * bytes, *qs = wb + qoff;
            uint32_t qh = 0;
            if (has_hi) memcpy(&qh, wb + 2 + 2 * has_min, 4);
            const aq8_t *ab = AQ8(r, b);
            int s = 0;
            for (int j = 0; j < 16; j++) {
                const int h0 = has_hi ? (int)(((qh >> j) << 4) & 0x10) : 0;
                const int h1 = has_hi ? (int)((qh >> (j + 12)) & 0x10) : 0;
                s += (((qs[j] & 0xF) | h0) - offset) * ab->qs[j];
                s += (((qs[j] >> 4) | h1) - offset) * ab->qs[j + 16];
            }
            acc += load_f16(wb) * ab->d * (float)s;
            if (has_min) acc += load_f16(wb + 2) * ab->s;
        }
        out[r] = acc;
    }
}

INLINE void dot_q4_0_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) { dot_legacy_scalar(nb, w, 18, 0, 0, a, as, nr, out); }
INLINE void dot_q4_1_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) { dot_legacy_scalar(nb, w, 20, 1, 0, a, as, nr, out); }
INLINE void dot_q5_0_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) { dot_legacy_scalar(nb, w, 22, 0, 1, a, as, nr, out); }
INLINE void dot_q5_1_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) { dot_legacy_scalar(nb, w, 24, 1, 1, a, as, nr, out); }

INLINE void dot_k45_scalar(int64_t nb, const uint8_t *w, int64_t bytes, int qoff, int hoff,
                           const uint8_t *a, int64_t as, const int nr, float *out) {
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * bytes, *qs = wb + qoff, *qh = wb + hoff;
            const aqk_t *ab = AQK(r, b);
            uint8_t sc[8], mn[8];
            k_scale_min(wb + 4, sc, mn);
            int sumi = 0, summ = 0;
            for (int j = 0; j < 4; j++) {
                int slo = 0, shi = 0;
                for (int l = 0; l < 32; l++) {
                    int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
                    if (hoff) {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    slo += lo * ab->qs[64 * j + l];
                    shi += hi * ab->qs[64 * j + 32 + l];
                }
                sumi += sc[2 * j] * slo + sc[2 * j + 1] * shi;
                summ += mn[2 * j] * (ab->bsums[4 * j] + ab->bsums[4 * j + 1]) +
                        mn[2 * j + 1] * (ab->bsums[4 * j + 2] + ab->bsums[4 * j + 3]);
            }
            acc += ab->d * (load_f16(wb) * (float)sumi - load_f16(wb + 2) * (float)summ);
        }
        out[r] = acc;
    }
}

INLINE void dot_q4_k_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) { dot_k45_scalar(nb, w, 144, 16, 0, a, as, nr, out); }
INLINE void dot_q5_k_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) { dot_k45_scalar(nb, w, 176, 48, 16, a, as, nr, out); }

INLINE void dot_q6_k_n(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, const int nr,
                       float *out) {
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w + b * 210;
            const int8_t *scales = (const int8_t *)(wb + 192);
            const aqk_t *ab = AQK(r, b);
            int sumi = 0;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = wb + 64 * h, *qh = wb + 128 + 32 * h;
                const int8_t *sc = scales + 8 * h, *qy = ab->qs + 128 * h;
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    const int q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                    const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    sumi += sc[is] * q1 * qy[l] + sc[is + 2] * q2 * qy[l + 32] +
                            sc[is + 4] * q3 * qy[l + 64] + sc[is + 6] * q4 * qy[l + 96];
                }
            }
            acc += load_f16(wb + 208) * ab->d * (float)sumi;
        }
        out[r] = acc;
    }
}

#endif

/* nr as a compile-time constant in every inlined body, so the per-row loops unroll */
typedef void (*dot_fn)(int64_t, const uint8_t *, const uint8_t *, int64_t, int, float *);
#define DISPATCH(name)                                                                      \
    static void name(int64_t nb, const uint8_t *w, const uint8_t *a, int64_t as, int nr,    \
                     float *out) {                                                          \
        switch (nr) {                                                                       \
        case 1: name##_n(nb, w, a, as, 1, out); break;                                      \
        case 2: name##_n(nb, w, a, as, 2, out); break;                                      \
        case 3: name##_n(nb, w, a, as, 3, out); break;                                      \
        default: name##_n(nb, w, a, as, 4, out); break;                                     \
        }                                                                                   \
    }
DISPATCH(dot_q8_0)
DISPATCH(dot_q4_0)
DISPATCH(dot_q4_1)
DISPATCH(dot_q5_0)
DISPATCH(dot_q5_1)
DISPATCH(dot_q4_k)
DISPATCH(dot_q5_k)
DISPATCH(dot_q6_k)

typedef struct { int block; int type_size; int kquant; dot_fn fn; } type_info;

static int info_for(int qtype, type_info *t) {
    switch (qtype) {
    case T_Q8_0: *t = (type_info){QK, 34, 0, dot_q8_0}; return 1;
    case T_Q4_0: *t = (type_info){QK, 18, 0, dot_q4_0}; return 1;
    case T_Q4_1: *t = (type_info){QK, 20, 0, dot_q4_1}; return 1;
    case T_Q5_0: *t = (type_info){QK, 22, 0, dot_q5_0}; return 1;
    case T_Q5_1: *t = (type_info){QK, 24, 0, dot_q5_1}; return 1;
    case T_Q4_K: *t = (type_info){QKK, 144, 1, dot_q4_k}; return 1;
    case T_Q5_K: *t = (type_info){QKK, 176, 1, dot_q5_k}; return 1;
    case T_Q6_K: *t = (type_info){QKK, 210, 1, dot_q6_k}; return 1;
    default: return 0;
    }
}

/* ---- exported ---------------------------------------------------------------------------- */

/* The ISA this build was compiled for (the loader checks it matches what it asked for). */
const char *pq_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx512vnni";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}

long long pq_call_count(void) { return __atomic_load_n(&call_count, __ATOMIC_RELAXED); }

/* Bytes of one quantized activation row of k values; 0 when the type has no kernel here. */
int64_t pq_act_row_bytes(int qtype, int64_t k) {
    type_info t;
    if (!info_for(qtype, &t) || k % t.block) return 0;
    return k / t.block * (int64_t)(t.kquant ? sizeof(aqk_t) : sizeof(aq8_t));
}

/* y[i * ldy + j] = sum_k x[i, k] * W[j, k] for i < m, j < n. W: n rows of row_bytes packed bytes.
 * abuf: at least m * pq_act_row_bytes(qtype, k) bytes of scratch. Returns 0, or -1 on a type
 * or shape this library cannot do (the caller then uses its torch path). */
int pq_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
              const float *x, int64_t m, float *y, int64_t ldy, uint8_t *abuf, int nthreads) {
    type_info t;
    const int64_t arow = pq_act_row_bytes(qtype, k);
    if (!info_for(qtype, &t) || arow == 0 || row_bytes != k / t.block * t.type_size) return -1;
    __atomic_fetch_add(&call_count, 1, __ATOMIC_RELAXED);
    const int64_t nb = k / t.block, nchunks = (n + ROW_CHUNK - 1) / ROW_CHUNK;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (t.kquant) quantize_row_q8k(x + i * k, (aqk_t *)(abuf + i * arow), k);
            else quantize_row_q8(x + i * k, (aq8_t *)(abuf + i * arow), k);
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t r0 = c * ROW_CHUNK, r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
            for (int64_t m0 = 0; m0 < m; m0 += MAXR) {
                const int nr = m - m0 < MAXR ? (int)(m - m0) : MAXR;
                for (int64_t j = r0; j < r1; j++) {
                    float out[MAXR];
                    t.fn(nb, w + j * row_bytes, abuf + m0 * arow, arow, nr, out);
                    for (int r = 0; r < nr; r++) y[(m0 + r) * ldy + j] = out[r];
                }
            }
        }
    }
    return 0;
}
