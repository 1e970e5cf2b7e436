/* Fused fp32 ops for the decode step on CPU: RMSNorm, rope in place, the SiLU gate, and
 * attention straight from the paged KV cache.
 *
 * At decode sizes (one token, a 576-wide hidden state) each torch op costs 3-10 us of dispatch
 * while its arithmetic takes well under one, and a layer runs about 40 of them: on SmolLM2 that
 * overhead outweighed the weight matmuls. Each function here replaces 4-12 of those ops with one
 * call. Attention reads each key and value where it lies in the cache (no gathered copy of the
 * context, no padding to the longest row of the batch) with a chunked online softmax.
 *
 * Compiled into the same library as kernels.c (see native.py); fp32 only, plain C, the
 * compiler vectorizes the `omp simd` loops. Every function returns 0, or -1 on an argument it
 * refuses (a position or cache slot out of range), and then writes nothing the caller reads.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define KEY_CHUNK 64       /* keys scored per pass before the running softmax is rescaled */
#define MAX_GROUP 64       /* query heads per KV head the stack buffers hold */
#define MAX_HEAD_DIM 512
#define PARALLEL_MIN_WORK (1 << 17) /* multiply-adds below which one thread is faster */

#if defined(__AVX2__) && defined(__FMA__)
/* exp of 8 lanes (Cephes' expf: 2^n times a degree-7 polynomial of the remainder), within 2 ulp
 * of expf for |x| < 88; glibc's scalar expf alone cost more than the rest of attention. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                     _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* v[i] = exp(v[i] - shift) for i < n; returns their sum. */
static inline float exp_shifted(float *v, int64_t n, float shift) {
    float sum = 0.f;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 total = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(v + i, e);
        total = _mm256_add_ps(total, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, total);
    for (int l = 0; l < 8; l++) sum += lanes[l];
#endif
    for (; i < n; i++) {
        v[i] = expf(v[i] - shift);
        sum += v[i];
    }
    return sum;
}

/* out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) for rows of dim (transformers' order). */
int pq_rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim,
                float eps, int nthreads) {
#pragma omp parallel for if (rows * dim >= PARALLEL_MIN_WORK) num_threads(nthreads < 1 ? 1 : nthreads)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) sum += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
    return 0;
}

/* Rotates, in place, the first `rotary_dim` channels of `heads` heads of each of `tokens` rows
 * (rotate-half layout: x1*cos - x2*sin | x2*cos + x1*sin) by the table rows at positions[t].
 * x: token t's head h starts at x + t * token_stride + h * head_dim. cos, sin: [max_pos, rotary_dim / 2]. */
int pq_rope(float *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim,
            int64_t rotary_dim, const int64_t *positions, const float *cos_table,
            const float *sin_table, int64_t max_pos) {
    const int64_t half = rotary_dim / 2;
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_pos) return -1;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_table + positions[t] * half, *s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * token_stride + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
    return 0;
}

