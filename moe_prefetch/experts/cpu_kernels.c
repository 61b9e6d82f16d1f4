/* The host lane's int8 and int4 matmuls on the stored bytes, at the speed of memory.
 *
 * Built at first use by cpu_kernels.py (`cc -O3 -march=native -shared -fPIC`, -fopenmp where the
 * compiler has it) and called through ctypes; torch's packed kernels remain the fallback.
 *
 *   int8  out[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n]          q int8 [N, K], scale fp32 [N]
 *   int4  out[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[g, n] + z[g, n])    g = k / group
 *         q in torch's CPU int4 block layout: per block of B rows, [K, B/2] bytes whose low
 *         nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1; sz bf16 [G, N, 2] (s, z)
 *
 * Why: torch's int8 kernel converts and multiplies every weight in fp32 per output and runs
 * compute-bound (about 5.4 GB/s of stored bytes on one Zen 4 core, where a copy reaches ~9). Here
 * each 16 codes are widened once and FMA'd into fp32 accumulators, four weight rows at a time
 * sharing one load of x, so the loop waits on DRAM, not on arithmetic. Sums are in fp32 (x in fp32,
 * exact from bf16), in another order than torch's: results agree to fp32 summation rounding,
 * rounded once into the output dtype.
 *
 * int4 sums x * (q - 8) per group and applies the group's scale and zero once per group:
 * s * sum(x (q - 8)) + z * sum(x), the same value as torch's per-weight (q - 8) * s + z up to
 * fp32 rounding, with two FMAs per weight fewer.
 *
 * Threads: output rows are split in whole blocks over `threads` OpenMP threads (torch's own
 * libgomp, already loaded by the time this library is, so one pool serves both). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MP_AVX512 1
#else
#define MP_AVX512 0
#endif

enum { MP_F32 = 0, MP_BF16 = 1 };

const char *mp_isa(void) { return MP_AVX512 ? "avx512" : "generic"; }

int mp_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void store_out(void *out, int dtype, int64_t i, float v) {
    if (dtype == MP_BF16)
        ((uint16_t *)out)[i] = f32_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* Room for the activations in fp32: on the stack up to a decode row of a large model, else malloc'd. */
#define MP_STACK_FLOATS 8192
static float *scratch_for(int64_t count, float *stack) {
    return count <= MP_STACK_FLOATS ? stack : (float *)malloc((size_t)count * sizeof(float));
}

/* x [m, k] in fp32: the input itself, or converted into `buf` (one pass over m * k values). */
static const float *x_f32(const void *x, int dtype, int64_t count, float *buf) {
    if (dtype == MP_F32) return (const float *)x;
    const uint16_t *h = (const uint16_t *)x;
    for (int64_t i = 0; i < count; i++) buf[i] = bf16_to_f32(h[i]);
    return buf;
}

/* ---------------------------------------------------------------- int8 */

/* Software prefetch distance per weight row: each row streams once, and the hardware prefetcher
 * alone left the loop waiting on DRAM (1024 x 1024 int8 matrices swept cold, one Zen 4 core, CPU
 * time: 123 us without, 110 us at 2 KiB, 115 us at 4 KiB; a plain read of the bytes 48 us). */
#define MP_PF_BYTES 2048

