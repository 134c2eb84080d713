/* One token's two integer GEMVs through the chosen experts of an int8 FFN in expert order.
 *
 * Both read only the chosen experts' weights, in place and in memory order, and return exact
 * int32 sums: the integer half of QAT's int8 product, so that scaling them as int8_linear does
 * gives its result bit for bit. Inputs are int8 in [-127, 127] (the quantizer's range), which keeps
 * maddubs's pairwise int16 sums clear of saturation.
 *
 * With AVX2 a 32-lane product is |x| (unsigned) times w carrying x's sign, pairs summed to int16
 * (maddubs), then to int32 (madd); SSSE3 does 16 lanes; the rest is plain C. Threads: OpenMP,
 * linked against the libgomp that torch has already loaded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __SSSE3__
#include <immintrin.h>
#endif

#ifdef __AVX2__
static inline __m256i madd32(__m256i acc, __m256i ax, __m256i x, const int8_t *w) {
    __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#endif
#ifdef __SSSE3__
static inline __m128i madd16(__m128i acc, __m128i ax, __m128i x, const int8_t *w) {
    __m128i p = _mm_maddubs_epi16(ax, _mm_sign_epi8(_mm_loadu_si128((const __m128i *)w), x));
    return _mm_add_epi32(acc, _mm_madd_epi16(p, _mm_set1_epi16(1)));
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
        acc8 = madd32(acc8, _mm256_abs_epi8(xv), xv, w + k);
    }
    acc = _mm_add_epi32(_mm256_castsi256_si128(acc8), _mm256_extracti128_si256(acc8, 1));
#endif
    for (; k + 16 <= n; k += 16) {
        __m128i xv = _mm_loadu_si128((const __m128i *)(x + k));
        acc = madd16(acc, _mm_abs_epi8(xv), xv, w + k);
    }
    s = hsum128(acc);
#endif
    for (; k < n; k++) s += x[k] * w[k];
    return s;
}

/* acc[t * size + i] = q_x . w1[chosen[t] * size + i] for the chosen experts' rows of w1
 * (experts * size, d): one dot product per row, rows split over the threads. */
void moe_gemv_in(const int8_t *q_x, const int8_t *w1, int64_t d, const int64_t *chosen, int64_t topk,
                 int64_t size, int32_t *acc, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < topk * size; r++)
        acc[r] = dot(q_x, w1 + (chosen[r / size] * size + r % size) * d, d);
}

/* acc[j] = sum_t q_h[t * size : (t + 1) * size] . w2b[chosen[t], j] for w2b (experts, d, size),
 * each expert's (d, size) block of fc_out's weight. Each thread owns a contiguous range of
 * outputs and reads that range of every chosen block front to back, keeping per output a vector
 * of partial sums (reduced once, at the end) rather than reducing every 32-lane product. */
#ifdef __AVX2__
typedef __m256i part_t;
#define LOW(part, j) (((__m128i *)(part))[2 * (j)])  /* the low 16 lanes of part[j] */
static inline int32_t reduce(__m256i v) {
    return hsum128(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}
#elif defined(__SSSE3__)
typedef __m128i part_t;
#define LOW(part, j) ((part)[j])
#define reduce hsum128
#endif

void moe_gemv_out(const int8_t *q_h, const int8_t *w2b, int64_t d, const int64_t *chosen, int64_t topk,
                  int64_t size, int32_t *acc, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = (d + nt - 1) / nt, j0 = id * per, j1 = j0 + per < d ? j0 + per : d;
        int64_t n = j1 > j0 ? j1 - j0 : 0, wide = 0;
        (void)n;
#ifdef __SSSE3__
        wide = size / 16 * 16;
        part_t *part = n && wide ? aligned_alloc(sizeof(part_t), n * sizeof(part_t)) : NULL;
        if (part) memset(part, 0, n * sizeof(part_t));
#endif
        for (int64_t j = j0; j < j1; j++) acc[j] = 0;
        for (int64_t t = 0; t < topk; t++) {
            const int8_t *h = q_h + t * size, *blk = w2b + chosen[t] * d * size;
            for (int64_t j = j0; j < j1; j++)
                for (int64_t i = wide; i < size; i++) acc[j] += h[i] * blk[j * size + i];
#ifdef __SSSE3__
            if (!part) continue;
            int64_t i = 0;
#ifdef __AVX2__
            for (; i + 32 <= wide; i += 32) {
                __m256i hv = _mm256_loadu_si256((const __m256i *)(h + i)), ah = _mm256_abs_epi8(hv);
                for (int64_t j = 0; j < n; j++) part[j] = madd32(part[j], ah, hv, blk + (j0 + j) * size + i);
            }
#endif
            for (; i < wide; i += 16) {
                __m128i hv = _mm_loadu_si128((const __m128i *)(h + i)), ah = _mm_abs_epi8(hv);
                for (int64_t j = 0; j < n; j++) LOW(part, j) = madd16(LOW(part, j), ah, hv, blk + (j0 + j) * size + i);
            }
#endif
        }
#ifdef __SSSE3__
        for (int64_t j = 0; part && j < n; j++) acc[j0 + j] += reduce(part[j]);
        free(part);
#endif
    }
}