/* out[t, i] = silu(gate) * up for gate_up rows [gate (inter) | up (inter)]. */
int pq_silu_mul(const float *gate_up, float *out, int64_t tokens, int64_t inter, int nthreads) {
#pragma omp parallel for if (tokens * inter >= PARALLEL_MIN_WORK) num_threads(nthreads < 1 ? 1 : nthreads)
    for (int64_t t = 0; t < tokens; t++) {
        const float *g = gate_up + t * 2 * inter, *u = g + inter;
        float *o = out + t * inter;
        int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= inter; i += 8) {
            const __m256 gate = _mm256_loadu_ps(g + i);
            const __m256 sigmoid_denominator = _mm256_add_ps(
                _mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gate, sigmoid_denominator),
                                                  _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    return 0;
}

static inline float dot(const float *a, const float *b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 16 == 0) {  /* two independent chains: a dot is latency-bound, not FMA-bound */
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        }
        const __m256 s = _mm256_add_ps(s0, s1);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* acc[d] += sum_j p[j] * values[j][d]. Keys run innermost so that the accumulators stay in
 * registers (updating acc in memory once per key chains every key through a store and a load,
 * which made this loop 4x slower). */
static inline void accumulate_values(float *acc, const float *p, const float *const *values,
                                     int64_t count, int64_t head_dim) {
    int64_t d0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; d0 + 32 <= head_dim; d0 += 32) {
        __m256 a0 = _mm256_loadu_ps(acc + d0), a1 = _mm256_loadu_ps(acc + d0 + 8);
        __m256 a2 = _mm256_loadu_ps(acc + d0 + 16), a3 = _mm256_loadu_ps(acc + d0 + 24);
        for (int64_t j = 0; j < count; j++) {
            const __m256 w = _mm256_set1_ps(p[j]);
            const float *v = values[j] + d0;
            a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(acc + d0, a0);
        _mm256_storeu_ps(acc + d0 + 8, a1);
        _mm256_storeu_ps(acc + d0 + 16, a2);
        _mm256_storeu_ps(acc + d0 + 24, a3);
    }
#endif
    for (; d0 < head_dim; d0 += 8) {  /* portable: 8 columns at a time, kept in a local */
        const int64_t width = head_dim - d0 < 8 ? head_dim - d0 : 8;
        float a[8];
        for (int64_t d = 0; d < width; d++) a[d] = acc[d0 + d];
        for (int64_t j = 0; j < count; j++)
            for (int64_t d = 0; d < width; d++) a[d] += p[j] * values[j][d0 + d];
        for (int64_t d = 0; d < width; d++) acc[d0 + d] = a[d];
    }
}

/* One decode row's query heads [h0, h0 + group) that share KV head `kv`, over keys [start, len). */
static int attend_group(const float *q, const float *k_cache, const float *v_cache,
                        int64_t num_slots, int64_t kv_heads, int64_t head_dim,
                        const int64_t *slots, int64_t start, int64_t len, int64_t kv,
                        int64_t group, const float *sinks, float scale, float *out) {
    float running_max[group], denominator[group], scores[group][KEY_CHUNK], acc[group * head_dim];
    for (int64_t g = 0; g < group; g++) {
        running_max[g] = -INFINITY;
        denominator[g] = 0.f;
    }
    for (int64_t i = 0; i < group * head_dim; i++) acc[i] = 0.f;
    for (int64_t c0 = start; c0 < len; c0 += KEY_CHUNK) {
        const int64_t count = len - c0 < KEY_CHUNK ? len - c0 : KEY_CHUNK;
        for (int64_t j = 0; j < count; j++) {
            const int64_t slot = slots[c0 + j];
            if (slot < 0 || slot >= num_slots) return -1;
            const float *key = k_cache + (slot * kv_heads + kv) * head_dim;
            for (int64_t g = 0; g < group; g++) scores[g][j] = scale * dot(q + g * head_dim, key, head_dim);
        }
        for (int64_t g = 0; g < group; g++) {
            float chunk_max = running_max[g];
            for (int64_t j = 0; j < count; j++) chunk_max = scores[g][j] > chunk_max ? scores[g][j] : chunk_max;
            const float correction = expf(running_max[g] - chunk_max);  /* exp(-inf) = 0 at first */
            denominator[g] = denominator[g] * correction + exp_shifted(scores[g], count, chunk_max);
            running_max[g] = chunk_max;
            float *a = acc + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) a[d] *= correction;
        }
        const float *values[KEY_CHUNK];
        for (int64_t j = 0; j < count; j++)
            values[j] = v_cache + (slots[c0 + j] * kv_heads + kv) * head_dim;
        for (int64_t g = 0; g < group; g++)
            accumulate_values(acc + g * head_dim, scores[g], values, count, head_dim);
    }
    for (int64_t g = 0; g < group; g++) {
        /* a sink is one more logit in the denominator, with no value */
        float denom = denominator[g];
        if (sinks != NULL) {
            const float sink = sinks[kv * group + g] /* head h0 + g */, top = fmaxf(running_max[g], sink);
            denom = denom * expf(running_max[g] - top) + expf(sink - top);
            const float rescale = expf(running_max[g] - top);
            for (int64_t d = 0; d < head_dim; d++) acc[g * head_dim + d] *= rescale;
        }
        const float inv = 1.0f / denom;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) out[g * head_dim + d] = acc[g * head_dim + d] * inv;
    }
    return 0;
}

/* Decode attention from the paged cache: for each row b, each query head h attends to keys
 * [max(0, len_b - window), len_b) (window 0: all) whose cache slots are table[b * width + j].
 * q: row b's head h at q + b * q_stride + h * head_dim; caches [num_slots, kv_heads, head_dim];
 * query head h reads KV head h / (heads / kv_heads); sinks: NULL or [heads] extra logits;
 * out: [batch, heads, head_dim]. -1 on a length or slot out of range, or heads that do not
 * divide into kv_heads groups of at most MAX_GROUP. */
