/* A few tokens through the chosen experts of an int8 ReLU FFN in expert order, in QAT's arithmetic.
 *
 * The two integer products read only the experts some token chose, in place and in memory order,
 * each expert's weights once for all the tokens that chose it, and sum exactly in int32; the
 * quantization and scaling around them repeat Int8MoEFFN._sparse's fp32 operations in its order
 * (built without FMA contraction), so the result is its result bit for bit. Inputs are int8 in [-127, 127] (the quantizer's range), which keeps
 * maddubs's pairwise int16 sums clear of saturation.
 *
 * With AVX2 a 32-lane product is |x| (unsigned) times w carrying x's sign, pairs summed to int16
 * (maddubs), then to int32 (madd), or with AVX512-VNNI in one dpbusd; SSSE3 does 16 lanes; the rest
 * is plain C. Threads: OpenMP, linked against the libgomp that torch has already loaded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __SSSE3__
#include <immintrin.h>
#endif

/* acc + the sums of each 4 adjacent products x w, ax = |x|: with VNNI one instruction (dpbusd, exact in
 * int32), else maddubs and madd, whose int16 pair sums stay below 2 * 127 * 127 and so are exact too. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#endif
#ifdef __AVX2__
static inline __m256i madd32(__m256i acc, __m256i ax, __m256i x, __m256i w) {
#ifdef VNNI
    return _mm256_dpbusd_epi32(acc, ax, _mm256_sign_epi8(w, x));
#else
    __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}
#endif
#ifdef __SSSE3__
static inline __m128i madd16(__m128i acc, __m128i ax, __m128i x, __m128i w) {
#ifdef VNNI
    return _mm_dpbusd_epi32(acc, ax, _mm_sign_epi8(w, x));
#else
    __m128i p = _mm_maddubs_epi16(ax, _mm_sign_epi8(w, x));
    return _mm_add_epi32(acc, _mm_madd_epi16(p, _mm_set1_epi16(1)));
#endif
}
static inline int32_t hsum128(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

/* sum_k x[k] w[k] */
static int32_t dot(const int8_t *x, const int8_t *w, int64_t n) {
    int64_t k = 0;
    int32_t s = 0;
#ifdef __SSSE3__
    __m128i acc = _mm_setzero_si128();
#ifdef __AVX2__
    __m256i acc8 = _mm256_setzero_si256();
    for (; k + 32 <= n; k += 32) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
        acc8 = madd32(acc8, _mm256_abs_epi8(xv), xv, _mm256_loadu_si256((const __m256i *)(w + k)));
    }
    acc = _mm_add_epi32(_mm256_castsi256_si128(acc8), _mm256_extracti128_si256(acc8, 1));
#endif
    for (; k + 16 <= n; k += 16) {
        __m128i xv = _mm_loadu_si128((const __m128i *)(x + k));
        acc = madd16(acc, _mm_abs_epi8(xv), xv, _mm_loadu_si128((const __m128i *)(w + k)));
    }
    s = hsum128(acc);
#endif
    for (; k < n; k++) s += x[k] * w[k];
    return s;
}

/* Which tokens chose each expert: for the used experts (ascending) ``users[start[u]:start[u + 1]]``
 * holds t * topk + k for each token t whose k-th expert (its list sorted) is used[u], and
 * ``token`` the same places' t. */
typedef struct { int64_t n_used, *used, *start, *users, *token; } routing;

