/* fourbit CPU kernels for blockwise 4-bit (NF4/FP4) quantization, compiled on first use.
 *
 * Built by fourbit/quant/kernels/cpu.py with the system C compiler into the fourbit cache and
 * loaded with ctypes; the pure-torch code in fourbit/quant/blockwise.py is the reference these
 * must match bit for bit (tests/test_quant_kernels_cpu.py). Each function works on a range of
 * blocks [b0, b1) so Python can split one tensor over threads (ctypes drops the GIL).
 *
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16 (half only where the compiler has _Float16).
 */
#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int fb_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

/* Dequantize blocks [b0, b1): out[e] = code[nibble(e)] * absmax[e / blocksize], the product in
 * float32 and then rounded to the output dtype. n = number of elements; blocksize is even.
 * Double quantization is resolved in the same pass when q8 is not NULL: the block constant is
 * code2[q8[b]] * absmax2[b / nested_bs] + offset (two float32 roundings, as in the reference). */
void fb_dequant4(const uint8_t *packed, const float *absmax, const float *code, void *out, int dtype,
                 int64_t n, int64_t blocksize, int64_t b0, int64_t b1, const uint8_t *q8, const float *code2,
                 int64_t nested_bs, float offset) {
    float tf[16];
    uint16_t th[16];
    for (int64_t b = b0; b < b1; b++) {
        float s;
        if (q8) {
            s = code2[q8[b]] * absmax[b / nested_bs];
            s = s + offset;
        } else {
            s = absmax[b];
        }
        for (int k = 0; k < 16; k++) tf[k] = code[k] * s;
        const int64_t e0 = b * blocksize;
        const int64_t e1 = (e0 + blocksize < n) ? e0 + blocksize : n;
        const uint8_t *p = packed + e0 / 2;
        const int64_t pairs = (e1 - e0) / 2, odd = (e1 - e0) & 1;
        if (dtype == 0) {
            float *o = (float *)out + e0;
            for (int64_t i = 0; i < pairs; i++) { o[2 * i] = tf[p[i] >> 4]; o[2 * i + 1] = tf[p[i] & 15]; }
            if (odd) o[2 * pairs] = tf[p[pairs] >> 4];
        } else {
            if (dtype == 1) {
                for (int k = 0; k < 16; k++) th[k] = f32_to_bf16(tf[k]);
            } else {
#ifdef __FLT16_MAX__
                for (int k = 0; k < 16; k++) { _Float16 h = (_Float16)tf[k]; memcpy(&th[k], &h, 2); }
#else
                return;
#endif
            }
            uint16_t *o = (uint16_t *)out + e0;
            for (int64_t i = 0; i < pairs; i++) { o[2 * i] = th[p[i] >> 4]; o[2 * i + 1] = th[p[i] & 15]; }
            if (odd) o[2 * pairs] = th[p[pairs] >> 4];
        }
    }
}

/* Convert elements [e0, e1) to float32 in buf (a block holds at most 4096 elements). */
static void load_block(const void *x, int dtype, int64_t e0, int64_t e1, float *buf) {
    const int64_t m = e1 - e0;
    if (dtype == 0) {
        memcpy(buf, (const float *)x + e0, (size_t)m * 4);
    } else if (dtype == 1) {
        const uint16_t *h = (const uint16_t *)x + e0;
        for (int64_t i = 0; i < m; i++) buf[i] = bf16_to_f32(h[i]);
    } else {
#ifdef __FLT16_MAX__
        const _Float16 *h = (const _Float16 *)x + e0;
        for (int64_t i = 0; i < m; i++) buf[i] = (float)h[i];
#endif
    }
}

/* Quantize blocks [b0, b1). mids: the 15 float32 midpoints between sorted levels; order: sorted
 * position -> 4-bit code. The code of x is order[#{i : x * (1 / absmax) > mids[i]}] (exact ties
 * go to the lower level). cpu_tail = 1 reproduces bitsandbytes' CPU rule: the last, partial
 * block divides by absmax instead of multiplying by its reciprocal (and stores max(absmax, 1e-38)),
 * and an all-zero block is scaled by 1 / 1e-38 (giving the code of 0.0); cpu_tail = 0 follows the
 * CUDA kernel, where an all-zero block gives code 0. An odd final element is paired with the code
 * of 0.0 (zero_code). A block holding NaN or Inf gets absmax NaN (the caller reports it). */
