/* Reading KIVI-quantized entries without dequantizing them into memory (see quantized.py).
 *
 * Codes are packed planar (packing.py): with p = 8 / bits planes and P = D / p bytes per entry,
 * byte j of an entry holds channels j, j + P, ..., at bit offsets 0, bits, ...
 * Every array is contiguous float32 / uint8, rows of all (batch, kv head) pairs one after another.
 */
#include <stdint.h>

static inline void unpack_row(const uint8_t *src, int P, int bits, float *dst) {
    const int planes = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < planes; i++) {
        const int shift = i * bits;
        float *out = dst + i * P;
        #pragma omp simd
        for (int j = 0; j < P; j++) out[j] = (float)((src[j] >> shift) & mask);
    }
}

/* scores[bh, r, t] = qz[bh, g, r] + sum_d qs[bh, g, r, d] * code[bh, t, d],  g = (t + pad) / group
 *   qs: [BH, NG, R, D] query times each key group's per-channel scale; qz: [BH, NG, R] query . zero
 *   codes: [BH, Q, D * bits / 8]; scores: [BH, R, Q] */
void kivi_scores(int BH, int Q, int D, int R, int bits, int group, int pad, int NG,
                 const uint8_t *codes, const float *qs, const float *qz, float *scores, int threads) {
    const int P = D * bits / 8;
    #pragma omp parallel num_threads(threads)
    {
        float row[1024];
        #pragma omp for collapse(2) schedule(static)
        for (int bh = 0; bh < BH; bh++) {
            for (int t = 0; t < Q; t++) {
                const int g = (t + pad) / group;
                unpack_row(codes + ((int64_t)bh * Q + t) * P, P, bits, row);
                const float *w = qs + ((int64_t)bh * NG + g) * R * D;
                const float *z = qz + ((int64_t)bh * NG + g) * R;
                for (int r = 0; r < R; r++) {
                    float acc = 0.0f;
                    #pragma omp simd reduction(+:acc)
                    for (int d = 0; d < D; d++) acc += w[r * D + d] * row[d];
                    scores[((int64_t)bh * R + r) * Q + t] = acc + z[r];
                }
            }
        }
    }
}

/* partial[bh, c, r, d] = sum over entries t of chunk c of w[bh, r, t, d / VG] * code[bh, t, d]
 *   w: [BH, R, Q, NV] attention weight times each value group's scale (NV = D / VG groups)
 *   codes: [BH, Q, D * bits / 8]; partial: [BH, C, R, D] zeroed by the caller (summed over c after) */
void kivi_values(int BH, int Q, int D, int R, int bits, int NV, int C,
                 const uint8_t *codes, const float *w, float *partial, int threads) {
    const int P = D * bits / 8, VG = D / NV;
    const int chunk = (Q + C - 1) / C;
    #pragma omp parallel num_threads(threads)
    {
        float row[1024];
        #pragma omp for collapse(2) schedule(static)
        for (int bh = 0; bh < BH; bh++) {
            for (int c = 0; c < C; c++) {
                float *acc = partial + ((int64_t)bh * C + c) * R * D;
                const int lo = c * chunk, hi = lo + chunk < Q ? lo + chunk : Q;
                for (int t = lo; t < hi; t++) {
                    unpack_row(codes + ((int64_t)bh * Q + t) * P, P, bits, row);
                    for (int r = 0; r < R; r++) {
                        const float *wt = w + (((int64_t)bh * R + r) * Q + t) * NV;
                        float *a = acc + r * D;
                        for (int v = 0; v < NV; v++) {
                            const float s = wt[v];
                            #pragma omp simd
                            for (int d = v * VG; d < (v + 1) * VG; d++) a[d] += s * row[d];
                        }
                    }
                }
            }
        }
    }
}
