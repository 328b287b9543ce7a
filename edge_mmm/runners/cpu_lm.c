/* The forward pass of a Llama-family LM on the CPU (prefill and decode), fp32 arithmetic on 4-bit weights:
 * edge-mmm's own kernel.
 *
 * Weights (written by exporters/cpu_lm_pack.py, read by edge_mmm/runners/cpu_lm.py):
 *   4-bit linears: per output row, blocks of 32 inputs: 16 bytes of codes (element i in the low nibble of
 *   byte i, element i+16 in the high nibble, as GGUF Q4_0/Q4_1), a scale d and an offset m (fp32):
 *   w = d*q + m, which the kernels compute in registers (the float model's own dequantization, exact) and
 *   multiply with fp32 activations; a prompt's tokens share each dequantized block (a tile of 16 or 8).
 *   Head and embedding: int8 codes with one fp32 scale per block of 32 (GGUF Q8_0), exact.
 * Activations, norms, RoPE, attention and the KV cache are fp32, so the logits match the float model to
 * fp32 rounding (the order of the sums differs from torch's).
 * Whisper's text decoder (`edge_whisper_step`, at the end of this file) shares the row kernels.
 * The KV cache is the caller's: per layer one K and one V array [kv_heads, max_len, head_dim].
 * Threads: our own team (`team_run`, below), one region per call; rows of each matrix and (head, token) pairs of
 * attention are split over the threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>
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

const char *edge_lm_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}

int edge_lm_abi(void) { return 5; }

/* ---------------------------------------------------------------------------------------- row kernels */
/* x . (row of W): each block's 32 weights are dequantized exactly as the float model's (d*q + m in fp32)
 * and multiplied with x in fp32. */
static float q4_row(const uint8_t *c, const float *d, const float *m, const float *x, int64_t nb) {
#if defined(__AVX512F__)
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
        const __m512 vd = _mm512_set1_ps(d[b]), vm = _mm512_set1_ps(m[b]);
        __m512 wlo = _mm512_fmadd_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))), vm);
        __m512 whi = _mm512_fmadd_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))), vm);
        a0 = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(x + b * 32), a0);
        a1 = _mm512_fmadd_ps(whi, _mm512_loadu_ps(x + b * 32 + 16), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
        __m128i lo8 = _mm_and_si128(raw, mask), hi8 = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        const __m256 vd = _mm256_set1_ps(d[b]), vm = _mm256_set1_ps(m[b]);
        const float *xb = x + b * 32;
        a0 = _mm256_fmadd_ps(_mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo8)), vm), _mm256_loadu_ps(xb), a0);
        a1 = _mm256_fmadd_ps(_mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo8, 8))), vm), _mm256_loadu_ps(xb + 8), a1);
        a0 = _mm256_fmadd_ps(_mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi8)), vm), _mm256_loadu_ps(xb + 16), a0);
        a1 = _mm256_fmadd_ps(_mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi8, 8))), vm), _mm256_loadu_ps(xb + 24), a1);
    }
    __m256 s = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
#else
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 16; i++)
            acc += x[b * 32 + i] * (d[b] * (float)(c[b * 16 + i] & 15) + m[b])
                 + x[b * 32 + 16 + i] * (d[b] * (float)(c[b * 16 + i] >> 4) + m[b]);
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

/* ------------------------------------------------------------------------------------- tile kernels */
/* y[j * ldy] = row of W (4-bit) . x_j for the `nt` tokens of a tile (nt <= TILE, x_j = x + j*k): each block is
 * dequantized once (d*q + m, fp32) for the whole tile, then it is a plain fp32 GEMM. */
#if defined(__AVX512F__)
#define TILE 16
static void q4_tile(const uint8_t *c, const float *d, const float *m, const float *x, int64_t k, int nt,
                    float *y, int64_t ldy) {
    const int64_t nb = k / 32;
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m512 acc[TILE];
    for (int j = 0; j < TILE; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
        const __m512 vd = _mm512_set1_ps(d[b]), vm = _mm512_set1_ps(m[b]);
        const __m512 wlo = _mm512_fmadd_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))), vm);
        const __m512 whi = _mm512_fmadd_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))), vm);
        if (nt == TILE) {
            for (int j = 0; j < TILE; j++) {
                const float *xb = x + j * k + b * 32;
                acc[j] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xb + 16), _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xb), acc[j]));
            }
        } else {
            for (int j = 0; j < nt; j++) {
                const float *xb = x + j * k + b * 32;
                acc[j] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xb + 16), _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xb), acc[j]));
            }
        }
    }
    for (int j = 0; j < nt; j++) y[j * ldy] = _mm512_reduce_add_ps(acc[j]);
}
/* Two rows x 8 tokens: each x load feeds both rows (16 accumulators, 4 dequantized half-blocks). */
#define PAIR_TOKENS 8
static void q4_pair8(const uint8_t *c0, const float *d0, const float *m0, const uint8_t *c1, const float *d1,
                     const float *m1, const float *x, int64_t k, float *y0, float *y1, int64_t ldy) {
    const int64_t nb = k / 32;
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    __m512 a4 = _mm512_setzero_ps(), a5 = _mm512_setzero_ps(), a6 = _mm512_setzero_ps(), a7 = _mm512_setzero_ps();
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    __m512 b4 = _mm512_setzero_ps(), b5 = _mm512_setzero_ps(), b6 = _mm512_setzero_ps(), b7 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i r0 = _mm_loadu_si128((const __m128i *)(c0 + b * 16)), r1 = _mm_loadu_si128((const __m128i *)(c1 + b * 16));
        const __m512 vd0 = _mm512_set1_ps(d0[b]), vm0 = _mm512_set1_ps(m0[b]);
        const __m512 vd1 = _mm512_set1_ps(d1[b]), vm1 = _mm512_set1_ps(m1[b]);
        const __m512 wl0 = _mm512_fmadd_ps(vd0, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(r0, mask))), vm0);
        const __m512 wh0 = _mm512_fmadd_ps(vd0, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(r0, 4), mask))), vm0);
        const __m512 wl1 = _mm512_fmadd_ps(vd1, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(r1, mask))), vm1);
        const __m512 wh1 = _mm512_fmadd_ps(vd1, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(r1, 4), mask))), vm1);
        const float *xb = x + b * 32;