static int route(const int64_t *chosen, int64_t tokens, int64_t topk, int64_t num_expert, routing *r) {
    int64_t *count = calloc(num_expert + 1, sizeof(int64_t));
    r->used = malloc(num_expert * sizeof(int64_t));
    r->start = malloc((num_expert + 1) * sizeof(int64_t));
    r->users = malloc(tokens * topk * sizeof(int64_t));
    r->token = malloc(tokens * topk * sizeof(int64_t));
    if (!count || !r->used || !r->start || !r->users || !r->token) { free(count); return -1; }
    for (int64_t k = 0; k < tokens * topk; k++) count[chosen[k]]++;
    r->n_used = 0;
    int64_t *fill = count;  /* reused: the next free place of each used expert */
    for (int64_t e = 0, at = 0; e < num_expert; e++) {
        if (!count[e]) continue;
        r->used[r->n_used] = e;
        r->start[r->n_used++] = at;
        at += count[e];
        fill[e] = r->start[r->n_used - 1];
    }
    r->start[r->n_used] = tokens * topk;
    for (int64_t k = 0; k < tokens * topk; k++) {  /* t ascending */
        r->token[fill[chosen[k]]] = k / topk;
        r->users[fill[chosen[k]]++] = k;
    }
    free(count);
    return 0;
}

/* out[j] = x[j] . w for count (at most 4) tokens x[j], xu[j] = x[j] + 128 (unsigned): with
 * AVX512-VNNI in one pass over w, 64 lanes at a time, as sum (x + 128) w - 128 sum w (dpbusd's
 * u8 x s8 products, exact in int32; the tail in plain C), else one dot per token. */
static void row_dots(const int8_t *w, const int8_t *const x[4], const uint8_t *const xu[4], int count, int64_t n,
                     int32_t out[4]) {
#if defined(VNNI) && defined(__AVX512BW__)
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    __m512i wsum = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
    int64_t k = 0;
    for (; k + 64 <= n; k += 64) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + k));
        wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
        for (int j = 0; j < count; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512((const void *)(xu[j] + k)), wv);
    }
    int32_t shift = 128 * _mm512_reduce_add_epi32(wsum);
    for (int j = 0; j < count; j++) {
        int32_t s = _mm512_reduce_add_epi32(acc[j]) - shift;
        for (int64_t m = k; m < n; m++) s += x[j][m] * w[m];
        out[j] = s;
    }
#else
    (void)xu;
    for (int j = 0; j < count; j++) out[j] = dot(x[j], w, n);
#endif
}

/* acc[t][k * size + i] = q_x[t] . w1[chosen[t][k] * size + i]: each used expert's rows once, split
 * over the threads, for every token that chose it, 4 tokens per pass over a row; xu = q_x + 128. */
static void gemv_in(const int8_t *q_x, const uint8_t *xu, const int8_t *w1, int64_t d, const routing *r,
                    int64_t size, int32_t *acc, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < r->n_used * size; item++) {
        int64_t u = item / size, i = item % size;
        const int8_t *row = w1 + (r->used[u] * size + i) * d;
        for (int64_t s = r->start[u]; s < r->start[u + 1]; s += 4) {
            int count = r->start[u + 1] - s < 4 ? (int)(r->start[u + 1] - s) : 4;
            const int8_t *xs[4];
            const uint8_t *xus[4];
            int32_t out[4];
            for (int j = 0; j < count; j++) xs[j] = q_x + r->token[s + j] * d, xus[j] = xu + r->token[s + j] * d;
            row_dots(row, xs, xus, count, d, out);
            for (int j = 0; j < count; j++) acc[r->users[s + j] * size + i] = out[j];
        }
    }
}