void fb_quant4(const void *x, int dtype, int64_t n, int64_t blocksize, const float *mids, const uint8_t *order,
               int cpu_tail, uint8_t zero_code, uint8_t *packed, float *absmax, int64_t b0, int64_t b1) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    float buf[4096];
    uint8_t q[4096 + 1];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t e0 = b * blocksize;
        const int64_t e1 = (e0 + blocksize < n) ? e0 + blocksize : n;
        const int64_t m = e1 - e0;
        load_block(x, dtype, e0, e1, buf);
        float amax = 0.0f;
        int bad = 0;
        for (int64_t i = 0; i < m; i++) {
            const float a = buf[i] < 0 ? -buf[i] : buf[i];
            bad |= !(a <= 3.4028234663852886e38f); /* NaN or Inf */
            amax = a > amax ? a : amax;
        }
        const int tail = cpu_tail && (b == nblocks - 1) && (n % blocksize != 0);
        const int zero = (amax == 0.0f);
        const float denom = (cpu_tail && zero) ? 1e-38f : amax;
        absmax[b] = bad ? __builtin_nanf("") : (tail ? denom : amax);
        if (tail) {
            for (int64_t i = 0; i < m; i++) buf[i] = buf[i] / denom;
        } else {
            const float r = 1.0f / denom;
            for (int64_t i = 0; i < m; i++) buf[i] = buf[i] * r;
        }
        for (int64_t i = 0; i < m; i++) q[i] = 0;
        for (int k = 0; k < 15; k++) {
            const float t = mids[k];
            for (int64_t i = 0; i < m; i++) q[i] += buf[i] > t;
        }
        if (zero && !cpu_tail) {
            for (int64_t i = 0; i < m; i++) q[i] = 0;
        } else {
            for (int64_t i = 0; i < m; i++) q[i] = order[q[i]];
        }
        q[m] = zero_code; /* pairs with an odd last element */
        uint8_t *p = packed + e0 / 2;
        for (int64_t i = 0; i < (m + 1) / 2; i++) p[i] = (uint8_t)((q[2 * i] << 4) | q[2 * i + 1]);
    }
}

/* ---- y = x @ dequant(W)^T straight from the packed codes (skinny matmul, 1 to ~16 rows of x) ----
 *
 * W is (O, K) row-major, flattened into blocks of `blocksize` elements that may cross row
 * boundaries (bitsandbytes' layout); row o of W is elements [o K, (o+1) K). Rows of W are
 * decoded a few at a time into a small per-thread buffer that stays in L1 -- code[q] * scale,
 * the same float32 values dequantization produces (the 16 products are formed once per block)
 * -- and then dotted with every row of x. W is never written to memory in full.
 *
 * Determinism: y[m, o] is always hsum(acc) + bias[o] where acc (8 float32 lanes; 4 partial
 * sums on the scalar path) is one chain of multiply-adds over row o in a fixed order. How rows
 * of x and W are tiled, and which thread owns row o, changes only which chains run side by
 * side, never the operations of one chain: one row of x gives bit-identical output alone or in a
 * batch (a serving engine needs this so that batched greedy decoding equals batch-1 decoding),
 * and with any thread count. The AVX2 and scalar paths differ from each other in summation
 * order (both within float32 rounding of the exact product).
 *
 * AVX2 path (K and blocksize multiples of 16): 16 elements = 8 packed bytes, widened to int32
 * lanes; the high nibbles (elements 2j) and low nibbles (elements 2j+1) are looked up in the
 * 16-entry table as two 8-entry halves (vpermps reads the low 3 bits of each index) blended on
 * bit 3 of the code. x is stored with each 16-element chunk de-interleaved (evens, then odds),
 * and so are decoded rows, so the dot products need no shuffles. Up to 4 rows of x (and rows of
 * W that start on a block) the decoded values go straight into the FMAs (fused_tile_avx2); more
 * rows read them back from the L1 buffer, so each row of W is decoded once. */
#include <stdlib.h>

int fb_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

typedef struct { /* one packed weight: what Python's _W4 mirrors */
    const uint8_t *packed;
    const float *absmax; /* float32 per block, or the nested absmax when q8 != NULL */
    const uint8_t *q8;
    const float *code2;
    int64_t nested_bs;
    float offset;
    const float *code;
    int64_t bs;
} fb_w4;

static inline float block_scale(const fb_w4 *w, int64_t b) {
    if (w->q8) {
        float s = w->code2[w->q8[b]] * w->absmax[b / w->nested_bs];
        return s + w->offset; /* two roundings, as dequantization does */
    }
    return w->absmax[b];
}