/* Dot products of x [k] with `rows` (1..4) int8 rows of q (row stride k), into acc[0..rows). */
static void int8_dot4(const float *x, const int8_t *q, int64_t k, int rows, float *acc) {
#if MP_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t *q0 = q, *q1 = q + (rows > 1) * k, *q2 = q + (rows > 2) * 2 * k, *q3 = q + (rows > 3) * 3 * k;
    int64_t i = 0;
#define MP_W(p, off) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((p) + (off)))))
    for (; i + 16 <= k; i += 16) {
        if ((i & 63) == 0) { /* one prefetch per cache line of each row (a hint: never faults) */
            _mm_prefetch((const char *)(q0 + MP_PF_BYTES + i), _MM_HINT_NTA);
            _mm_prefetch((const char *)(q1 + MP_PF_BYTES + i), _MM_HINT_NTA);
            _mm_prefetch((const char *)(q2 + MP_PF_BYTES + i), _MM_HINT_NTA);
            _mm_prefetch((const char *)(q3 + MP_PF_BYTES + i), _MM_HINT_NTA);
        }
        __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(xv, MP_W(q0, i), a0);
        a1 = _mm512_fmadd_ps(xv, MP_W(q1, i), a1);
        a2 = _mm512_fmadd_ps(xv, MP_W(q2, i), a2);
        a3 = _mm512_fmadd_ps(xv, MP_W(q3, i), a3);
    }
#undef MP_W
    if (i < k) { /* K not a multiple of 16: masked loads read nothing past the row */
        __mmask16 m = (__mmask16)((1u << (k - i)) - 1u);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
#define MP_WM(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (p) + i)))
        a0 = _mm512_fmadd_ps(xv, MP_WM(q0), a0);
        a1 = _mm512_fmadd_ps(xv, MP_WM(q1), a1);
        a2 = _mm512_fmadd_ps(xv, MP_WM(q2), a2);
        a3 = _mm512_fmadd_ps(xv, MP_WM(q3), a3);
#undef MP_WM
    }
    float r[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (int j = 0; j < rows; j++) acc[j] = r[j];
#else
    /* Sixteen lanes per row: the compiler vectorises across lanes without reassociating a sum. */
    float lanes[4][16];
    memset(lanes, 0, sizeof lanes);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        for (int j = 0; j < rows; j++) {
            const int8_t *qr = q + j * k + i;
            for (int l = 0; l < 16; l++) lanes[j][l] += x[i + l] * (float)qr[l];
        }
    for (int j = 0; j < rows; j++) {
        float s = 0.0f;
        for (int64_t t = i; t < k; t++) s += x[t] * (float)q[j * k + t];
        for (int l = 0; l < 16; l++) s += lanes[j][l];
        acc[j] = s;
    }
#endif
}

/* out [m, n] (dtype `out_dtype`) = x [m, k] (dtype `x_dtype`) . q [n, k]^T * scale [n]. Returns 0, or -1
 * when out of memory for x in fp32. */
int mp_int8_mm(const void *x, int x_dtype, int64_t m, int64_t k, const int8_t *q, const float *scale, int64_t n,
               void *out, int out_dtype, int threads) {
    (void)threads; /* used by the OpenMP pragmas only */
    float stack[MP_STACK_FLOATS];
    float *scratch = scratch_for(x_dtype == MP_F32 ? 0 : m * k, stack);
    if (!scratch) return -1;
    const float *xf = x_f32(x, x_dtype, m * k, scratch);
    int64_t quads = (n + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= 256)
    for (int64_t b = 0; b < quads; b++) {
        int64_t r = b * 4;
        int rows = (int)(n - r < 4 ? n - r : 4);
        /* m inner: the four weight rows (4 * k bytes) stay in L1 across the activation rows */
        for (int64_t i = 0; i < m; i++) {
            float acc[4];
            int8_dot4(xf + i * k, q + r * k, k, rows, acc);
            for (int j = 0; j < rows; j++) store_out(out, out_dtype, i * n + r + j, acc[j] * scale[r + j]);
        }
    }
    if (scratch != stack) free(scratch);
    return 0;
}

/* ---------------------------------------------------------------- int4 */

/* One block of `block` rows starting at row r0, for activation row x [k] with group sums xs [G]:
 * out_row[0..block). */
static void int4_block_dot(const float *x, const float *xs, const uint8_t *qb, const uint16_t *sz, int64_t n,
                           int64_t r0, int64_t k, int64_t group, int block, float *res) {
    int64_t groups = k / group;
    int half = block / 2;
#if MP_AVX512
    if (block == 64) {
        __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        const __m256i low4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
        const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
        for (int64_t g = 0; g < groups; g++) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
                __m512 xv = _mm512_set1_ps(x[kk]);
                __m256i b = _mm256_loadu_si256((const __m256i *)(qb + kk * 32));
                __m256i lo = _mm256_sub_epi8(_mm256_and_si256(b, low4), eight); /* rows 0..31 */
                __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4), eight); /* 32..63 */
                a0 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(lo))), a0);
                a1 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(lo, 1))), a1);
                a2 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(hi))), a2);
                a3 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(hi, 1))), a3);
            }
            /* (s, z) pairs of 16 rows as 32-bit words: s in the low half, z in the high half */
            const uint16_t *p = sz + (g * n + r0) * 2;
            __m512 xg = _mm512_set1_ps(xs[g]);