#ifdef __AVX2__
typedef __m256i part_t;
#define LOW(p) (((__m128i *)(p))[0])  /* the low 16 lanes */
static inline int32_t reduce(__m256i v) {
    return hsum128(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}
#elif defined(__SSSE3__)
typedef __m128i part_t;
#define LOW(p) ((p)[0])
#define reduce hsum128
#endif
#define PART_BYTES (1 << 17)  /* the vector partial sums of one block of outputs, for every token: in L2 */

/* acc[t][j] = sum_k q_h[t][k * size : (k + 1) * size] . w2b[chosen[t][k]][j] for w2b (experts, d,
 * size), each expert's (d, size) block of fc_out's weight. Each thread owns a contiguous range of
 * outputs, taken in blocks whose per-output vectors of partial sums (reduced once, at the end)
 * stay in cache for every token; in a block, each used expert's rows are read front to back. */
static void gemv_out(const int8_t *q_h, const int8_t *q_h_abs, const int8_t *w2b, int64_t d, const routing *r,
                     int64_t tokens, int64_t size, int32_t *acc, int threads) {
    memset(acc, 0, tokens * d * sizeof(int32_t));
    #pragma omp parallel num_threads(threads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = (d + nt - 1) / nt, j0 = id * per, j1 = j0 + per < d ? j0 + per : d, wide = 0;
        (void)q_h_abs;
#ifdef __SSSE3__
        wide = size / 16 * 16;
        int64_t block = PART_BYTES / (tokens * (int64_t)sizeof(part_t));
        block = block < 16 ? 16 : block;
        part_t *part = wide && j1 > j0 ? aligned_alloc(sizeof(part_t), tokens * block * sizeof(part_t)) : NULL;
#else
        int64_t block = j1 - j0;
#endif
        for (int64_t b0 = j0; b0 < j1; b0 += block) {
            int64_t b1 = b0 + block < j1 ? b0 + block : j1, n = b1 - b0;
            (void)n;
#ifdef __SSSE3__
            if (part) memset(part, 0, tokens * n * sizeof(part_t));
#endif
            for (int64_t u = 0; u < r->n_used; u++) {
                const int8_t *blk = w2b + r->used[u] * d * size;
                for (int64_t s = r->start[u]; s < r->start[u + 1]; s++) {  /* the tails, in plain C */
                    const int8_t *h = q_h + r->users[s] * size;
                    int32_t *a = acc + r->token[s] * d;
                    for (int64_t j = b0; j < b1; j++)
                        for (int64_t i = wide; i < size; i++) a[j] += h[i] * blk[j * size + i];
                }
#ifdef __SSSE3__
                if (!part) continue;
                int64_t i = 0;
#ifdef __AVX2__
                for (; i + 32 <= wide; i += 32)
                    for (int64_t s = r->start[u]; s < r->start[u + 1]; s++) {
                        int64_t at = r->users[s] * size + i;
                        __m256i hv = _mm256_loadu_si256((const __m256i *)(q_h + at));
                        __m256i ah = _mm256_loadu_si256((const __m256i *)(q_h_abs + at));
                        part_t *p = part + r->token[s] * n;
                        const int8_t *w = blk + b0 * size + i;
                        for (int64_t j = 0; j < n; j++)
                            p[j] = madd32(p[j], ah, hv, _mm256_loadu_si256((const __m256i *)(w + j * size)));
                    }
#endif
                for (; i < wide; i += 16)
                    for (int64_t s = r->start[u]; s < r->start[u + 1]; s++) {
                        int64_t at = r->users[s] * size + i;
                        __m128i hv = _mm_loadu_si128((const __m128i *)(q_h + at));
                        __m128i ah = _mm_loadu_si128((const __m128i *)(q_h_abs + at));
                        part_t *p = part + r->token[s] * n;
                        const int8_t *w = blk + b0 * size + i;
                        for (int64_t j = 0; j < n; j++)
                            LOW(p + j) = madd16(LOW(p + j), ah, hv, _mm_loadu_si128((const __m128i *)(w + j * size)));
                    }
#endif
            }
#ifdef __SSSE3__
            for (int64_t t = 0; part && t < tokens; t++)
                for (int64_t j = 0; j < n; j++) acc[t * d + b0 + j] += reduce(part[t * n + j]);
#endif
        }
#ifdef __SSSE3__
        free(part);
#endif
    }
}

/* Per-row quantization exactly as kernels.int8.scale_and_quantize: the scale is fp16(max |x| / 127)
 * ignoring NaN, q = round_half_even(x / scale) clamped to +-127, NaN (and x / 0) to 0. */