/* Scalar path: any K (an odd K makes rows start on a low nibble), any blocksize. */
static void decode_row_scalar(const fb_w4 *w, int64_t o, int64_t K, float *dst) {
    float t[16];
    const int64_t r0 = o * K, r1 = r0 + K;
    for (int64_t e = r0; e < r1;) {
        const int64_t b = e / w->bs;
        const int64_t se = ((b + 1) * w->bs < r1) ? (b + 1) * w->bs : r1;
        const float s = block_scale(w, b);
        for (int k = 0; k < 16; k++) t[k] = w->code[k] * s;
        for (int64_t j = e; j < se; j++) {
            const uint8_t byte = w->packed[j >> 1];
            dst[j - r0] = t[(j & 1) ? (byte & 15) : (byte >> 4)];
        }
        e = se;
    }
}

/* Four interleaved partial sums, combined in a fixed order. */
static inline float dot_scalar(const float *w, const float *x, int64_t K) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t i = 0;
    for (; i + 4 <= K; i += 4) {
        a0 += w[i] * x[i];
        a1 += w[i + 1] * x[i + 1];
        a2 += w[i + 2] * x[i + 2];
        a3 += w[i + 3] * x[i + 3];
    }
    for (; i < K; i++) a0 += w[i] * x[i];
    return (a0 + a1) + (a2 + a3);
}

static void mm_rows_scalar(const fb_w4 *w, const float *x, int64_t M, int64_t K, int64_t O, const float *bias,
                           float *y, int64_t o0, int64_t o1, float *wrow) {
    for (int64_t o = o0; o < o1; o++) {
        decode_row_scalar(w, o, K, wrow);
        for (int64_t m = 0; m < M; m++) {
            const float v = dot_scalar(wrow, x + m * K, K);
            y[m * O + o] = bias ? v + bias[o] : v;
        }
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FB_X86 1
#include <immintrin.h>
#define FB_AVX2 __attribute__((target("avx2,fma")))
#define FB_ROWS 4 /* rows of W decoded at a time: 4 K floats of buffer, in L1 for K up to ~2k */

FB_AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

FB_AVX2 static void decode_row_avx2(const fb_w4 *w, int64_t o, int64_t K, float *dst) {
    const __m256 tlo = _mm256_loadu_ps(w->code), thi = _mm256_loadu_ps(w->code + 8);
    const int64_t r0 = o * K, r1 = r0 + K;
    for (int64_t e = r0; e < r1;) {
        const int64_t b = e / w->bs;
        const int64_t se = ((b + 1) * w->bs < r1) ? (b + 1) * w->bs : r1;
        const __m256 s = _mm256_set1_ps(block_scale(w, b));
        const __m256 lo = _mm256_mul_ps(tlo, s), hi = _mm256_mul_ps(thi, s);
        for (int64_t c = e; c < se; c += 16) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->packed + (c >> 1))));
            const __m256i vh = _mm256_srli_epi32(v, 4);
            const __m256 wh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, vh), _mm256_permutevar8x32_ps(hi, vh),
                                               _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
            const __m256 wl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, v), _mm256_permutevar8x32_ps(hi, v),
                                               _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
            _mm256_storeu_ps(dst + (c - r0), wh);
            _mm256_storeu_ps(dst + (c - r0) + 8, wl);
        }
        e = se;
    }
}