#define MP_SZ(o, a, rows)                                                                    \
    do {                                                                                     \
        __m512i u = _mm512_loadu_si512((const void *)(p + 2 * (rows)));                      \
        o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), a, o);            \
        o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(u, hi16)), xg, o);          \
    } while (0)
            MP_SZ(o0, a0, 0);
            MP_SZ(o1, a1, 16);
            MP_SZ(o2, a2, 32);
            MP_SZ(o3, a3, 48);
#undef MP_SZ
        }
        _mm512_storeu_ps(res, o0);
        _mm512_storeu_ps(res + 16, o1);
        _mm512_storeu_ps(res + 32, o2);
        _mm512_storeu_ps(res + 48, o3);
        return;
    }
#endif
    float acc[256];
    for (int j = 0; j < block; j++) res[j] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        for (int j = 0; j < block; j++) acc[j] = 0.0f;
        for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
            const uint8_t *b = qb + kk * half;
            float xv = x[kk];
            for (int j = 0; j < half; j++) {
                acc[j] += xv * (float)((int)(b[j] & 15) - 8);
                acc[half + j] += xv * (float)((int)(b[j] >> 4) - 8);
            }
        }
        const uint16_t *p = sz + (g * n + r0) * 2;
        for (int j = 0; j < block; j++) res[j] += bf16_to_f32(p[2 * j]) * acc[j] + bf16_to_f32(p[2 * j + 1]) * xs[g];
    }
}

/* out [m, n] = x [m, k] . dequant(q)^T, q [n / block, k, block / 2] bytes, sz bf16 [k / group, n, 2].
 * Returns 0, -1 for a shape this file does not take, -2 when out of memory. */
int mp_int4_mm(const void *x, int x_dtype, int64_t m, int64_t k, const uint8_t *q, const uint16_t *sz, int64_t n,
               int64_t group, int block, void *out, int out_dtype, int threads) {
    if (block < 2 || block > 256 || block % 2 || n % block || group < 1 || k % group) return -1;
    int64_t groups = k / group;
    (void)threads; /* used by the OpenMP pragmas only */
    float stack[MP_STACK_FLOATS];
    float *scratch = scratch_for(m * (k + groups), stack);
    if (!scratch) return -2;
    const float *xf = x_f32(x, x_dtype, m * k, scratch);
    float *xs = scratch + m * k; /* per activation row, the sum of x over each group */
    for (int64_t i = 0; i < m; i++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t kk = g * group; kk < (g + 1) * group; kk++) s += xf[i * k + kk];
            xs[i * groups + g] = s;
        }
    int64_t blocks = n / block;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks >= 4)
    for (int64_t b = 0; b < blocks; b++) {
        float res[256];
        const uint8_t *qb = q + b * k * (block / 2);
        for (int64_t i = 0; i < m; i++) {
            int4_block_dot(xf + i * k, xs + i * groups, qb, sz, n, b * block, k, group, block, res);
            for (int j = 0; j < block; j++) store_out(out, out_dtype, i * n + b * block + j, res[j]);
        }
    }
    if (scratch != stack) free(scratch);
    return 0;
}
