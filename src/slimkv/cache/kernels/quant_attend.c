/* Reading KIVI-quantized entries without dequantizing them into memory (see quantized.py).
 *
 * Codes are packed planar (packing.py): with p = 8 / bits planes and P = D / p bytes per entry,
 * byte j of an entry holds channels j, j + P, ..., at bit offsets 0, bits, ...
 * Every array is contiguous float32 / uint8, rows of all (batch, kv head) pairs one after another.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline void unpack_planes(const uint8_t *src, int P, int bits, float *dst) {
    const int planes = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < planes; i++) {
        const int shift = i * bits;
        float *out = dst + i * P;
        #pragma omp simd
        for (int j = 0; j < P; j++) out[j] = (float)((src[j] >> shift) & mask);
    }
}

/* one copy per bit width, so that shifts and plane counts are constants the compiler vectorizes */
static inline void unpack_row(const uint8_t *src, int P, int bits, float *dst) {
    switch (bits) {
        case 2: unpack_planes(src, P, 2, dst); break;
        case 4: unpack_planes(src, P, 4, dst); break;
        default: unpack_planes(src, P, 8, dst); break;
    }
}

/* One decode step of attention over a quantized layer, for every (batch, kv head) row bh:
 *
 *   s[r, t] = scale * (q[r] . k_t)      k_t = code * k_scale[g(t)] + k_zero[g(t)] per channel, g(t) = (t + pad) / group
 *   p       = softmax over the Q quantized entries and the NR residual ones
 *   out[r]  = sum_t p[r, t] * v_t        v_t = code * v_scale[t, v] + v_zero[t, v] per value group v
 *
 * computed from the packed codes without writing dequantized entries anywhere: the key scales are
 * folded into the query once per group, the value scales into the weights once per entry.
 *
 *   q, out: [BH, R, D] float; k_codes: [BH, Q, D * kbits / 8], v_codes: [BH, Q, D * vbits / 8] uint8
 *   k_scale, k_zero: [BH, NG, D] float; v_scale, v_zero: [BH, Q, NV] float (stored as float16)
 *   res_k, res_v: [BH, NR, D] float (the full-precision residual) */
void kivi_decode(int BH, int Q, int NR, int D, int R, int kbits, int vbits, int group, int pad, int NG, int NV,
                 float scale, const float *q, const uint8_t *k_codes, const float *k_scale,
                 const float *k_zero, const uint8_t *v_codes, const float *v_scale,
                 const float *v_zero, const float *res_k, const float *res_v, float *out, int threads) {
    const int PK = D * kbits / 8, PV = D * vbits / 8, VG = D / NV, L = Q + NR;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int bh = 0; bh < BH; bh++) {
        float row[1024];
        float *qs = malloc(sizeof(float) * ((size_t)NG * R * D + (size_t)(NG > NV ? NG : NV) * R + (size_t)R * L));
        float *qz = qs + (size_t)NG * R * D, *s = qz + (size_t)(NG > NV ? NG : NV) * R;
        const float *qb = q + (size_t)bh * R * D;
        for (int g = 0; g < NG; g++) {
            const float *ks = k_scale + ((size_t)bh * NG + g) * D, *kz = k_zero + ((size_t)bh * NG + g) * D;
            for (int r = 0; r < R; r++) {
                float z = 0.0f;
                float *w = qs + ((size_t)g * R + r) * D;
                for (int d = 0; d < D; d++) {
                    const float x = qb[r * D + d] * scale;
                    w[d] = x * (float)ks[d];
                    z += x * (float)kz[d];
                }
                qz[g * R + r] = z;
            }
        }
        const uint8_t *kc = k_codes + (size_t)bh * Q * PK;
        for (int t = 0; t < Q; t++) {
            const int g = (t + pad) / group;
            unpack_row(kc + (size_t)t * PK, PK, kbits, row);
            for (int r = 0; r < R; r++) {
                const float *w = qs + ((size_t)g * R + r) * D;
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int d = 0; d < D; d++) acc += w[d] * row[d];
                s[(size_t)r * L + t] = acc + qz[g * R + r];
            }
        }
        const float *rk = res_k + (size_t)bh * NR * D;
        for (int t = 0; t < NR; t++)
            for (int r = 0; r < R; r++) {
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int d = 0; d < D; d++) acc += qb[r * D + d] * rk[(size_t)t * D + d];
                s[(size_t)r * L + Q + t] = acc * scale;
            }
        for (int r = 0; r < R; r++) {  /* softmax of each query row */
            float *sr = s + (size_t)r * L, top = sr[0], sum = 0.0f;  /* no infinities: built with -ffast-math */
            for (int t = 0; t < L; t++) top = sr[t] > top ? sr[t] : top;
            for (int t = 0; t < L; t++) { sr[t] = expf(sr[t] - top); sum += sr[t]; }
            const float inv = 1.0f / sum;
            for (int t = 0; t < L; t++) sr[t] *= inv;
        }
        float *ob = out + (size_t)bh * R * D;
        memset(ob, 0, sizeof(float) * R * D);
        const uint8_t *vc = v_codes + (size_t)bh * Q * PV;
        const float *vs = v_scale + (size_t)bh * Q * NV, *vz = v_zero + (size_t)bh * Q * NV;
        float *bias = qz;  /* reused: [R, NV] sums of p * zero, added once at the end */
        memset(bias, 0, sizeof(float) * R * NV);
        for (int t = 0; t < Q; t++) {
            unpack_row(vc + (size_t)t * PV, PV, vbits, row);
            for (int r = 0; r < R; r++) {
                const float p = s[(size_t)r * L + t];
                float *a = ob + r * D;
                for (int v = 0; v < NV; v++) {
                    const float w = p * vs[t * NV + v];
                    bias[r * NV + v] += p * vz[t * NV + v];
                    #pragma omp simd
                    for (int d = v * VG; d < (v + 1) * VG; d++) a[d] += w * row[d];
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int d = 0; d < D; d++) ob[r * D + d] += bias[r * NV + d / VG];
        const float *rv = res_v + (size_t)bh * NR * D;
        for (int t = 0; t < NR; t++)
            for (int r = 0; r < R; r++) {
                const float p = s[(size_t)r * L + Q + t];
                float *a = ob + r * D;
                #pragma omp simd
                for (int d = 0; d < D; d++) a[d] += p * rv[(size_t)t * D + d];
            }
        free(qs);
    }
}
