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

static inline void load_row(const void *base, int64_t index, int D, int bf16, float *dst) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)base + index * D;
        #pragma omp simd
        for (int d = 0; d < D; d++) {
            uint32_t bits = ((uint32_t)src[d]) << 16;
            float f;
            memcpy(&f, &bits, sizeof f);
            dst[d] = f;
        }
    } else {
        memcpy(dst, (const float *)base + index * D, sizeof(float) * D);
    }
}

void dense_decode(int rows, int H, int G, int D, int bf16, float scale, const float *q,
                  const int64_t *kaddr, const int64_t *vaddr, const int64_t *stride, const int64_t *len,
                  float *out, int threads) {
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < H; h++) {
            const int64_t n = len[(int64_t)r * H + h];
            const int64_t head = (int64_t)h * stride[r];
            const char *kbase = (const char *)(intptr_t)kaddr[r] + head * (bf16 ? 2 : 4);
            const char *vbase = (const char *)(intptr_t)vaddr[r] + head * (bf16 ? 2 : 4);
            const float *qh = q + ((int64_t)r * H * G + (int64_t)h * G) * D;
            float *oh = out + ((int64_t)r * H * G + (int64_t)h * G) * D;
            float *s = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * G);
            float row[1024], acc[8 * 1024];
            float *sum_acc = G * D <= 8 * 1024 ? acc : malloc(sizeof(float) * (size_t)G * D);
            float mx[64], total[64];
            for (int g = 0; g < G; g++) mx[g] = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                load_row(kbase, t, D, bf16, row);
                for (int g = 0; g < G; g++) {
                    const float *qg = qh + (int64_t)g * D;
                    float dot = 0.0f;
                    #pragma omp simd reduction(+:dot)
                    for (int d = 0; d < D; d++) dot += qg[d] * row[d];
                    dot *= scale;
                    s[(int64_t)g * n + t] = dot;
                    if (dot > mx[g]) mx[g] = dot;
                }
            }
            for (int g = 0; g < G; g++) {
                float z = 0.0f;
                float *sg = s + (int64_t)g * n;
                for (int64_t t = 0; t < n; t++) {
                    sg[t] = expf(sg[t] - mx[g]);
                    z += sg[t];
                }
                total[g] = z > 0.0f ? 1.0f / z : 0.0f;
            }
            memset(sum_acc, 0, sizeof(float) * (size_t)G * D);
            for (int64_t t = 0; t < n; t++) {
                load_row(vbase, t, D, bf16, row);
                for (int g = 0; g < G; g++) {
                    const float p = s[(int64_t)g * n + t];
                    float *a = sum_acc + (int64_t)g * D;
                    #pragma omp simd
                    for (int d = 0; d < D; d++) a[d] += p * row[d];
                }
            }
            for (int g = 0; g < G; g++) {
                #pragma omp simd
                for (int d = 0; d < D; d++) oh[(int64_t)g * D + d] = sum_acc[(int64_t)g * D + d] * total[g];
            }
            if (sum_acc != acc) free(sum_acc);
            free(s);
        }
    }
}
