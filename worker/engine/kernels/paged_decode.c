/* Decode attention straight from the paged KV cache (fp32, CPU).
 *
 * One query token per sequence. For each (sequence, KV head) the K and V rows of the
 * sequence's blocks are read once, in place, and shared by the query heads of that group,
 * with an online softmax. Gathering blocks into a padded tensor first (the pure-torch path)
 * reads and writes the cache twice more; on a memory-bound CPU that dominated the step.
 *
 * Layouts: q, out [B, H, D]; k_cache, v_cache [num_blocks, BS, KVH, D];
 * block_tables [B, max_blocks] (int64); context_lens [B] (int64).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_DIM 512
#define MAX_BLOCK 256

void paged_decode_attention(float *out, const float *q, const float *k_cache,
                            const float *v_cache, const int64_t *block_tables,
                            const int64_t *context_lens, int64_t B, int64_t H, int64_t KVH,
                            int64_t D, int64_t BS, int64_t max_blocks, float scale,
                            int num_threads) {
    const int64_t G = H / KVH;
    const int64_t token_stride = KVH * D;
    const int64_t block_stride = BS * token_stride;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kh = 0; kh < KVH; kh++) {
            float acc[MAX_GROUP][MAX_DIM];
            float m[MAX_GROUP], l[MAX_GROUP], qs[MAX_GROUP][MAX_DIM];
            for (int64_t g = 0; g < G; g++) {
                const float *qh = q + (b * H + kh * G + g) * D;
                for (int64_t d = 0; d < D; d++) qs[g][d] = qh[d] * scale;
                memset(acc[g], 0, sizeof(float) * D);
                m[g] = -FLT_MAX;
                l[g] = 0.f;
            }
            const int64_t len = context_lens[b];
            const int64_t *table = block_tables + b * max_blocks;
            float scores[MAX_BLOCK];
            for (int64_t start = 0; start < len; start += BS) {
                const int64_t n = len - start < BS ? len - start : BS;
                const int64_t base = table[start / BS] * block_stride + kh * D;
                for (int64_t g = 0; g < G; g++) {
                    /* Scores for the whole block first: one rescale per block, not per token. */
                    float bmax = -FLT_MAX;
                    for (int64_t t = 0; t < n; t++) {
                        const float *k = k_cache + base + t * token_stride;
                        float s = 0.f;
                        for (int64_t d = 0; d < D; d++) s += qs[g][d] * k[d];
                        scores[t] = s;
                        if (s > bmax) bmax = s;
                    }
                    if (bmax > m[g]) {
                        const float c = expf(m[g] - bmax);
                        l[g] *= c;
                        for (int64_t d = 0; d < D; d++) acc[g][d] *= c;
                        m[g] = bmax;
                    }
                    for (int64_t t = 0; t < n; t++) {
                        const float p = expf(scores[t] - m[g]);
                        const float *v = v_cache + base + t * token_stride;
                        l[g] += p;
                        for (int64_t d = 0; d < D; d++) acc[g][d] += p * v[d];
                    }
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *o = out + (b * H + kh * G + g) * D;
                const float inv = 1.f / l[g];
                for (int64_t d = 0; d < D; d++) o[d] = acc[g][d] * inv;
            }
        }
    }
}