static float row_scale(const float *x, int64_t n) {
    float lane[16] = {0}, a = 0.0f;  /* 16 independent maxima, which the compiler vectorises */
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) {
            float v = fabsf(x[k + j]);
            lane[j] = v > lane[j] ? v : lane[j];  /* false for NaN */
        }
    for (; k < n; k++) lane[0] = fabsf(x[k]) > lane[0] ? fabsf(x[k]) : lane[0];
    for (int j = 0; j < 16; j++) a = lane[j] > a ? lane[j] : a;
    return (float)(_Float16)(a / 127.0f);
}

static inline float quantized(float x, float div) {
    float v = nearbyintf(x / div);
    if (v != v) v = 0.0f;
    return v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
}

/* The row quantized into q; returns its scale (as fp32). */
static float quantize_row(const float *x, int64_t n, int8_t *q) {
    float s = row_scale(x, n), div = s == 0.0f ? INFINITY : s;
    for (int64_t k = 0; k < n; k++) q[k] = (int8_t)quantized(x[k], div);
    return s;
}

/* Every row of x (tokens, k) quantized as quantize_row does, the integers written as floats into q
 * and the scales into s: the tokens pipeline.quant hands to fbgemm's int8 GEMM. */
void quantize_rows(const float *x, int64_t tokens, int64_t k, float *q, float *s, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (tokens * k >= (1 << 16))
    for (int64_t t = 0; t < tokens; t++) {
        float scale = row_scale(x + t * k, k), div = scale == 0.0f ? INFINITY : scale;
        for (int64_t j = 0; j < k; j++) q[t * k + j] = quantized(x[t * k + j], div);
        s[t] = scale;
    }
}

