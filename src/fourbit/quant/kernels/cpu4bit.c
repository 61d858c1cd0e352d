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
