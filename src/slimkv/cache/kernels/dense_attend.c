/* Decoding over the dense caches of many sequences at once (see kernels/__init__.py).
 *
 * A running batch holds one cache per sequence, so the rows of one layer live in separate tensors of
 * different lengths. One call reads them all: for every (row r, KV head h) the head's n entries
 * start at keys[r] + h * stride[r] (values likewise), each entry D contiguous elements in float32 or
 * bfloat16, and the G query heads of its group attend over them. The softmax runs in float32.
 *
 *   q, out:       [rows, H * G, D] float32, contiguous
 *   kaddr, vaddr: [rows] addresses of each row's key and value storage ([H, capacity, D])
 *   stride:       [rows] elements between two heads of a row (capacity * D)
 *   len:          [rows * H] entries of every (row, head): slots [0, len) hold them
 *   bf16:         storage is bfloat16 (else float32)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)x << 16};
    return v.f;
}

/* s[g] = q[g] . k for the G <= 4 queries of a group, in one pass over the key */
static inline void dots4(const float *q, int G, int D, const void *key, int bf16, float *s) {
    const float *q0 = q, *q1 = G > 1 ? q + D : q, *q2 = G > 2 ? q + 2 * D : q, *q3 = G > 3 ? q + 3 * D : q;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    if (bf16) {
        const uint16_t *k = key;
        #pragma omp simd reduction(+:a0,a1,a2,a3)
        for (int d = 0; d < D; d++) {
            const float x = bf16_to_f32(k[d]);
            a0 += q0[d] * x; a1 += q1[d] * x; a2 += q2[d] * x; a3 += q3[d] * x;
        }
    } else {
        const float *k = key;
        #pragma omp simd reduction(+:a0,a1,a2,a3)
        for (int d = 0; d < D; d++) {
            const float x = k[d];
            a0 += q0[d] * x; a1 += q1[d] * x; a2 += q2[d] * x; a3 += q3[d] * x;
        }
    }
    s[0] = a0;
    if (G > 1) s[1] = a1;
    if (G > 2) s[2] = a2;
    if (G > 3) s[3] = a3;
}

/* acc[g] += p[g] * v for the NG queries of a group (NG a constant per instance, so the loops vectorize) */
#define AXPY(NG)                                                                                    \
    static inline void axpy_##NG(const float *p, int D, const void *value, int bf16, float *acc) {  \
        if (bf16) {                                                                                 \
            const uint16_t *v = value;                                                              \
            for (int g = 0; g < NG; g++) {                                                          \
                float *c = acc + g * D;                                                             \
                const float w = p[g];                                                               \
                _Pragma("omp simd") for (int d = 0; d < D; d++) c[d] += w * bf16_to_f32(v[d]);       \
            }                                                                                       \
        } else {                                                                                    \
            const float *v = value;                                                                 \
            for (int g = 0; g < NG; g++) {                                                          \
                float *c = acc + g * D;                                                             \
                const float w = p[g];                                                               \
                _Pragma("omp simd") for (int d = 0; d < D; d++) c[d] += w * v[d];                    \
            }                                                                                       \
        }                                                                                           \
    }
AXPY(1)
AXPY(2)
AXPY(3)
AXPY(4)

static inline void axpy4(const float *p, int G, int D, const void *value, int bf16, float *acc) {
    switch (G) {
        case 1: axpy_1(p, D, value, bf16, acc); break;
        case 2: axpy_2(p, D, value, bf16, acc); break;
        case 3: axpy_3(p, D, value, bf16, acc); break;
        default: axpy_4(p, D, value, bf16, acc); break;
    }
}

void dense_decode(int rows, int H, int G, int D, int bf16, float scale, const float *q,
                  const int64_t *kaddr, const int64_t *vaddr, const int64_t *stride, const int64_t *len,
                  float *out, int threads) {
    const int elem = bf16 ? 2 : 4;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < H; h++) {
            const int64_t n = len[(int64_t)r * H + h];
            const int64_t head = (int64_t)h * stride[r];
            const char *kbase = (const char *)(intptr_t)kaddr[r] + head * elem;
            const char *vbase = (const char *)(intptr_t)vaddr[r] + head * elem;
            const float *qh = q + ((int64_t)r * H * G + (int64_t)h * G) * D;
            float *oh = out + ((int64_t)r * H * G + (int64_t)h * G) * D;
            float *s = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * G);  /* [G, n] scores */
            float *acc = calloc((size_t)G * D, sizeof(float));
            float total[64], dot[4], p[64];
            for (int64_t t = 0; t < n; t++) {
                for (int g0 = 0; g0 < G; g0 += 4) {
                    const int gn = G - g0 < 4 ? G - g0 : 4;
                    dots4(qh + (int64_t)g0 * D, gn, D, kbase + t * D * elem, bf16, dot);
                    for (int j = 0; j < gn; j++) s[(int64_t)(g0 + j) * n + t] = dot[j] * scale;
                }
            }
            for (int g = 0; g < G; g++) {  /* softmax over contiguous scores (vectorized exp) */
                float *sg = s + (int64_t)g * n, mx = -INFINITY, z = 0.0f;
                #pragma omp simd reduction(max:mx)
                for (int64_t t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
                #pragma omp simd reduction(+:z)
                for (int64_t t = 0; t < n; t++) {
                    sg[t] = expf(sg[t] - mx);
                    z += sg[t];
                }
                total[g] = z;
            }
            for (int64_t t = 0; t < n; t++) {
                for (int g = 0; g < G; g++) p[g] = s[(int64_t)g * n + t];
                for (int g0 = 0; g0 < G; g0 += 4) {
                    const int gn = G - g0 < 4 ? G - g0 : 4;
                    axpy4(p + g0, gn, D, vbase + t * D * elem, bf16, acc + (int64_t)g0 * D);
                }
            }
            for (int g = 0; g < G; g++) {
                const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
                #pragma omp simd
                for (int d = 0; d < D; d++) oh[(int64_t)g * D + d] = acc[(int64_t)g * D + d] * inv;
            }
            free(acc);
            free(s);
        }
    }
}
