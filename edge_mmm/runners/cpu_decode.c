/* One decode step of a Llama-family LM on the CPU, fp32 arithmetic on 4-bit weights: edge-mmm's own kernel.
 *
 * Weights (written by exporters/cpu_decode_pack.py, read by edge_mmm/edge_mmm/runners/cpu_decode.py):
 *   4-bit linears: per output row, blocks of 32 inputs: 16 bytes of codes (element i in the low nibble of
 *   byte i, element i+16 in the high nibble, as GGUF Q4_0/Q4_1), a scale d and an offset m (fp32):
 *   w = d*q + m. The offset folds into the block dot product as m * sum(x_block), so x . w of a block is
 *   d * (x . q) + m * (x_lo + x_hi summed lane-wise): no separate group-sum pass.
 *   Head and embedding: int8 codes with one fp32 scale per block of 32 (GGUF Q8_0), exact.
 * Activations, norms, RoPE, attention and the KV cache are fp32, so the logits match the float model to
 * fp32 rounding (the order of the sums differs from torch's).
 * The KV cache is the caller's: per layer one K and one V array [kv_heads, max_len, head_dim] (the same
 * buffers the onnxruntime graph reads and writes, so prefill can run there and decode here).
 * Threads: OpenMP, one parallel region per step; rows of each matrix and heads of attention are split.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *codes; /* [n, k/32, 16] */
    const float *d, *m;   /* [n, k/32] */
    const float *bias;    /* [n] or NULL */
    int64_t n, k;
} Q4Mat;

typedef struct {
    const float *attn_norm, *ffn_norm; /* [hidden] */
    Q4Mat qkv, o, gate_up, down;       /* q|k|v rows; gate rows then up rows */
} Layer;

typedef struct {
    int64_t hidden, layers, heads, kv_heads, head_dim, inter, vocab, max_pos;
    float eps;
    const float *rope_cos, *rope_sin;   /* [max_pos, head_dim/2] */
    const int8_t *emb_codes;            /* [vocab, hidden] */
    const float *emb_scales;            /* [vocab, hidden/32] */
    const int8_t *head_codes;           /* [vocab, hidden] (may be the embedding's) */
    const float *head_scales;           /* [vocab, hidden/32] */
    const float *final_norm;            /* [hidden] */
    const Layer *layer;                 /* [layers] */
} Model;

const char *edge_decode_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}

int edge_decode_abi(void) { return 1; }

/* ---------------------------------------------------------------------------------------- row kernels */
/* xs: per block of 32 inputs, x[i] + x[i+16] for i < 16 (the offset's lane-wise sums). */
static float q4_row(const uint8_t *c, const float *d, const float *m, const float *x, const float *xs, int64_t nb) {
#if defined(__AVX512F__)
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        for (int j = 0; j < 2; j++) {
            const int64_t bb = b + j;
            __m128i raw = _mm_loadu_si128((const __m128i *)(c + bb * 16));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
            __m512 blk = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + bb * 32 + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x + bb * 32)));
            __m512 t = _mm512_mul_ps(_mm512_set1_ps(m[bb]), _mm512_loadu_ps(xs + bb * 16));
            t = _mm512_fmadd_ps(_mm512_set1_ps(d[bb]), blk, t);
            if (j == 0) a0 = _mm512_add_ps(a0, t); else a1 = _mm512_add_ps(a1, t);
        }
    }
    for (; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
        __m512 blk = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + b * 32 + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x + b * 32)));
        __m512 t = _mm512_mul_ps(_mm512_set1_ps(m[b]), _mm512_loadu_ps(xs + b * 16));
        a0 = _mm512_add_ps(a0, _mm512_fmadd_ps(_mm512_set1_ps(d[b]), blk, t));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
        __m128i lo8 = _mm_and_si128(raw, mask), hi8 = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        const float *xb = x + b * 32, *sb = xs + b * 16;
        __m256 l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo8));
        __m256 l1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo8, 8)));
        __m256 h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi8));
        __m256 h1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi8, 8)));
        __m256 blk0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xb + 16), _mm256_mul_ps(l0, _mm256_loadu_ps(xb)));
        __m256 blk1 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xb + 24), _mm256_mul_ps(l1, _mm256_loadu_ps(xb + 8)));
        __m256 vd = _mm256_set1_ps(d[b]), vm = _mm256_set1_ps(m[b]);
        a0 = _mm256_add_ps(a0, _mm256_fmadd_ps(vd, blk0, _mm256_mul_ps(vm, _mm256_loadu_ps(sb))));
        a1 = _mm256_add_ps(a1, _mm256_fmadd_ps(vd, blk1, _mm256_mul_ps(vm, _mm256_loadu_ps(sb + 8))));
    }
    __m256 s = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