#define STEP(j, A, B) { const __m512 xl = _mm512_loadu_ps(xb + (j) * k), xh = _mm512_loadu_ps(xb + (j) * k + 16); \
            A = _mm512_fmadd_ps(wh0, xh, _mm512_fmadd_ps(wl0, xl, A)); B = _mm512_fmadd_ps(wh1, xh, _mm512_fmadd_ps(wl1, xl, B)); }
        STEP(0, a0, b0) STEP(1, a1, b1) STEP(2, a2, b2) STEP(3, a3, b3)
        STEP(4, a4, b4) STEP(5, a5, b5) STEP(6, a6, b6) STEP(7, a7, b7)
#undef STEP
    }
    y0[0] = _mm512_reduce_add_ps(a0); y0[ldy] = _mm512_reduce_add_ps(a1); y0[2 * ldy] = _mm512_reduce_add_ps(a2);
    y0[3 * ldy] = _mm512_reduce_add_ps(a3); y0[4 * ldy] = _mm512_reduce_add_ps(a4); y0[5 * ldy] = _mm512_reduce_add_ps(a5);
    y0[6 * ldy] = _mm512_reduce_add_ps(a6); y0[7 * ldy] = _mm512_reduce_add_ps(a7);
    y1[0] = _mm512_reduce_add_ps(b0); y1[ldy] = _mm512_reduce_add_ps(b1); y1[2 * ldy] = _mm512_reduce_add_ps(b2);
    y1[3 * ldy] = _mm512_reduce_add_ps(b3); y1[4 * ldy] = _mm512_reduce_add_ps(b4); y1[5 * ldy] = _mm512_reduce_add_ps(b5);
    y1[6 * ldy] = _mm512_reduce_add_ps(b6); y1[7 * ldy] = _mm512_reduce_add_ps(b7);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define TILE 8
static void q4_tile(const uint8_t *c, const float *d, const float *m, const float *x, int64_t k, int nt,
                    float *y, int64_t ldy) {
    const int64_t nb = k / 32;
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256 acc[TILE];
    for (int j = 0; j < TILE; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
        __m128i lo8 = _mm_and_si128(raw, mask), hi8 = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        const __m256 vd = _mm256_set1_ps(d[b]), vm = _mm256_set1_ps(m[b]);
        const __m256 w0 = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo8)), vm);
        const __m256 w1 = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo8, 8))), vm);
        const __m256 w2 = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi8)), vm);
        const __m256 w3 = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi8, 8))), vm);
        const int nj = nt == TILE ? TILE : nt;  /* a constant trip count for full tiles */
        for (int j = 0; j < nj; j++) {
            const float *xb = x + j * k + b * 32;
            __m256 a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[j]);
            a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), a);
            a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), a);
            acc[j] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), a);
        }
    }
    for (int j = 0; j < nt; j++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        y[j * ldy] = _mm_cvtss_f32(h);
    }
}
#else
#define TILE 1
static void q4_tile(const uint8_t *c, const float *d, const float *m, const float *x, int64_t k, int nt,
                    float *y, int64_t ldy) {
    (void)nt; (void)ldy;
    y[0] = q4_row(c, d, m, x, k / 32);
}
#endif

/* ------------------------------------------------------------------------------------- the thread team */
/* A region runs fn(arg, tid, nth) on nth threads: the caller (tid 0) and persistent workers, started on first
 * use. Not OpenMP: libgomp keeps a worker pool per host thread that opens a parallel region and counts all of
 * them; with two pools (our kernel called from two threads, or torch, which ships the same libgomp.so.1, on one
 * and our kernel on another) it has more threads than cores and stops spinning at its barriers, and a decode step
 * ran 2-2.5x slower. Here one team serves the process: regions from several threads run one at a time
 * (`team_call`), workers spin briefly between regions (a decode loop's next step finds them awake), then sleep on
 * a condition variable, so an idle kernel takes no core from onnxruntime or anything else. */
