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
 * compute-bound (7.1 GB/s of stored bytes per expert on one Zen 4 core, where bf16's gemv reads
 * 15.4). Here each 16 codes are widened once and FMA'd into fp32 accumulators, row after row as
 * one sequential stream with a software prefetch ahead of it (11.7 GB/s). Sums are in fp32 (x in
 * fp32, exact from bf16), in another order than torch's: results agree to fp32 summation
 * rounding, rounded once into the output dtype.
 *
 * int4 sums x * q per group (q the unsigned code) and applies the group's scale and zero once:
 * s * sum(x q) + (z - 8 s) * sum(x), the same value as torch's per-weight (q - 8) * s + z up to
 * fp32 rounding, with two operations per weight fewer. With bf16 activations the sums take two
 * k at a time (AVX512-BF16 pair dot products: exact products, fp32 sums).
 *
 * Threads: output rows are split in contiguous ranges over up to `threads` OpenMP threads (torch's
 * own libgomp, already loaded by the time this library is, so one pool serves both: the lane's
 * `host_threads`), at least MP_SPLIT_BYTES of stored weights each: a fork and join costs a few
 * microseconds, and a core reads ~10 GB/s, so smaller shares gain nothing. Not yet shown to pay:
 * the development machine (2 cores, shared) ran every kernel slower on 2 threads, torch's too. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* -DMP_GENERIC forces the portable C (tests run it on an AVX-512 machine) */
#if !defined(MP_GENERIC) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MP_AVX512 1
#else
#define MP_AVX512 0
#endif
/* int4 with bf16 activations: byte permutes (VBMI) and bf16 pair dot products (AVX512_BF16) */
#if MP_AVX512 && defined(__AVX512VBMI__) && defined(__AVX512BF16__)
#define MP_DPBF16 1
#define MP_PAIR_MASK 0x5555555555555555ull
#else
#define MP_DPBF16 0
#endif

enum { MP_F32 = 0, MP_BF16 = 1 };

#define MP_SPLIT_BYTES (256 << 10)
/* int8 weight rows per step (the unit threads split): with several activation rows, a block of
 * 8 rows (8 KiB at K 1024) and four fp32 activation rows (16 KiB) share L1 */
#define MP_ROW_BLOCK 8

/* Threads for `bytes` of weights: one per MP_SPLIT_BYTES, at most `threads`. */
static int split_threads(int threads, int64_t bytes) {
    int64_t most = bytes / MP_SPLIT_BYTES;
    return (int)(most < threads ? (most < 1 ? 1 : most) : threads);
}

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

/* Software prefetch distance along the weights (a hint: never faults). Rows are read one after
 * another, so the whole matrix is one sequential stream. Measured cold (1024 x 1024 int8 matrices
 * swept, one Zen 4 core, CPU time per matrix): four rows at a time sharing each load of x, 123 us;
 * one row at a time, 80 us; with this prefetch 61-73 us (a plain read of the same bytes, 46). */
#define MP_PF_BYTES 2048

/* The dot product of x [k] (fp32) with one int8 row q [k]. */
static float int8_dot(const float *x, const int8_t *q, int64_t k) {
#if MP_AVX512
#define MP_W(off) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + (off)))))
    /* eight chains, so neither the FMAs' latency nor a cache miss stalls the next sum (eight
     * against four: 50 against 61 us per cold 1 MiB matrix, interleaved, CPU time) */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t i = 0;
    for (; i + 128 <= k; i += 128) {
        _mm_prefetch((const char *)(q + i + MP_PF_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + i + MP_PF_BYTES + 64), _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), MP_W(i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), MP_W(i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), MP_W(i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), MP_W(i + 48), a3);
        a4 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 64), MP_W(i + 64), a4);
        a5 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 80), MP_W(i + 80), a5);
        a6 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 96), MP_W(i + 96), a6);
        a7 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 112), MP_W(i + 112), a7);
    }
    for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), MP_W(i), a0);
#undef MP_W
    if (i < k) { /* K not a multiple of 16: masked loads read nothing past the row */
        __mmask16 m = (__mmask16)((1u << (k - i)) - 1u);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), w, a1);
    }
    a0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    a4 = _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7));
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a4));
#else
    /* 64 lanes: the compiler vectorises across lanes (four vector chains) without reassociating */
    float lanes[64];
    memset(lanes, 0, sizeof lanes);
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
#if defined(__GNUC__)
        __builtin_prefetch(q + i + MP_PF_BYTES);