int pq_decode_attention(const float *q, int64_t q_stride, const float *k_cache,
                        const float *v_cache, int64_t num_slots, int64_t kv_heads,
                        int64_t head_dim, const int64_t *table, int64_t width,
                        const int64_t *lens, int64_t batch, int64_t heads, int64_t window,
                        const float *sinks, float scale, float *out, int nthreads) {
    if (kv_heads < 1 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP ||
        head_dim > MAX_HEAD_DIM)
        return -1;
    int64_t total_keys = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (lens[b] < 1 || lens[b] > width) return -1;
        total_keys += lens[b];
    }
    const int64_t group = heads / kv_heads, tasks = batch * kv_heads;
    int failed = 0;
#pragma omp parallel for if (total_keys * heads * head_dim >= PARALLEL_MIN_WORK && tasks > 1) \
    num_threads(nthreads < 1 ? 1 : nthreads) schedule(dynamic, 1) reduction(| : failed)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / kv_heads, kv = task % kv_heads, len = lens[b];
        const int64_t start = window > 0 && len > window ? len - window : 0;
        const int64_t h0 = kv * group;
        failed |= attend_group(q + b * q_stride + h0 * head_dim, k_cache, v_cache, num_slots,
                               kv_heads, head_dim, table + b * width, start, len, kv, group,
                               sinks, scale,
                               out + (b * heads + h0) * head_dim) != 0;
    }
    return failed ? -1 : 0;
}

/* ---- a whole decode step of a shard's dense layers in one call -------------------------------
 * At decode sizes Python and torch dispatch cost more than the arithmetic, so a pure decode step
 * of Llama-style layers (RMSNorm, q|k|v with optional bias and per-head q/k norm, rope, paged
 * attention, o, SiLU-gated MLP) whose weights are all packed runs here, layer after layer, in
 * the order the torch modules run it. The caller (decode_plan.py) describes the layers once. */

int pq_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
              const float *x, int64_t m, float *y, int64_t ldy, int nthreads);
int pq_matmul_q8(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
                 const float *x, int64_t m, float *y, int64_t ldy, int nthreads);
int pq_gemm(int qtype, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k,
            const float *x, int64_t m, float *y, int64_t ldy, int nthreads);
int pq_gemm_min_rows(int qtype, int int8_activations);

#define MAX_SEGMENTS 4

typedef struct { /* rows of one GGUF type, written after the previous segments' columns */
    int64_t qtype, int8_activations;
    const uint8_t *weight;
    int64_t row_bytes, rows;
} pq_segment;

typedef struct {
    int64_t in_features, out_features, num_segments;
    pq_segment segments[MAX_SEGMENTS];
    const float *bias; /* NULL or [out_features] */
} pq_linear;

typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q/k norms: NULL or [head_dim] */
    float *k_cache, *v_cache;                               /* [num_slots, kv_heads, head_dim] */
    pq_linear qkv, o, gate_up, down;
} pq_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, rotary_dim, intermediate, num_slots,
        max_positions;
    float eps, scale;
    const float *cos, *sin; /* [max_positions, rotary_dim / 2] */
} pq_dims;

static int linear(const pq_linear *l, const float *x, int64_t m, float *y, int nthreads) {
    int64_t offset = 0;
    for (int64_t s = 0; s < l->num_segments; s++) {
        const pq_segment *seg = &l->segments[s];
        const int int8 = (int)seg->int8_activations;
        const int status = (m >= pq_gemm_min_rows((int)seg->qtype, int8) ? pq_gemm
                            : int8 ? pq_matmul_q8 : pq_matmul)(
            (int)seg->qtype, seg->weight, seg->row_bytes, seg->rows, l->in_features, x, m,
            y + offset, l->out_features, nthreads);
        if (status != 0) return status;
        offset += seg->rows;
    }
    if (l->bias != NULL)
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < l->out_features; j++) y[r * l->out_features + j] += l->bias[j];
    return 0;
}

static void add_rows(float *hidden, const float *delta, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) hidden[i] += delta[i];
}