#define TEAM_MAX 64
#define TEAM_SPIN 20000 /* pause iterations a worker spins for the next region before it sleeps (~0.1-0.5 ms) */
typedef void (*TeamFn)(void *arg, int tid, int nth);
static pthread_mutex_t team_call = PTHREAD_MUTEX_INITIALIZER, team_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t team_cv = PTHREAD_COND_INITIALIZER;
static TeamFn team_fn;
static void *team_arg;
static int team_nth, team_workers, team_forked_hook;
static _Atomic int64_t team_gen, bar_gen;
static _Atomic int team_done, team_sleepers, bar_count;
static int64_t team_start_gen[TEAM_MAX];

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *team_worker(void *p) {
    const int tid = (int)(intptr_t)p;
    int64_t seen = team_start_gen[tid];
    for (;;) {
        int64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&team_gen, memory_order_acquire)) == seen) {
            if (++spins < TEAM_SPIN) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&team_mu);
            atomic_fetch_add(&team_sleepers, 1);
            while (atomic_load(&team_gen) == seen) pthread_cond_wait(&team_cv, &team_mu);
            atomic_fetch_sub(&team_sleepers, 1);
            pthread_mutex_unlock(&team_mu);
            spins = 0;
        }
        seen = g;
        if (tid < team_nth) team_fn(team_arg, tid, team_nth);
        atomic_fetch_add_explicit(&team_done, 1, memory_order_release);
    }
    return NULL;
}

/* a child forked while the team existed has none of its threads: it starts its own */
static void team_after_fork(void) {
    pthread_mutex_init(&team_call, NULL);
    pthread_mutex_init(&team_mu, NULL);
    pthread_cond_init(&team_cv, NULL);
    team_workers = 0;
    atomic_store(&team_sleepers, 0);
}

/* all nth threads meet here (inside a region) */
static void team_barrier(int nth) {
    if (nth <= 1) return;
    const int64_t g = atomic_load_explicit(&bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar_count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&bar_gen, 1, memory_order_release);
    } else {
        for (int spins = 0; atomic_load_explicit(&bar_gen, memory_order_acquire) == g; spins++) {
            if (spins < 4096) cpu_relax();
            else sched_yield(); /* a team member lost its core (another process, onnxruntime's threads) */
        }
    }
}

static void team_run(TeamFn fn, void *arg, int nth) {
    if (nth < 1) nth = 1;
    if (nth > TEAM_MAX) nth = TEAM_MAX;
    pthread_mutex_lock(&team_call);
    if (!team_forked_hook) team_forked_hook = pthread_atfork(NULL, NULL, team_after_fork) == 0 ? 1 : -1;
    while (team_workers < nth - 1) {
        pthread_t t;
        pthread_attr_t attr;
        const int tid = team_workers + 1;
        team_start_gen[tid] = atomic_load(&team_gen);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, team_worker, (void *)(intptr_t)tid);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* no more threads to be had: the region runs on those there are */
        team_workers = tid;
    }
    if (nth > team_workers + 1) nth = team_workers + 1;
    team_fn = fn;
    team_arg = arg;
    team_nth = nth;
    atomic_store(&team_done, 0);
    atomic_store(&bar_count, 0);
    pthread_mutex_lock(&team_mu);
    atomic_fetch_add_explicit(&team_gen, 1, memory_order_release);
    if (atomic_load(&team_sleepers)) pthread_cond_broadcast(&team_cv);
    pthread_mutex_unlock(&team_mu);
    fn(arg, 0, nth);
    while (atomic_load_explicit(&team_done, memory_order_acquire) < team_workers) cpu_relax();
    pthread_mutex_unlock(&team_call);
}

/* work sharing inside a region (`tid`, `nth` in scope), each loop followed by team_barrier(nth): a static split of
 * [0, n), or items handed out one at a time from a counter the caller zeroed */
#define TEAM_FOR(i, n) for (int64_t i = (int64_t)(n) * tid / nth, i##_end = (int64_t)(n) * (tid + 1) / nth; i < i##_end; i++)
#define TEAM_DYNAMIC_FOR(i, n, counter) \
    for (int64_t i; (i = atomic_fetch_add_explicit((counter), 1, memory_order_relaxed)) < (int64_t)(n);)

static int default_team_threads(void) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* ---------------------------------------------------------------------------------- parallel pieces */
/* Inside a team region: Y[t, :] = W X[t, :] (+ bias) for T tokens. Each thread takes a contiguous range of
 * W's rows and walks the tokens in tiles, so a tile of X stays in cache while the rows stream by. */