#endif
        for (int l = 0; l < 64; l++) lanes[l] += x[i + l] * (float)q[i + l];
    }
    float s = 0.0f;
    for (; i < k; i++) s += x[i] * (float)q[i];
    for (int l = 0; l < 64; l++) s += lanes[l];
    return s;
#endif
}

/* Several activation rows (prefill): the dot products of `rows` (1..4) rows of x (row stride k)
 * with one int8 row q [k], into acc[0..rows). Each 16 codes are widened once for all four rows
 * (one activation row at a time ran at 1.2x torch's kernel on 4 rows, this at 1.7x; with the row
 * blocks below, 0.9-1.0x on 16 and 64 rows, where torch's kernel is compute-bound too). */
static void int8_dot_rows(const float *x, int rows, const int8_t *q, int64_t k, float *acc) {
#if MP_AVX512
    const float *x0 = x, *x1 = x + (rows > 1) * k, *x2 = x + (rows > 2) * 2 * k, *x3 = x + (rows > 3) * 3 * k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        if ((i & 63) == 0) _mm_prefetch((const char *)(q + i + MP_PF_BYTES), _MM_HINT_T0);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + i), w, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + i), w, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + i), w, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + i), w, a3);
    }
    if (i < k) {
        __mmask16 m = (__mmask16)((1u << (k - i)) - 1u);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x0 + i), w, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x1 + i), w, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x2 + i), w, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x3 + i), w, a3);
    }
    float r[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (int j = 0; j < rows; j++) acc[j] = r[j];
#else
    for (int j = 0; j < rows; j++) acc[j] = int8_dot(x + j * k, q, k);
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
    /* static: each thread one contiguous range of rows, one sequential stream */
    threads = split_threads(threads, n * k);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r0 = 0; r0 < n; r0 += MP_ROW_BLOCK) {
        int64_t r1 = r0 + MP_ROW_BLOCK < n ? r0 + MP_ROW_BLOCK : n;
        if (m == 1) {
            for (int64_t r = r0; r < r1; r++) store_out(out, out_dtype, r, int8_dot(xf, q + r * k, k) * scale[r]);
            continue;
        }
        /* a block of weight rows against four activation rows at a time: both stay in L1 while
         * the block's rows pass (all activation rows per weight row read x from L2 for every
         * row: 0.64-0.71x torch's kernel on 16 and 64 rows) */
        for (int64_t i = 0; i < m; i += 4) {
            int rows = (int)(m - i < 4 ? m - i : 4);
            for (int64_t r = r0; r < r1; r++) {
                float acc[4];
                int8_dot_rows(xf + i * k, rows, q + r * k, k, acc);
                for (int j = 0; j < rows; j++) store_out(out, out_dtype, (i + j) * n + r, acc[j] * scale[r]);
            }
        }
    }
    if (scratch != stack) free(scratch);
    return 0;
}

/* ---------------------------------------------------------------- int4 */

/* One block of `block` rows starting at row r0, for activation row x [k] with group sums xs [G]:
 * out_row[0..block). */