/* Per-row quantization exactly as kernels.int8.scale_and_quantize: the scale is fp16(max |x| / 127)
 * ignoring NaN, q = round_half_even(x / scale) clamped to +-127, NaN (and x / 0) to 0. Returns the
 * scale (as fp32). */
static float quantize_row(const float *x, int64_t n, int8_t *q) {
    float a = 0.0f;
    for (int64_t k = 0; k < n; k++) {
        float v = fabsf(x[k]);
        if (v > a) a = v;  /* false for NaN */
    }
    float s = (float)(_Float16)(a / 127.0f), div = s == 0.0f ? INFINITY : s;
    for (int64_t k = 0; k < n; k++) {
        float v = nearbyintf(x[k] / div);
        if (v != v) v = 0.0f;
        q[k] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
    }
    return s;
}

static int by_value(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* out = the int8 FFN's sparse path for one token x (d,) through the chosen experts, in the same
 * fp32 operations and order as pipeline.compressed.Int8MoEFFN._sparse (built without FMA
 * contraction): h = relu((acc * s_x) * s_w1 + b1), out = (acc2 * s_h) * s_w2 + b2. Returns 0, or -1
 * when memory runs out. */
int moe_ffn_token(const float *x, int64_t d, const int8_t *w1, const float *s_w1, const float *b1,
                  const int8_t *w2b, const float *s_w2, const float *b2, const int64_t *chosen_in,
                  int64_t topk, int64_t size, float *out, int threads) {
    int64_t n = topk * size;
    int64_t *chosen = malloc(topk * sizeof(int64_t));
    int8_t *q = malloc((d > n ? d : n) * sizeof(int8_t));
    int32_t *acc = malloc((d > n ? d : n) * sizeof(int32_t));
    float *h = malloc(n * sizeof(float));
    int ok = chosen && q && acc && h;
    if (ok) {
        memcpy(chosen, chosen_in, topk * sizeof(int64_t));
        qsort(chosen, topk, sizeof(int64_t), by_value);  /* the experts' blocks in memory order */
        float s_x = quantize_row(x, d, q);
        moe_gemv_in(q, w1, d, chosen, topk, size, acc, threads);
        for (int64_t r = 0; r < n; r++) {
            int64_t row = chosen[r / size] * size + r % size;
            float v = (float)acc[r] * s_x;
            v = v * s_w1[row];
            v = v + b1[row];
            h[r] = v < 0.0f ? 0.0f : v;  /* relu keeps NaN */
        }
        float s_h = quantize_row(h, n, q);
        moe_gemv_out(q, w2b, d, chosen, topk, size, acc, threads);
        for (int64_t j = 0; j < d; j++) {
            float v = (float)acc[j] * s_h;
            v = v * s_w2[j];
            out[j] = v + b2[j];
        }
    }
    free(chosen); free(q); free(acc); free(h);
    return ok ? 0 : -1;
}