static int by_value(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* out (tokens, d) = Int8MoEFFN._sparse for the tokens x (tokens, d), token t through its experts
 * chosen[t] (topk of num_expert): per token q_x = quantize(x), h = relu((acc * s_x) * s_w1 + b1)
 * over its experts' neurons, q_h = quantize(h), out = (acc2 * s_h) * s_w2 + b2. Returns 0, or -1
 * when memory runs out. */
int moe_ffn(const float *x, int64_t tokens, int64_t d, const int8_t *w1, const float *s_w1, const float *b1,
            const int8_t *w2b, const float *s_w2, const float *b2, const int64_t *chosen_in, int64_t topk,
            int64_t size, int64_t num_expert, float *out, int threads) {
    int64_t n = topk * size;
    int64_t *chosen = malloc(tokens * topk * sizeof(int64_t));
    int8_t *q_x = malloc(tokens * d), *q_h = malloc(tokens * n), *q_h_abs = malloc(tokens * n);
    uint8_t *xu = malloc(tokens * d);
    int32_t *acc = malloc(tokens * (d > n ? d : n) * sizeof(int32_t));
    float *h = malloc(n * sizeof(float)), *s_x = malloc(tokens * sizeof(float)), *s_h = malloc(tokens * sizeof(float));
    routing r = {0, NULL, NULL, NULL, NULL};
    int ok = chosen && q_x && xu && q_h && q_h_abs && acc && h && s_x && s_h;
    if (ok) {
        memcpy(chosen, chosen_in, tokens * topk * sizeof(int64_t));
        for (int64_t t = 0; t < tokens; t++) {
            qsort(chosen + t * topk, topk, sizeof(int64_t), by_value);  /* each token's blocks in memory order */
            s_x[t] = quantize_row(x + t * d, d, q_x + t * d);
        }
        for (int64_t k = 0; k < tokens * d; k++) xu[k] = (uint8_t)q_x[k] ^ 0x80;  /* q_x + 128 */
        ok = route(chosen, tokens, topk, num_expert, &r) == 0;
    }
    if (ok) {
        gemv_in(q_x, xu, w1, d, &r, size, acc, threads);
        for (int64_t t = 0; t < tokens; t++) {
            for (int64_t k = 0; k < n; k += size)
                for (int64_t i = 0, row = chosen[t * topk + k / size] * size; i < size; i++, row++) {
                    float v = (float)acc[t * n + k + i] * s_x[t];
                    v = v * s_w1[row];
                    v = v + b1[row];
                    h[k + i] = v < 0.0f ? 0.0f : v;  /* relu keeps NaN */
                }
            s_h[t] = quantize_row(h, n, q_h + t * n);
            for (int64_t k = 0; k < n; k++) q_h_abs[t * n + k] = (int8_t)abs(q_h[t * n + k]);
        }
        gemv_out(q_h, q_h_abs, w2b, d, &r, tokens, size, acc, threads);
        for (int64_t t = 0; t < tokens; t++)
            for (int64_t j = 0; j < d; j++) {
                float v = (float)acc[t * d + j] * s_h[t];
                v = v * s_w2[j];
                out[t * d + j] = v + b2[j];
            }
    }
    free(chosen); free(q_x); free(xu); free(q_h); free(q_h_abs); free(acc); free(h); free(s_x); free(s_h);
    free(r.used); free(r.start); free(r.users); free(r.token);
    return ok ? 0 : -1;
}

/* sum_k a[k] b[k] in fp32, over 16 independent lanes (which the compiler vectorises without
 * reassociating), the lanes then added in order. */
static float dot_f32(const float *a, const float *b, int64_t n) {
    float lane[16] = {0}, s = 0.0f;
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) lane[j] += a[k + j] * b[k + j];
    for (int j = 0; j < 16; j++) s += lane[j];
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

/* out[i * stride] = a . b[i * n : (i + 1) * n] for i < ROWS in fp32, the ROWS sums interleaved so
 * that they do not wait on each other: with AVX-512 (or AVX2) in fused multiply-adds over two
 * vectors of lanes per row, else as dot_f32. A row's sum is the same whichever rows share the call. */
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec_t;
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VZERO _mm512_setzero_ps
static inline float vsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec_t;
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VZERO _mm256_setzero_ps
static inline float vsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

static inline void dots(const float *a, const float *b, int64_t n, int rows, float *out, int64_t stride) {
    int64_t k = 0;
#ifdef LANES
    vec_t acc[4][2];
    for (int i = 0; i < rows; i++) acc[i][0] = acc[i][1] = VZERO();
    for (; k + 2 * LANES <= n; k += 2 * LANES) {
        vec_t a0 = VLOAD(a + k), a1 = VLOAD(a + k + LANES);
        for (int i = 0; i < rows; i++) {
            acc[i][0] = VFMA(a0, VLOAD(b + i * n + k), acc[i][0]);
            acc[i][1] = VFMA(a1, VLOAD(b + i * n + k + LANES), acc[i][1]);
        }
    }
#endif
    for (int i = 0; i < rows; i++) {
        float s = 0.0f;
#ifdef LANES
        s = vsum(acc[i][0]) + vsum(acc[i][1]);
#endif
        for (int64_t m = k; m < n; m++) s += a[m] * b[i * n + m];
        out[i * stride] = s;
    }
}

static void dot_f32_rows(const float *a, const float *b, int64_t n, int64_t count, float *out, int64_t stride) {
    switch (count) {  /* a constant row count for each, so that the accumulators stay in registers */
    case 4: dots(a, b, n, 4, out, stride); break;
    case 3: dots(a, b, n, 3, out, stride); break;
    case 2: dots(a, b, n, 2, out, stride); break;
    default: dots(a, b, n, 1, out, stride);
    }
}

typedef struct { float score; int64_t expert; } ranked;

/* Descending score, NaN first (torch.topk ranks NaN highest), ties to the lower expert. */
static int by_score(const void *p, const void *q) {
    const ranked *x = p, *y = q;
    int xn = x->score != x->score, yn = y->score != y->score;
    if (xn != yn) return yn - xn;
    if (!xn && x->score != y->score) return x->score < y->score ? 1 : -1;
    return (x->expert > y->expert) - (x->expert < y->expert);
}

/* chosen (tokens, topk): per token the topk experts of the MoEfication router
 * b(tanh(a(x / max(|x|, 1e-12)))), a (num_expert, d) and b (num_expert, num_expert) fp32, by
 * descending score. Each row of a and b is read once for all the tokens (a is most of the bytes
 * of a router at GPT-J's width). The scores are torch's Router's up to the rounding of the fp32
 * sums. Returns 0, or -1 when memory runs out. */
int moe_route(const float *x, int64_t tokens, int64_t d, const float *a, const float *b, int64_t num_expert,
              int64_t topk, int64_t *chosen, int threads) {
    float *xn = malloc(tokens * d * sizeof(float)), *z = malloc(tokens * num_expert * sizeof(float));
    float *score = malloc(tokens * num_expert * sizeof(float));
    ranked *r = malloc(num_expert * sizeof(ranked));
    int ok = xn && z && score && r, wide = tokens * num_expert * d >= (1 << 18);
    if (ok) {
        for (int64_t t = 0; t < tokens; t++) {
            const float *xt = x + t * d;
            float norm = sqrtf(dot_f32(xt, xt, d)), div = norm > 1e-12f ? norm : 1e-12f;
            for (int64_t k = 0; k < d; k++) xn[t * d + k] = xt[k] / div;
        }
        #pragma omp parallel for num_threads(threads) schedule(static) if (wide)
        for (int64_t e = 0; e < num_expert; e++)
            for (int64_t t = 0; t < tokens; t += 4) {
                int64_t count = tokens - t < 4 ? tokens - t : 4;
                dot_f32_rows(a + e * d, xn + t * d, d, count, z + t * num_expert + e, num_expert);
                for (int64_t i = t; i < t + count; i++) z[i * num_expert + e] = tanhf(z[i * num_expert + e]);
            }
        #pragma omp parallel for num_threads(threads) schedule(static) if (wide)
        for (int64_t e = 0; e < num_expert; e++)
            for (int64_t t = 0; t < tokens; t += 4)
                dot_f32_rows(b + e * num_expert, z + t * num_expert, num_expert, tokens - t < 4 ? tokens - t : 4,
                             score + t * num_expert + e, num_expert);
        for (int64_t t = 0; t < tokens; t++) {
            for (int64_t e = 0; e < num_expert; e++) r[e] = (ranked){score[t * num_expert + e], e};
            qsort(r, num_expert, sizeof(ranked), by_score);
            for (int64_t k = 0; k < topk; k++) chosen[t * topk + k] = r[k].expert;
        }
    }
    free(xn); free(z); free(score); free(r);
    return ok ? 0 : -1;
}

/* moe_route, then moe_ffn over the experts it chose: a MoE FFN call in one. */
int moe_routed_ffn(const float *x, int64_t tokens, int64_t d, const float *a, const float *b, int64_t num_expert,
                   int64_t topk, const int8_t *w1, const float *s_w1, const float *b1, const int8_t *w2b,
                   const float *s_w2, const float *b2, int64_t size, float *out, int threads) {
    int64_t *chosen = malloc(tokens * topk * sizeof(int64_t));
    int rc = chosen ? moe_route(x, tokens, d, a, b, num_expert, topk, chosen, threads) : -1;
    if (rc == 0) rc = moe_ffn(x, tokens, d, w1, s_w1, b1, w2b, s_w2, b2, chosen, topk, size, num_expert, out, threads);
    free(chosen);
    return rc;
}

/* out (tokens, n) = kernels.int8.int8_linear(x, w, s_w) + bias, bit for bit: per token q_x =
 * quantize(x), out = (acc * s_x) * s_w + bias (no bias when bias is NULL), w (n, k) int8. Each row
 * of w is read once for all the tokens; the rows are split over the threads where there are
 * enough of them to pay for waking the threads. Returns 0, or -1 when memory runs out. */
int int8_linear(const float *x, int64_t tokens, int64_t k, const int8_t *w, const float *s_w, const float *bias,
                int64_t n, float *out, int threads) {
    int8_t *q_x = malloc(tokens * k);
    float *s_x = malloc(tokens * sizeof(float));
    int ok = q_x && s_x;
    for (int64_t t = 0; ok && t < tokens; t++) s_x[t] = quantize_row(x + t * k, k, q_x + t * k);
    #pragma omp parallel for num_threads(threads) schedule(static) if (ok && n * k * tokens >= (1 << 17))
    for (int64_t j = 0; j < n; j++) {
        if (!ok) continue;
        for (int64_t t = 0; t < tokens; t++) {
            float v = (float)dot(q_x + t * k, w + j * k, k) * s_x[t];
            v = v * s_w[j];
            out[t * n + j] = bias ? v + bias[j] : v;
        }
    }
    free(q_x); free(s_x);
    return ok ? 0 : -1;
}

/* The rotary embedding on the first rotary_dim dims of every head, in place (see attend_one). */
static void rotate(float *x, const float *c, const float *s, int64_t n_head, int64_t head_dim, int64_t rotary_dim) {
    for (int64_t h = 0; h < n_head; h++) {
        float *y = x + h * head_dim;
        for (int64_t j = 0; j < rotary_dim; j += 2) {
            float x0 = y[j], x1 = y[j + 1];
            y[j] = x0 * c[j] + (-x1) * s[j];
            y[j + 1] = x1 * c[j + 1] + x0 * s[j + 1];
        }
    }
}

/* One new token of one sequence through attention, after its projections, as
 * pipeline.models.gptj.Attention computes it: the rotary embedding on the first rotary_dim dims of
 * every head of q and k (interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), with
 * cos and sin (rotary_dim) this position's), k and v written into the caches (n_head, max_len,
 * head_dim) at pos, and out (n_head * head_dim) the softmax(q . k / sqrt(head_dim)) weighted sum
 * of the cached values at positions 0 .. pos. q and k are rotated in place. Returns 0, or -1 when
 * memory runs out. */
int attend_one(float *q, float *k, const float *v, const float *c, const float *s, int64_t n_head, int64_t head_dim,
               int64_t rotary_dim, float *cache_k, float *cache_v, int64_t max_len, int64_t pos, float *out, int threads) {
    rotate(q, c, s, n_head, head_dim, rotary_dim);
    rotate(k, c, s, n_head, head_dim, rotary_dim);
    for (int64_t h = 0; h < n_head; h++) {
        memcpy(cache_k + (h * max_len + pos) * head_dim, k + h * head_dim, head_dim * sizeof(float));
        memcpy(cache_v + (h * max_len + pos) * head_dim, v + h * head_dim, head_dim * sizeof(float));
    }
    float *scores = malloc(n_head * (pos + 1) * sizeof(float));
    if (!scores) return -1;
    float scale = 1.0f / sqrtf((float)head_dim);
    #pragma omp parallel for num_threads(threads) schedule(static) if (n_head * (pos + 1) * head_dim >= (1 << 18))
    for (int64_t h = 0; h < n_head; h++) {
        const float *qh = q + h * head_dim, *keys = cache_k + h * max_len * head_dim, *vals = cache_v + h * max_len * head_dim;
        float *sc = scores + h * (pos + 1), *o = out + h * head_dim, top = -INFINITY, sum = 0.0f;
        for (int64_t p = 0; p <= pos; p++) {
            sc[p] = dot_f32(qh, keys + p * head_dim, head_dim) * scale;
            if (sc[p] > top) top = sc[p];
        }
        for (int64_t p = 0; p <= pos; p++) sum += (sc[p] = expf(sc[p] - top));
        for (int64_t j = 0; j < head_dim; j++) o[j] = 0.0f;
        for (int64_t p = 0; p <= pos; p++) {
            float w = sc[p] / sum;
            for (int64_t j = 0; j < head_dim; j++) o[j] += w * vals[p * head_dim + j];
        }
    }
    free(scores);
    return 0;
}