/* acc[r][m] = the chain of row r of wb with row m of xp; RT, MT are constants after inlining. */
FB_AVX2 static inline __attribute__((always_inline)) void dot_tile_avx2(
        const float *wb, const float *xp, int64_t K, const int RT, const int MT, const float *bias, float *y,
        int64_t O, int64_t o, int64_t m0) {
    __m256 acc[FB_ROWS][2];
    for (int r = 0; r < RT; r++)
        for (int m = 0; m < MT; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += 8) {
        __m256 xv[2];
        for (int m = 0; m < MT; m++) xv[m] = _mm256_loadu_ps(xp + (m0 + m) * K + c);
        for (int r = 0; r < RT; r++) {
            const __m256 wv = _mm256_loadu_ps(wb + r * K + c);
            for (int m = 0; m < MT; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RT; r++)
        for (int m = 0; m < MT; m++) {
            float v = hsum8(acc[r][m]);
            if (bias) v += bias[o + r];
            y[(m0 + m) * O + o + r] = v;
        }
}

FB_AVX2 static void dot_rows_avx2(const float *wb, const float *xp, int64_t M, int64_t K, int rows,
                                  const float *bias, float *y, int64_t O, int64_t o) {
    int64_t m0 = 0;
    if (rows == FB_ROWS) {
        for (; m0 + 2 <= M; m0 += 2) dot_tile_avx2(wb, xp, K, FB_ROWS, 2, bias, y, O, o, m0);
        if (m0 < M) dot_tile_avx2(wb, xp, K, FB_ROWS, 1, bias, y, O, o, m0);
        return;
    }
    for (int r = 0; r < rows; r++) /* the last, partial group of rows */
        for (m0 = 0; m0 < M; m0++) dot_tile_avx2(wb + r * K, xp, K, 1, 1, bias, y, O, o + r, m0);
}

/* One or two rows of x, K a multiple of the blocksize (every row of W starts a block): RT rows of
 * W decoded in registers and used at once, no buffer. Each chain sees the same values in the
 * same order as through the buffer (code[q] * scale is the same float32 product whether the
 * table or the looked-up value is scaled), so both paths give the same bits. */
FB_AVX2 static inline __attribute__((always_inline)) void fused_tile_avx2(
        const fb_w4 *w, const float *xp, int64_t M, int64_t K, int64_t O, int64_t o, const int RT, const int MT,
        const float *bias, float *y) {
    const __m256 tlo = _mm256_loadu_ps(w->code), thi = _mm256_loadu_ps(w->code + 8);
    const int64_t nb = K / w->bs, b0 = o * nb;
    __m256 acc[4][4];
    for (int r = 0; r < RT; r++)
        for (int m = 0; m < MT; m++) acc[r][m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
        __m256 s[4];
        for (int r = 0; r < RT; r++) s[r] = _mm256_set1_ps(block_scale(w, b0 + r * nb + j));
        for (int64_t c = j * w->bs; c < (j + 1) * w->bs; c += 16) {
            __m256 xe[4], xo[4];
            for (int m = 0; m < MT; m++) {
                xe[m] = _mm256_loadu_ps(xp + m * K + c);
                xo[m] = _mm256_loadu_ps(xp + m * K + c + 8);
            }
            for (int r = 0; r < RT; r++) {
                const uint8_t *pr = w->packed + (((o + r) * K + c) >> 1);
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)pr));
                const __m256i vh = _mm256_srli_epi32(v, 4);
                const __m256 wh = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, vh),
                    _mm256_permutevar8x32_ps(thi, vh), _mm256_castsi256_ps(_mm256_slli_epi32(v, 24))), s[r]);
                const __m256 wl = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, v),
                    _mm256_permutevar8x32_ps(thi, v), _mm256_castsi256_ps(_mm256_slli_epi32(v, 28))), s[r]);
                for (int m = 0; m < MT; m++) {
                    acc[r][m] = _mm256_fmadd_ps(wh, xe[m], acc[r][m]);
                    acc[r][m] = _mm256_fmadd_ps(wl, xo[m], acc[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < RT; r++)
        for (int m = 0; m < MT; m++) {
            float v = hsum8(acc[r][m]);
            if (bias) v += bias[o + r];
            y[m * O + o + r] = v;
        }
    (void)M;
}

FB_AVX2 static void mm_rows_avx2(const fb_w4 *w, const float *xp, int64_t M, int64_t K, int64_t O,
                                 const float *bias, float *y, int64_t o0, int64_t o1, float *wb) {
    if (M <= 4 && K % w->bs == 0) {
        int64_t o = o0;
        switch (M) {
            case 1:
                for (; o + 4 <= o1; o += 4) fused_tile_avx2(w, xp, M, K, O, o, 4, 1, bias, y);
                for (; o < o1; o++) fused_tile_avx2(w, xp, M, K, O, o, 1, 1, bias, y);
                break;
            case 2:
                for (; o + 2 <= o1; o += 2) fused_tile_avx2(w, xp, M, K, O, o, 2, 2, bias, y);
                for (; o < o1; o++) fused_tile_avx2(w, xp, M, K, O, o, 1, 2, bias, y);
                break;
            case 3:
                for (; o + 2 <= o1; o += 2) fused_tile_avx2(w, xp, M, K, O, o, 2, 3, bias, y);
                for (; o < o1; o++) fused_tile_avx2(w, xp, M, K, O, o, 1, 3, bias, y);
                break;
            default:
                for (; o + 2 <= o1; o += 2) fused_tile_avx2(w, xp, M, K, O, o, 2, 4, bias, y);
                for (; o < o1; o++) fused_tile_avx2(w, xp, M, K, O, o, 1, 4, bias, y);
        }
        return;
    }
    for (int64_t o = o0; o < o1; o += FB_ROWS) {
        const int rows = (int)((o1 - o < FB_ROWS) ? o1 - o : FB_ROWS);
        for (int r = 0; r < rows; r++) decode_row_avx2(w, o + r, K, wb + r * K);
        dot_rows_avx2(wb, xp, M, K, rows, bias, y, O, o);
    }
}
#endif

int fb_has_avx2(void) {
#ifdef FB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* y (M, O) = x (M, K) @ dequant(W)^T (+ bias) for output rows [o0, o1), split over `nthreads`
 * OpenMP threads when built with OpenMP (else the caller splits the rows). use_avx2: 1 to take
 * the AVX2 path where shapes allow (the caller passes fb_has_avx2()), 0 for the scalar one.
 * Returns 0, or -1 when a scratch allocation failed (y is then unspecified). */
int fb_matmul4(const float *x, int64_t M, int64_t K, int64_t O, const fb_w4 *wq, const float *bias, float *y,
               int64_t o0, int64_t o1, int nthreads, int use_avx2) {
    const fb_w4 w = *wq;
    const int64_t blocksize = w.bs;
    if (o1 <= o0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (o1 - o0 < nthreads) nthreads = (int)(o1 - o0);
    const int64_t step = (o1 - o0 + nthreads - 1) / nthreads;
    int avx2 = 0;
    const float *xs = x;
    float *xp = NULL;
#ifdef FB_X86
    avx2 = use_avx2 && K % 16 == 0 && blocksize % 16 == 0;
    if (avx2) { /* x with each 16-element chunk de-interleaved, like the decoded rows */
        xp = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xp) return -1;
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < K; c += 16)
                for (int i = 0; i < 8; i++) {
                    xp[m * K + c + i] = x[m * K + c + 2 * i];
                    xp[m * K + c + 8 + i] = x[m * K + c + 2 * i + 1];
                }
        xs = xp;
    }
#endif
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) if (nthreads > 1) reduction(| : failed)
#endif
    for (int t = 0; t < nthreads; t++) {
        const int64_t a = o0 + t * step, z = (a + step < o1) ? a + step : o1;
        if (a >= z) continue;
        float *wb = (float *)malloc((size_t)(4 * K) * sizeof(float));
        if (!wb) {
            failed = 1;
            continue;
        }
#ifdef FB_X86
        if (avx2) mm_rows_avx2(&w, xs, M, K, O, bias, y, a, z, wb);
        else
#endif
            mm_rows_scalar(&w, xs, M, K, O, bias, y, a, z, wb);
        free(wb);
    }
    free(xp);
    return failed ? -1 : 0;
}