static void int4_block_dot(const float *x, const uint16_t *xb, const float *xs, const uint8_t *qb, const uint16_t *sz,
                           int64_t n, int64_t r0, int64_t k, int64_t group, int block, float *res) {
    int64_t groups = k / group;
    int half = block / 2;
    (void)xb; /* read by the bf16 pair path only */
#if MP_AVX512
    if (block == 64) {
        __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        const __m512i low4 = _mm512_set1_epi32(0x0f), hi16 = _mm512_set1_epi32((int)0xffff0000u);
        const __m512 eight = _mm512_set1_ps(8.0f);
#if MP_DPBF16
        /* byte 4j <- k's byte j, byte 4j + 2 <- k + 1's byte j (32 + j), odd bytes zeroed by the mask */
        uint8_t lo_idx[64], hi_idx[64];
        uint16_t table[32];
        for (int j = 0; j < 16; j++)
            for (int t = 0; t < 4; t++) {
                lo_idx[4 * j + t] = (uint8_t)(t == 2 ? 32 + j : j);
                hi_idx[4 * j + t] = (uint8_t)(t == 2 ? 48 + j : 16 + j);
            }
        for (int i = 0; i < 32; i++) table[i] = f32_to_bf16((float)(i & 15)); /* code -> bf16, exact */
        const __m512i pair_lo = _mm512_loadu_si512((const void *)lo_idx), pair_hi = _mm512_loadu_si512((const void *)hi_idx);
        const __m512i lut = _mm512_loadu_si512((const void *)table);
#endif
        for (int64_t g = 0; g < groups; g++) {
            /* The scales and zeros are read per group at a stride of n rows (4n bytes), which no
             * hardware prefetcher follows: fetch this block's next group and the next block's
             * same group (256 bytes each) while this group's codes stream. */
            const char *next = (const char *)(sz + ((g + 1 < groups ? g + 1 : g) * n + r0) * 2);
            const char *after = (const char *)(sz + (g * n + r0 + 64) * 2);
            for (int line = 0; line < 256; line += 64) {
                _mm_prefetch(next + line, _MM_HINT_T0);
                _mm_prefetch(after + line, _MM_HINT_T0);
            }
            /* sum of x * q per row, q the unsigned code: the - 8 goes into the zero term below */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#if MP_DPBF16
            if (xb) { /* bf16 activations: two k at a time, bf16 pairs (exact products, fp32 sums) */
                for (int64_t kk = g * group; kk < (g + 1) * group; kk += 2) {
                    const uint8_t *b = qb + kk * 32; /* k: bytes 0..31, k + 1: bytes 32..63 */
                    _mm_prefetch((const char *)(b + MP_PF_BYTES), _MM_HINT_T0);
                    __m512i z = _mm512_loadu_si512((const void *)b);
                    __m512bh xv = (__m512bh)_mm512_set1_epi32((int)((uint32_t)xb[kk] | (uint32_t)xb[kk + 1] << 16));
                    /* words (code of k, code of k + 1) per row, bytes zero-extended */
                    __m512i w0 = _mm512_maskz_permutexvar_epi8(MP_PAIR_MASK, pair_lo, z); /* bytes 0..15 */
                    __m512i w1 = _mm512_maskz_permutexvar_epi8(MP_PAIR_MASK, pair_hi, z); /* 16..31 */
                    /* the LUT reads an index's low 5 bits: the low nibble (and one bit it ignores) */
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_permutexvar_epi16(w0, lut), xv);
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_permutexvar_epi16(w1, lut), xv);
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w0, 4), lut), xv);
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w1, 4), lut), xv);
                }
            } else
#endif
            for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
                const uint8_t *b = qb + kk * 32;
                if ((kk & 1) == 0) _mm_prefetch((const char *)(b + MP_PF_BYTES), _MM_HINT_T0);
                __m512 xv = _mm512_set1_ps(x[kk]);
                __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));        /* bytes 0..15 */
                __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 16))); /* 16..31 */
                a0 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_and_si512(d0, low4)), a0); /* rows 0..15 */
                a1 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_and_si512(d1, low4)), a1); /* 16..31 */
                a2 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_srli_epi32(d0, 4)), a2);   /* 32..47 */
                a3 = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_srli_epi32(d1, 4)), a3);   /* 48..63 */
            }
            /* (s, z) pairs of 16 rows as 32-bit words: s in the low half, z in the high half;
             * out += s * sum(x q) + (z - 8 s) * sum(x) */
            const uint16_t *p = sz + (g * n + r0) * 2;
            __m512 xg = _mm512_set1_ps(xs[g]);
#define MP_SZ(o, a, rows)                                                                    \
    do {                                                                                     \
        __m512i u = _mm512_loadu_si512((const void *)(p + 2 * (rows)));                      \
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));                           \
        __m512 lo = _mm512_fnmadd_ps(eight, sc, _mm512_castsi512_ps(_mm512_and_si512(u, hi16))); \
        o = _mm512_fmadd_ps(sc, a, o);                                                       \
        o = _mm512_fmadd_ps(lo, xg, o);                                                      \
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
    threads = split_threads(threads, n * k / 2);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        float res[256];
        const uint8_t *qb = q + b * k * (block / 2);
        for (int64_t i = 0; i < m; i++) {
            const uint16_t *xb = x_dtype == MP_BF16 ? (const uint16_t *)x + i * k : NULL;
            int4_block_dot(xf + i * k, xb, xs + i * groups, qb, sz, n, b * block, k, group, block, res);
            for (int j = 0; j < block; j++) store_out(out, out_dtype, i * n + b * block + j, res[j]);
        }
    }
    if (scratch != stack) free(scratch);
    return 0;
}