#else
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        float blk = 0.f, off = 0.f;
        for (int i = 0; i < 16; i++) {
            blk += x[b * 32 + i] * (float)(c[b * 16 + i] & 15) + x[b * 32 + 16 + i] * (float)(c[b * 16 + i] >> 4);
            off += xs[b * 16 + i];
        }
        acc += d[b] * blk + m[b] * off;
    }
    return acc;
#endif
}

/* int8 codes [k] with one scale per block of 32, dotted with fp32 x. */
static float q8_row(const int8_t *c, const float *s, const float *x, int64_t nb) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i r0 = _mm_loadu_si128((const __m128i *)(c + b * 32));
        __m128i r1 = _mm_loadu_si128((const __m128i *)(c + b * 32 + 16));
        __m512 blk = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(r1)), _mm512_loadu_ps(x + b * 32 + 16),
                                     _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(r0)), _mm512_loadu_ps(x + b * 32)));
        if (b & 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(s[b]), blk, a1);
        else a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[b]), blk, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *cb = c + b * 32;
        const float *xb = x + b * 32;
        __m256 blk0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)cb))), _mm256_loadu_ps(xb));
        blk0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cb + 8)))), _mm256_loadu_ps(xb + 8), blk0);
        __m256 blk1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cb + 16)))), _mm256_loadu_ps(xb + 16));
        blk1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cb + 24)))), _mm256_loadu_ps(xb + 24), blk1);
        __m256 vs = _mm256_set1_ps(s[b]);
        a0 = _mm256_fmadd_ps(vs, blk0, a0);
        a1 = _mm256_fmadd_ps(vs, blk1, a1);
    }
    __m256 t = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
#else
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        float blk = 0.f;
        for (int i = 0; i < 32; i++) blk += x[b * 32 + i] * (float)c[b * 32 + i];
        acc += s[b] * blk;
    }
    return acc;
#endif
}

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float s = _mm_cvtss_f32(h);
#else
    float s = 0.f;
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* --------------------------------------------------------------------------------- parallel pieces */
/* Inside a parallel region: y = W x (+ bias) with the rows split over the threads; xs is scratch [k/2]. */
static void q4_gemv(const Q4Mat *w, const float *x, float *xs, float *y) {
    const int64_t nb = w->k / 32;
    #pragma omp single
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 16; i++) xs[b * 16 + i] = x[b * 32 + i] + x[b * 32 + 16 + i];
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < w->n; r++) {
        float v = q4_row(w->codes + r * nb * 16, w->d + r * nb, w->m + r * nb, x, xs, nb);
        y[r] = w->bias ? v + w->bias[r] : v;
    }
}

static void rms_norm(const float *x, const float *g, float *out, int64_t n, float eps) {
    double ss = 0.0; /* the sum of squares of a few hundred fp32 values, kept exact enough in double */
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * g[i];
}

static void rope(float *v, const float *cs, const float *sn, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        const float a = v[j], b = v[j + half];
        v[j] = a * cs[j] - b * sn[j];
        v[j + half] = b * cs[j] + a * sn[j];
    }
}