/* y (M, O) = x (M, K) @ W^T (+ bias) for a float32 W (O, K), row-major: the small float32 products
 * that sit next to a 4-bit one (a LoRA adapter's A and B, an lm_head), with the same guarantee as
 * fb_matmul4 -- y[m, o] is one chain of multiply-adds over k in a fixed order, whatever M, the
 * tiling and the threads -- which BLAS does not give (its kernels for 1 row and for 8 differ). */
int fb_matmul_f32(const float *x, int64_t M, int64_t K, int64_t O, const float *w, const float *bias, float *y,
                  int64_t o0, int64_t o1, int nthreads, int use_avx2) {
    if (o1 <= o0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (o1 - o0 < nthreads) nthreads = (int)(o1 - o0);
    const int64_t step = (o1 - o0 + nthreads - 1) / nthreads;
    int avx2 = 0;
#ifdef FB_X86
    avx2 = use_avx2 && K % 8 == 0;
#endif
    (void)use_avx2;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) if (nthreads > 1)
#endif
    for (int t = 0; t < nthreads; t++) {
        const int64_t a = o0 + t * step, z = (a + step < o1) ? a + step : o1;
#ifdef FB_X86
        if (avx2) {
            for (int64_t o = a; o < z; o += FB_ROWS) {
                const int rows = (int)((z - o < FB_ROWS) ? z - o : FB_ROWS);
                dot_rows_avx2(w + o * K, x, M, K, rows, bias, y, O, o);
            }
            continue;
        }
#endif
        for (int64_t o = a; o < z; o++) {
            const float *wr = w + o * K;
            for (int64_t m = 0; m < M; m++) {
                const float v = dot_scalar(wr, x + m * K, K);
                y[m * O + o] = bias ? v + bias[o] : v;
            }
        }
    }
    return 0;
}