static int decode_layer(const pq_dims *d, const pq_layer *l, float *hidden, int64_t batch,
                        const int64_t *positions, const int64_t *slot_mapping,
                        const int64_t *table, int64_t width, const int64_t *lens,
                        float *normed, float *qkv, float *attended, float *projected,
                        float *gate_up, float *activated, int nthreads) {
    const int64_t hd = d->head_dim, qkv_width = (d->heads + 2 * d->kv_heads) * hd;
    const int64_t kv_width = d->kv_heads * hd;
    int status = 0;
    pq_rms_norm(hidden, l->input_norm, normed, batch, d->hidden, d->eps, 1);
    if ((status = linear(&l->qkv, normed, batch, qkv, nthreads)) != 0) return status;
    for (int64_t b = 0; l->q_norm != NULL && b < batch; b++) { /* Qwen3: per-head norms, in place */
        float *row = qkv + b * qkv_width;
        pq_rms_norm(row, l->q_norm, row, d->heads, hd, d->eps, 1);
        pq_rms_norm(row + d->heads * hd, l->k_norm, row + d->heads * hd, d->kv_heads, hd,
                    d->eps, 1);
    }
    if (pq_rope(qkv, batch, qkv_width, d->heads + d->kv_heads, hd, d->rotary_dim, positions,
                d->cos, d->sin, d->max_positions) != 0)
        return -1;
    for (int64_t b = 0; b < batch; b++) {
        const float *row = qkv + b * qkv_width;
        float *k_slot = l->k_cache + slot_mapping[b] * kv_width;
        float *v_slot = l->v_cache + slot_mapping[b] * kv_width;
        for (int64_t i = 0; i < kv_width; i++) {
            k_slot[i] = row[d->heads * hd + i];
            v_slot[i] = row[(d->heads + d->kv_heads) * hd + i];
        }
    }
    if (pq_decode_attention(qkv, qkv_width, l->k_cache, l->v_cache, d->num_slots, d->kv_heads,
                            hd, table, width, lens, batch, d->heads, 0, NULL, d->scale,
                            attended, nthreads) != 0)
        return -1;
    if ((status = linear(&l->o, attended, batch, projected, nthreads)) != 0) return status;
    add_rows(hidden, projected, batch * d->hidden);
    pq_rms_norm(hidden, l->post_norm, normed, batch, d->hidden, d->eps, 1);
    if ((status = linear(&l->gate_up, normed, batch, gate_up, nthreads)) != 0) return status;
    pq_silu_mul(gate_up, activated, batch, d->intermediate, 1);
    if ((status = linear(&l->down, activated, batch, projected, nthreads)) != 0) return status;
    add_rows(hidden, projected, batch * d->hidden);
    return 0;
}

/* hidden [batch, d->hidden] (in place) through num_layers layers, for one decode token per row
 * at positions[b], stored in cache slot slot_mapping[b], attending to the keys at
 * table[b * width + j] for j < lens[b]. Returns 0; -1 on a position, slot or length out of
 * range (hidden is then partly updated: the caller fails the step); -2 when the scratch buffer
 * cannot be allocated. */
int pq_decode_layers(const pq_dims *d, const pq_layer *layers, int64_t num_layers,
                     float *hidden, int64_t batch, const int64_t *positions,
                     const int64_t *slot_mapping, const int64_t *table, int64_t width,
                     const int64_t *lens, int nthreads) {
    for (int64_t b = 0; b < batch; b++)
        if (slot_mapping[b] < 0 || slot_mapping[b] >= d->num_slots) return -1;
    const int64_t qkv_width = (d->heads + 2 * d->kv_heads) * d->head_dim;
    const int64_t per_row = d->hidden * 2 + qkv_width + d->heads * d->head_dim +
                            d->intermediate * 3;
    float *scratch = malloc((size_t)(per_row * batch) * sizeof(float));
    if (scratch == NULL) return -2;
    float *normed = scratch, *projected = normed + batch * d->hidden;
    float *qkv = projected + batch * d->hidden, *attended = qkv + batch * qkv_width;
    float *gate_up = attended + batch * d->heads * d->head_dim;
    float *activated = gate_up + batch * 2 * d->intermediate;
    int status = 0;
    for (int64_t i = 0; i < num_layers && status == 0; i++)
        status = decode_layer(d, &layers[i], hidden, batch, positions, slot_mapping, table,
                              width, lens, normed, qkv, attended, projected, gate_up,
                              activated, nthreads);
    free(scratch);
    return status;
}