/* ------------------------------------------------------------------------------------------ the step */
/* Appends token `token` at position `pos` to the cache and writes the vocab logits. 0 on success. */
int edge_decode_step(const Model *M, int64_t token, int64_t pos, float *const *kcache, float *const *vcache,
                     int64_t max_len, float *logits) {
    if (token < 0 || token >= M->vocab || pos < 0 || pos >= max_len || pos >= M->max_pos) return 1;
    const int64_t H = M->hidden, D = M->head_dim, NH = M->heads, KV = M->kv_heads, I = M->inter;
    const int64_t qd = NH * D, kvd = KV * D, half = D / 2, group = NH / KV, T = pos + 1;
    const int64_t kmax = H > I ? H : I;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(H * 3 + (qd + 2 * kvd) + qd + 2 * I + kmax + NH * T));
    if (!buf) return 2;
    float *x = buf, *h = x + H, *tmp = h + H, *qkv = tmp + H, *att = qkv + qd + 2 * kvd, *gu = att + qd;
    float *xs = gu + 2 * I, *scores = xs + kmax;
    const float scale = 1.0f / sqrtf((float)D);

    const int64_t hb = H / 32;
    for (int64_t b = 0; b < hb; b++)
        for (int i = 0; i < 32; i++)
            x[b * 32 + i] = M->emb_scales[token * hb + b] * (float)M->emb_codes[token * H + b * 32 + i];

    #pragma omp parallel
    {
        for (int64_t l = 0; l < M->layers; l++) {
            const Layer *L = &M->layer[l];
            #pragma omp single
            rms_norm(x, L->attn_norm, h, H, M->eps);
            q4_gemv(&L->qkv, h, xs, qkv);
            #pragma omp single
            {
                const float *cs = M->rope_cos + pos * half, *sn = M->rope_sin + pos * half;
                for (int64_t hd = 0; hd < NH; hd++) rope(qkv + hd * D, cs, sn, half);
                for (int64_t hd = 0; hd < KV; hd++) {
                    float *k = qkv + qd + hd * D;
                    rope(k, cs, sn, half);
                    memcpy(kcache[l] + (hd * max_len + pos) * D, k, sizeof(float) * D);
                    memcpy(vcache[l] + (hd * max_len + pos) * D, qkv + qd + kvd + hd * D, sizeof(float) * D);
                }
            }
            #pragma omp for schedule(static)
            for (int64_t hd = 0; hd < NH; hd++) {
                const float *q = qkv + hd * D;
                const float *K = kcache[l] + (hd / group) * max_len * D, *V = vcache[l] + (hd / group) * max_len * D;
                float *s = scores + hd * T, mx = -INFINITY, sum = 0.f;
                for (int64_t t = 0; t < T; t++) {
                    s[t] = dot(q, K + t * D, D) * scale;
                    if (s[t] > mx) mx = s[t];
                }
                for (int64_t t = 0; t < T; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
                float *o = att + hd * D;
                for (int64_t j = 0; j < D; j++) o[j] = 0.f;
                for (int64_t t = 0; t < T; t++) {
                    const float p = s[t] / sum, *v = V + t * D;
                    for (int64_t j = 0; j < D; j++) o[j] += p * v[j];
                }
            }
            q4_gemv(&L->o, att, xs, tmp);
            #pragma omp single
            {
                for (int64_t i = 0; i < H; i++) x[i] += tmp[i];
                rms_norm(x, L->ffn_norm, h, H, M->eps);
            }
            q4_gemv(&L->gate_up, h, xs, gu);
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < I; i++) {
                const float g = gu[i];
                gu[i] = g / (1.0f + expf(-g)) * gu[I + i];
            }
            q4_gemv(&L->down, gu, xs, tmp);
            #pragma omp single
            for (int64_t i = 0; i < H; i++) x[i] += tmp[i];
        }
        #pragma omp single
        rms_norm(x, M->final_norm, h, H, M->eps);
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < M->vocab; r++)
            logits[r] = q8_row(M->head_codes + r * H, M->head_scales + r * hb, h, hb);
    }
    free(buf);
    return 0;
}

void edge_decode_set_threads(int n) { if (n > 0) omp_set_num_threads(n); }