static void q4_gemm(const Q4Mat *w, const float *x, int64_t T, float *y, int tid, int nth) {
    const int64_t k = w->k, nb = k / 32, n = w->n;
    const int64_t r0 = n * tid / nth, r1 = n * (tid + 1) / nth;
    int64_t t0 = 0;
#ifdef PAIR_TOKENS
    for (; t0 + PAIR_TOKENS <= T; t0 += PAIR_TOKENS) {
        int64_t r = r0;
        for (; r + 1 < r1; r += 2)
            q4_pair8(w->codes + r * nb * 16, w->d + r * nb, w->m + r * nb, w->codes + (r + 1) * nb * 16,
                     w->d + (r + 1) * nb, w->m + (r + 1) * nb, x + t0 * k, k, y + t0 * n + r, y + t0 * n + r + 1, n);
        if (r < r1)
            q4_tile(w->codes + r * nb * 16, w->d + r * nb, w->m + r * nb, x + t0 * k, k, PAIR_TOKENS, y + t0 * n + r, n);
        if (w->bias)
            for (int64_t rr = r0; rr < r1; rr++)
                for (int j = 0; j < PAIR_TOKENS; j++) y[(t0 + j) * n + rr] += w->bias[rr];
    }
#endif
    for (; t0 < T; t0 += TILE) {
        const int nt = (int)(T - t0 < TILE ? T - t0 : TILE);
        for (int64_t r = r0; r < r1; r++) {
            float *yr = y + t0 * n + r;
            if (nt == 1) {
                yr[0] = q4_row(w->codes + r * nb * 16, w->d + r * nb, w->m + r * nb, x + t0 * k, nb);
            } else {
                q4_tile(w->codes + r * nb * 16, w->d + r * nb, w->m + r * nb, x + t0 * k, k, nt, yr, n);
            }
            if (w->bias)
                for (int j = 0; j < nt; j++) yr[j * n] += w->bias[r];
        }
    }
    team_barrier(nth);
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

/* ---------------------------------------------------------------------------------------- the forward */
typedef struct {
    const Model *M;
    const int64_t *tokens;
    int64_t T, pos, max_len, ctx;
    float *const *kcache, *const *vcache;
    float *logits, *x, *h, *tmp, *qkv, *att, *gu, *scores;
    _Atomic int64_t *jobs; /* one zeroed counter per layer: the attention's (head, token) pairs */
} LMRegion;

static void lm_region(void *arg, int tid, int nth) {
    const LMRegion *a = (const LMRegion *)arg;
    const Model *M = a->M;
    const int64_t T = a->T, pos = a->pos, max_len = a->max_len, ctx = a->ctx;
    const int64_t H = M->hidden, D = M->head_dim, NH = M->heads, KV = M->kv_heads, I = M->inter;
    const int64_t qd = NH * D, kvd = KV * D, nqkv = qd + 2 * kvd, half = D / 2, group = NH / KV, hb = H / 32;
    float *x = a->x, *h = a->h, *tmp = a->tmp, *qkv = a->qkv, *att = a->att, *gu = a->gu;
    float *const *kcache = a->kcache, *const *vcache = a->vcache;
    const float scale = 1.0f / sqrtf((float)D);
    for (int64_t l = 0; l < M->layers; l++) {
        const Layer *L = &M->layer[l];
        TEAM_FOR(t, T) rms_norm(x + t * H, L->attn_norm, h + t * H, H, M->eps);
        team_barrier(nth);
        q4_gemm(&L->qkv, h, T, qkv, tid, nth);
        TEAM_FOR(t, T) {
            const int64_t p = pos + t;
            const float *cs = M->rope_cos + p * half, *sn = M->rope_sin + p * half;
            float *row = qkv + t * nqkv;
            for (int64_t hd = 0; hd < NH; hd++) rope(row + hd * D, cs, sn, half);
            for (int64_t hd = 0; hd < KV; hd++) {
                float *k = row + qd + hd * D;
                rope(k, cs, sn, half);
                memcpy(kcache[l] + (hd * max_len + p) * D, k, sizeof(float) * D);
                memcpy(vcache[l] + (hd * max_len + p) * D, row + qd + kvd + hd * D, sizeof(float) * D);
            }
        }
        team_barrier(nth);
        TEAM_DYNAMIC_FOR(job, NH * T, &a->jobs[l]) {
            const int64_t hd = job % NH, t = job / NH, n_ctx = pos + t + 1;
            const float *q = qkv + t * nqkv + hd * D;
            const float *K = kcache[l] + (hd / group) * max_len * D, *V = vcache[l] + (hd / group) * max_len * D;
            float *s = a->scores + (int64_t)tid * ctx, mx = -INFINITY, sum = 0.f;
            for (int64_t u = 0; u < n_ctx; u++) {
                s[u] = dot(q, K + u * D, D) * scale;
                if (s[u] > mx) mx = s[u];
            }
            for (int64_t u = 0; u < n_ctx; u++) { s[u] = expf(s[u] - mx); sum += s[u]; }
            float *o = att + t * qd + hd * D;
            for (int64_t j = 0; j < D; j++) o[j] = 0.f;
            for (int64_t u = 0; u < n_ctx; u++) {
                const float pu = s[u] / sum, *v = V + u * D;
                for (int64_t j = 0; j < D; j++) o[j] += pu * v[j];
            }
        }
        team_barrier(nth);
        q4_gemm(&L->o, att, T, tmp, tid, nth);
        TEAM_FOR(t, T) {
            for (int64_t i = 0; i < H; i++) x[t * H + i] += tmp[t * H + i];
            rms_norm(x + t * H, L->ffn_norm, h + t * H, H, M->eps);
        }
        team_barrier(nth);
        q4_gemm(&L->gate_up, h, T, gu, tid, nth);
        TEAM_FOR(t, T) {
            float *g = gu + t * 2 * I;
            for (int64_t i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
        }
        team_barrier(nth);
        /* down reads the activations with a stride of 2I: compact them to [T, I] first */
        if (tid == 0)
            for (int64_t t = 1; t < T; t++) memmove(gu + t * I, gu + t * 2 * I, sizeof(float) * I);
        team_barrier(nth);
        q4_gemm(&L->down, gu, T, tmp, tid, nth);
        TEAM_FOR(t, T)
            for (int64_t i = 0; i < H; i++) x[t * H + i] += tmp[t * H + i];
        team_barrier(nth);
    }
    if (tid == 0) rms_norm(x + (T - 1) * H, M->final_norm, h, H, M->eps);
    team_barrier(nth);
    TEAM_FOR(r, M->vocab) a->logits[r] = q8_row(M->head_codes + r * H, M->head_scales + r * hb, h, hb);
}

static int lm_threads = 0; /* edge_lm_set_threads; 0: the CPUs online */

/* Runs the `T` tokens at positions pos .. pos+T-1 (prefill when T > 1, a decode step when T == 1), appends
 * their keys and values to the cache and writes the vocab logits of the last one. 0 on success. */
int edge_forward(const Model *M, const int64_t *tokens, int64_t T, int64_t pos, float *const *kcache,
                 float *const *vcache, int64_t max_len, float *logits) {
    if (T < 1 || pos < 0 || pos + T > max_len || pos + T > M->max_pos) return 1;
    for (int64_t t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= M->vocab) return 1;
    const int64_t H = M->hidden, D = M->head_dim, NH = M->heads, KV = M->kv_heads, I = M->inter;
    const int64_t qd = NH * D, kvd = KV * D, nqkv = qd + 2 * kvd;
    const int64_t ctx = pos + T;
    const size_t per_token = (size_t)(3 * H + nqkv + qd + 2 * I);
    const int threads = lm_threads > 0 ? lm_threads : default_team_threads();
    float *buf = (float *)malloc(sizeof(float) * (per_token * (size_t)T + (size_t)threads * (size_t)ctx));
    _Atomic int64_t *jobs = (_Atomic int64_t *)calloc((size_t)M->layers, sizeof(_Atomic int64_t));
    if (!buf || !jobs) { free(buf); free(jobs); return 2; }
    LMRegion a = {M, tokens, T, pos, max_len, ctx, kcache, vcache, logits};
    a.x = buf; a.h = a.x + H * T; a.tmp = a.h + H * T; a.qkv = a.tmp + H * T; a.att = a.qkv + nqkv * T;
    a.gu = a.att + qd * T; a.scores = a.gu + 2 * I * T; a.jobs = jobs;
    const int64_t hb = H / 32;
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < hb; b++)
            for (int i = 0; i < 32; i++)
                a.x[t * H + b * 32 + i] = M->emb_scales[tokens[t] * hb + b] * (float)M->emb_codes[tokens[t] * H + b * 32 + i];
    team_run(lm_region, &a, threads);
    free(jobs);
    free(buf);
    return 0;
}

void edge_lm_set_threads(int n) { if (n > 0) lm_threads = n; }

/* ------------------------------------------------- fp16 / fp32 rows times fp32 vectors (Whisper's decoder) */
/* out[r, v] = x[r, :] . table[v, :]. Whisper's decoder ties its output projection to its token table, which
 * checkpoints store in fp16: converting each fp16 value to fp32 and multiplying in fp32 gives the float model's
 * logits (to the order of the sums) from half the bytes an fp32 table streams per token. An fp32 table (`f16` 0)
 * is read as it is. Chunks of HEAD_VB table rows are split over the threads; every row of x runs over a chunk
 * while it is in cache, eight table rows at a time, the fp16 values converted in registers. The decoder's weight
 * matrices run through the same eight-row kernels (`fmat_apply`).
 * (Measured on 2 Zen 4 cores, tiny.en's table: 1 row 0.7-1.0 ms; 64 rows 12 ms, where onnxruntime's fp32 GEMM
 * takes 9 ms; converting each chunk once into an fp32 buffer and running register tiles of several rows over it
 * was slower at every row count, 16-19 ms at 64 rows: the buffer's reads cost more than the conversions.) */
#define HEAD_VB 32

static float half_to_float(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        if (m == 0) {
            bits = s;
        } else { /* subnormal: normalize */
            e = 113;
            while (!(m & 0x400u)) { m <<= 1; e--; }
            bits = s | (e << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        bits = s | 0x7f800000u | (m << 13);
    } else {
        bits = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float dot_f16(const float *x, const uint16_t *w, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += x[i] * half_to_float(w[i]);
    return s;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#if defined(__AVX512F__)
#define HW 16
typedef __m512 hvec;
#define HZERO() _mm512_setzero_ps()
#define HLOAD(p) _mm512_loadu_ps(p)
#define HFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define HSUM(a) _mm512_reduce_add_ps(a)
#define HLOAD16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#else
#define HW 8
typedef __m256 hvec;
#define HZERO() _mm256_setzero_ps()
#define HLOAD(p) _mm256_loadu_ps(p)
#define HFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float hsum256(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#define HSUM(a) hsum256(a)
#if defined(__F16C__)
#define HLOAD16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif
#endif
#endif

/* one row of x times 8 table rows (stride dim) into out[0..7]: eight independent accumulators keep the loads in
 * flight (four: 1.3-1.7 ms a decode step, the conversions serialize; eight: 0.7-0.9 ms; sixteen: 0.8-0.9). One
 * body for both table types: WLOAD loads a vector of them as fp32, WVAL converts one. */
#define HEAD_ROW8_SCALAR(NAME, WT, WVAL)                                                                       \
static void NAME(const float *x, const WT *w, int64_t dim, float *out) {                                       \
    for (int j = 0; j < 8; j++) {                                                                              \
        float s = 0.f;                                                                                         \
        for (int64_t t = 0; t < dim; t++) s += x[t] * WVAL(w[j * dim + t]);                                    \
        out[j] = s;                                                                                            \
    }                                                                                                          \
}
#define HEAD_ROW8_VEC(NAME, WT, WLOAD, WVAL)                                                                   \
static void NAME(const float *x, const WT *w, int64_t dim, float *out) {                                       \
    hvec a[8];                                                                                                 \
    for (int j = 0; j < 8; j++) a[j] = HZERO();                                                                \
    int64_t d = 0;                                                                                             \
    for (; d + HW <= dim; d += HW) {                                                                           \
        const hvec xv = HLOAD(x + d);                                                                          \
        for (int j = 0; j < 8; j++) a[j] = HFMA(xv, WLOAD(w + j * dim + d), a[j]);                             \
    }                                                                                                          \
    for (int j = 0; j < 8; j++) {                                                                              \
        float s = HSUM(a[j]);                                                                                  \
        for (int64_t t = d; t < dim; t++) s += x[t] * WVAL(w[j * dim + t]);                                    \
        out[j] = s;                                                                                            \
    }                                                                                                          \
}
#define F32_VALUE(v) (v)
#if defined(HW) && defined(HLOAD16)
HEAD_ROW8_VEC(head_row8_f16, uint16_t, HLOAD16, half_to_float)
#else
HEAD_ROW8_SCALAR(head_row8_f16, uint16_t, half_to_float)
#endif
#if defined(HW)
HEAD_ROW8_VEC(head_row8_f32, float, HLOAD, F32_VALUE)
#else
HEAD_ROW8_SCALAR(head_row8_f32, float, F32_VALUE)
#endif

/* table rows [c*HEAD_VB, (c+1)*HEAD_VB) times each of the `rows` rows of x into out[r, v] (a chunk of the table
 * stays in cache while every row runs over it). */
static void head_chunk(const void *table, int f16, int64_t vocab, int64_t dim, const float *x, int64_t rows,
                       float *out, int64_t c) {
    const int64_t v0 = c * HEAD_VB, nw = vocab - v0 < HEAD_VB ? vocab - v0 : HEAD_VB;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * vocab + v0;
        int64_t v = 0;
        if (f16) {
            const uint16_t *w = (const uint16_t *)table + v0 * dim;
            for (; v + 8 <= nw; v += 8) head_row8_f16(xr, w + v * dim, dim, o + v);
            for (; v < nw; v++) o[v] = dot_f16(xr, w + v * dim, dim);
        } else {
            const float *w = (const float *)table + v0 * dim;
            for (; v + 8 <= nw; v += 8) head_row8_f32(xr, w + v * dim, dim, o + v);
            for (; v < nw; v++) o[v] = dot(xr, w + v * dim, dim);
        }
    }
}

/* ------------------------------------------------------------------------------------ Whisper's decoder */
/* One call of Whisper's text decoder (openai-whisper's TextDecoder, edge_mmm/models/whisper.py): B sequences of
 * T new tokens at positions offset .. offset+T-1, their keys and values appended to the caller's self-attention
 * cache, cross-attention over the encoder's keys and values of each layer, the logits of every new position
 * from the tied token table. Checkpoints store Whisper in fp16 (openai-whisper, CTranslate2): each weight matrix
 * is read as stored (fp16 or fp32, `FMat.f16`) and converted to fp32 in registers, so the products are the float
 * model's, from half the bytes an fp32 copy streams per step; biases, norms, activations, attention and the
 * caches are fp32. The logits match the float model to fp32 rounding (the order of the sums differs).
 * Layouts (row-major): weights [n, k] (torch's Linear), self cache [layers, B, max_len, dim] (heads side by
 * side in dim), cross K^T [B, heads, head_dim, A] and V [B, heads, A, head_dim] per layer (`TextDecoder.cross_kv`).
 * Threads: one team region per call (`team_run`); output rows of each matrix, (sequence, head) pairs of
 * attention and chunks of the table are split over the threads. */
typedef struct {
    const void *w;      /* [n, k] */
    int64_t f16;        /* 1: w is fp16, 0: fp32 */
    const float *bias;  /* [n] or NULL */
    int64_t n, k;
} FMat;

typedef struct {
    const float *attn_ln_w, *attn_ln_b;
    FMat qkv, out;                       /* self attention: q|k|v rows (the key has no bias: zeros) */
    const float *cross_ln_w, *cross_ln_b;
    FMat cross_q, cross_out;
    const float *mlp_ln_w, *mlp_ln_b;
    FMat fc1, fc2;
} WLayer;

typedef struct {
    int64_t dim, layers, heads, inter, vocab, n_ctx, table_f16;
    float eps;
    const void *table;                   /* [vocab, dim]: token embedding and output projection */
    const float *pos;                    /* [n_ctx, dim] */
    const float *ln_w, *ln_b;            /* the final layer norm */
    const WLayer *layer;                 /* [layers] */
} WModel;

/* y[r, :] = W x[r, :] + bias for r < R; inside a team region, groups of 8 output rows over the threads. */
static void fmat_apply(const FMat *W, const float *x, int64_t R, float *y, int tid, int nth) {
    const int64_t n = W->n, k = W->k, groups = (n + 7) / 8;
    TEAM_FOR(g, groups) {
        const int64_t j0 = g * 8, nw = n - j0 < 8 ? n - j0 : 8;
        float acc[8];
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * k;
            if (W->f16) {
                const uint16_t *w = (const uint16_t *)W->w + j0 * k;
                if (nw == 8) head_row8_f16(xr, w, k, acc);
                else for (int64_t j = 0; j < nw; j++) acc[j] = dot_f16(xr, w + j * k, k);
            } else {
                const float *w = (const float *)W->w + j0 * k;
                if (nw == 8) head_row8_f32(xr, w, k, acc);
                else for (int64_t j = 0; j < nw; j++) acc[j] = dot(xr, w + j * k, k);
            }
            for (int64_t j = 0; j < nw; j++) y[r * n + j0 + j] = acc[j] + (W->bias ? W->bias[j0 + j] : 0.f);
        }
    }
    team_barrier(nth);
}

static void layer_norm(const float *x, const float *w, const float *b, float *out, int64_t n, float eps) {
    float mean = 0.f, var = 0.f;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int64_t i = 0; i < n; i++) { const float d = x[i] - mean; var += d * d; }
    const float inv = 1.0f / sqrtf(var / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* softmax of s[0..n) in place */
static void softmax_inplace(float *s, int64_t n) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t u = 0; u < n; u++) if (s[u] > mx) mx = s[u];
    for (int64_t u = 0; u < n; u++) { s[u] = expf(s[u] - mx); sum += s[u]; }
    const float inv = 1.0f / sum;
    for (int64_t u = 0; u < n; u++) s[u] *= inv;
}

/* o[0..hd) = sum_u p[u] * v[u * stride .. +hd) for u < n: attention's weighted sum of value rows */
static void weighted_rows(const float *p, const float *v, int64_t n, int64_t stride, int64_t hd, float *o) {
    for (int64_t j = 0; j < hd; j++) o[j] = 0.f;
    for (int64_t u = 0; u < n; u++) {
        const float pu = p[u], *vu = v + u * stride;
        for (int64_t j = 0; j < hd; j++) o[j] += pu * vu[j];
    }
}

/* x[r] += add[r], then h[r] = layer_norm(x[r]) for the R rows (inside a team region: rows over the threads) */
static void add_then_norm(float *x, const float *add, const float *w, const float *b, float *h, int64_t R,
                          int64_t D, float eps, int tid, int nth) {
    TEAM_FOR(r, R) {
        for (int64_t i = 0; i < D; i++) x[r * D + i] += add[r * D + i];
        layer_norm(x + r * D, w, b, h + r * D, D, eps);
    }
    team_barrier(nth);
}

typedef struct {
    const WModel *M;
    const int64_t *tokens;
    int64_t B, T, offset, max_len, A, per_thread;
    float *self_k, *self_v, *logits, *x, *h, *q, *att, *tmp, *ff, *scores, *qkv;
    const float *const *cross_k, *const *cross_v;
    _Atomic int64_t *jobs; /* two zeroed counters per layer: self- and cross-attention's work items */
} WhisperRegion;

static void whisper_region(void *arg, int tid, int nth) {
    const WhisperRegion *a = (const WhisperRegion *)arg;
    const WModel *M = a->M;
    const int64_t B = a->B, T = a->T, offset = a->offset, max_len = a->max_len, A = a->A;
    const int64_t R = B * T, D = M->dim, NH = M->heads, HD = D / NH, I = M->inter;
    float *x = a->x, *h = a->h, *q = a->q, *att = a->att, *tmp = a->tmp, *ff = a->ff, *qkv = a->qkv;
    float *s = a->scores + (int64_t)tid * a->per_thread;
    const float scale = 1.0f / sqrtf((float)HD);
    for (int64_t l = 0; l < M->layers; l++) {
        const WLayer *L = &M->layer[l];
        float *K = a->self_k + l * B * max_len * D, *V = a->self_v + l * B * max_len * D;
        /* self attention */
        TEAM_FOR(r, R) layer_norm(x + r * D, L->attn_ln_w, L->attn_ln_b, h + r * D, D, M->eps);
        team_barrier(nth);
        fmat_apply(&L->qkv, h, R, qkv, tid, nth);
        TEAM_FOR(r, R) {
            const int64_t b = r / T, p = offset + r % T;
            memcpy(K + (b * max_len + p) * D, qkv + r * 3 * D + D, sizeof(float) * D);
            memcpy(V + (b * max_len + p) * D, qkv + r * 3 * D + 2 * D, sizeof(float) * D);
        }
        team_barrier(nth);
        TEAM_DYNAMIC_FOR(job, R * NH, &a->jobs[2 * l]) {
            const int64_t hd = job % NH, r = job / NH, b = r / T, n_ctx = offset + r % T + 1;
            const float *qr = qkv + r * 3 * D + hd * HD;
            const float *Kb = K + b * max_len * D + hd * HD, *Vb = V + b * max_len * D + hd * HD;
            for (int64_t u = 0; u < n_ctx; u++) s[u] = dot(qr, Kb + u * D, HD) * scale;
            softmax_inplace(s, n_ctx);
            weighted_rows(s, Vb, n_ctx, D, HD, att + r * D + hd * HD);
        }
        team_barrier(nth);
        fmat_apply(&L->out, att, R, tmp, tid, nth);
        add_then_norm(x, tmp, L->cross_ln_w, L->cross_ln_b, h, R, D, M->eps, tid, nth);
        /* cross attention: each (sequence, head) reads its keys and values once for all T rows */
        fmat_apply(&L->cross_q, h, R, q, tid, nth);
        TEAM_DYNAMIC_FOR(job, B * NH, &a->jobs[2 * l + 1]) {
            const int64_t hd = job % NH, b = job / NH;
            const float *Kt = a->cross_k[l] + (b * NH + hd) * HD * A;  /* [HD, A] */
            const float *Vh = a->cross_v[l] + (b * NH + hd) * A * HD;  /* [A, HD] */
            for (int64_t t = 0; t < T * A; t++) s[t] = 0.f;
            for (int64_t j = 0; j < HD; j++) {
                const float *kr = Kt + j * A;
                for (int64_t t = 0; t < T; t++) {
                    const float qj = q[(b * T + t) * D + hd * HD + j] * scale;
                    float *st = s + t * A;
                    for (int64_t u = 0; u < A; u++) st[u] += qj * kr[u];
                }
            }
            for (int64_t t = 0; t < T; t++) {
                softmax_inplace(s + t * A, A);
                weighted_rows(s + t * A, Vh, A, HD, HD, att + (b * T + t) * D + hd * HD);
            }
        }
        team_barrier(nth);
        fmat_apply(&L->cross_out, att, R, tmp, tid, nth);
        add_then_norm(x, tmp, L->mlp_ln_w, L->mlp_ln_b, h, R, D, M->eps, tid, nth);
        /* MLP: fc1, exact (erf) GELU, fc2 */
        fmat_apply(&L->fc1, h, R, ff, tid, nth);
        TEAM_FOR(i, R * I) ff[i] = 0.5f * ff[i] * (1.0f + erff(ff[i] * 0.70710678118654752f));
        team_barrier(nth);
        fmat_apply(&L->fc2, ff, R, tmp, tid, nth);
        TEAM_FOR(r, R)
            for (int64_t i = 0; i < D; i++) x[r * D + i] += tmp[r * D + i];
        team_barrier(nth);
    }
    TEAM_FOR(r, R) layer_norm(x + r * D, M->ln_w, M->ln_b, h + r * D, D, M->eps);
    team_barrier(nth);
    TEAM_FOR(c, (M->vocab + HEAD_VB - 1) / HEAD_VB) head_chunk(M->table, (int)M->table_f16, M->vocab, D, h, R, a->logits, c);
}

/* 0 on success; 1 for bad sizes or a token outside the vocabulary; 2 when out of memory. */
int edge_whisper_step(const WModel *M, const int64_t *tokens, int64_t B, int64_t T, int64_t offset,
                      float *self_k, float *self_v, int64_t max_len, const float *const *cross_k,
                      const float *const *cross_v, int64_t A, float *logits, int threads) {
    if (B < 1 || T < 1 || A < 1 || offset < 0 || offset + T > max_len || offset + T > M->n_ctx) return 1;
    const int64_t R = B * T, D = M->dim, NH = M->heads, HD = D / NH, I = M->inter, ctx = offset + T;
    if (HD * NH != D) return 1;
    for (int64_t r = 0; r < R; r++)
        if (tokens[r] < 0 || tokens[r] >= M->vocab) return 1;
    const int nt = threads > 0 ? threads : default_team_threads();
    const int64_t per_thread = T * (A > ctx ? A : ctx);  /* one (sequence, head)'s scores */
    float *buf = (float *)malloc(sizeof(float) * ((size_t)R * (size_t)(8 * D + I) + (size_t)nt * (size_t)per_thread));
    _Atomic int64_t *jobs = (_Atomic int64_t *)calloc((size_t)(2 * M->layers), sizeof(_Atomic int64_t));
    if (!buf || !jobs) { free(buf); free(jobs); return 2; }
    WhisperRegion a = {M, tokens, B, T, offset, max_len, A, per_thread, self_k, self_v, logits};
    a.x = buf; a.h = a.x + R * D; a.q = a.h + R * D; a.att = a.q + R * D; a.tmp = a.att + R * D;
    a.qkv = a.tmp + R * D; a.ff = a.qkv + R * 3 * D; a.scores = a.ff + R * I;
    a.cross_k = cross_k; a.cross_v = cross_v; a.jobs = jobs;
    for (int64_t r = 0; r < R; r++) {
        const int64_t p = offset + r % T;
        for (int64_t i = 0; i < D; i++) {
            const float e = M->table_f16 ? half_to_float(((const uint16_t *)M->table)[tokens[r] * D + i])
                                         : ((const float *)M->table)[tokens[r] * D + i];
            a.x[r * D + i] = e + M->pos[p * D + i];
        }
    }
    team_run(whisper_region, &a, nt);
    free(jobs);
    free(buf);
    return 0;
}
