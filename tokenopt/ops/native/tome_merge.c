/* One ToMe/ToFu step (bipartite soft matching + merge, prune or MLERP) for float32 CPU tensors.
 *
 * Why this exists: at batch 1 the PyTorch version of a ToMe step is ~35 small operators, each
 * paying the dispatcher and a thread-pool round trip; together they cost a good part of what the
 * token reduction saves in the layer that follows. Here the whole step is one call.
 *
 * The definition and conventions are those of tokenopt/ops/matching.py (the reference
 * implementation's): A = even positions, B = odd positions, prefix tokens never matched, the r
 * A tokens with the most similar B partner (cosine similarity of the metric averaged over heads)
 * are reduced into it, output order [prefix, unmerged A in original order, B in original order].
 * How a group is reduced (ToMe's size-weighted average, ToFu's prune or MLERP): see place().
 *
 * Plain C11 with GCC/Clang vector extensions and OpenMP pragmas, no torch headers: it builds in
 * well under a second with the system compiler (tokenopt/ops/native/build.py) and is called
 * through ctypes on dense tokens and a strided view of the keys. It is linked against the
 * OpenMP runtime torch itself loaded, so both share one thread pool (two runtimes would
 * oversubscribe the cores). Built without OpenMP, the pragmas are ignored and the same code runs
 * on one thread. Batches split by image; a single image splits its score rows and its channels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef struct {
    float score;
    int64_t a;
} edge_t;

enum { OP_MERGE = 0, OP_PRUNE = 1, OP_MLERP = 2 };   /* ToMe's merge; ToFu's prune and MLERP */

typedef struct {            /* one call: shapes and the derived sizes of the bipartite split */
    int64_t N, C, D, N0, r, prefix;
    int64_t H, m_token, m_head;   /* metric: H heads of D contiguous floats, strides in floats */
    int64_t op;                   /* OP_MERGE | OP_PRUNE | OP_MLERP */
    int64_t pa, pb, na, nb, n_unm, K, nap, nbp, a_floats;
} shape_t;

typedef struct {            /* per-image scratch */
    float *a, *bt, *S;      /* normalised A rows, B^T, scores: one 64-byte aligned block */
    float *dst_size, *inv_new;
    edge_t *edges;
    int64_t *partner, *pos;
    unsigned char *merged, *touched;
} scratch_t;

/* Most similar first; equal scores by A position, so the choice is deterministic. */
static int by_score_desc(const void *l, const void *r) {
    const edge_t *x = (const edge_t *)l, *y = (const edge_t *)r;
    if (x->score > y->score) return -1;
    if (x->score < y->score) return 1;
    return (x->a > y->a) - (x->a < y->a);
}

static v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }

/* sum of row[k]^2, with eight partial sums so the reduction vectorises without -ffast-math */
static float sum_squares(const float *row, int64_t D) {
    v8 acc = {0};
    int64_t k = 0;
    for (; k + 8 <= D; k += 8) {
        const v8 v = load8(row + k);
        acc += v * v;
    }
    float ss = 0.f;
    for (int i = 0; i < 8; ++i) ss += acc[i];
    for (; k < D; ++k) ss += row[k] * row[k];
    return ss;
}

/* Rows i0..i0+3 of S (nap x nbp) = A (nap x D) . Bt (D x nbp); nbp a multiple of 16, Bt 32-byte
 * aligned. A 4x16 register block: 8 accumulators stay in registers across the k loop. */
static void scores_4rows(const float *a, const float *bt, float *S, int64_t i0, int64_t nbp, int64_t D) {
    for (int64_t j0 = 0; j0 < nbp; j0 += 16) {
        v8 acc[4][2] = {{{0}}};
        for (int64_t k = 0; k < D; ++k) {
            const v8 b0 = *(const v8 *)(bt + k * nbp + j0), b1 = *(const v8 *)(bt + k * nbp + j0 + 8);
            for (int ii = 0; ii < 4; ++ii) {
                const float s = a[(i0 + ii) * D + k];
                acc[ii][0] += s * b0;
                acc[ii][1] += s * b1;
            }
        }
        for (int ii = 0; ii < 4; ++ii) {
            memcpy(S + (i0 + ii) * nbp + j0, &acc[ii][0], sizeof(v8));
            memcpy(S + (i0 + ii) * nbp + j0 + 8, &acc[ii][1], sizeof(v8));
        }
    }
}

/* Index of the largest of row[0 .. n), the first of equal maxima (as torch.max on CPU); the
 * row is padded with -inf up to a multiple of 8. Lane-wise best values and indices, then
 * the eight lanes. */
static int64_t argmax_padded(const float *row, int64_t n_padded) {
    v8 best = load8(row);
    v8i best_at = {0, 1, 2, 3, 4, 5, 6, 7}, at = best_at;
    const v8i step = {8, 8, 8, 8, 8, 8, 8, 8};
    for (int64_t j = 8; j < n_padded; j += 8) {
        const v8 v = load8(row + j);
        at += step;
        const v8i better = v > best;                   /* strict: earlier indices win ties */
        best = (v8)(((v8i)v & better) | ((v8i)best & ~better));
        best_at = (at & better) | (best_at & ~better);
    }
    int64_t arg = best_at[0];
    float top = best[0];
    for (int i = 1; i < 8; ++i)
        if (best[i] > top || (best[i] == top && best_at[i] < arg)) { top = best[i]; arg = best_at[i]; }
    return arg;
}

static shape_t make_shape(int64_t N, int64_t C, int64_t D, int64_t N0, int64_t r, int64_t prefix,
                          int64_t H, int64_t m_token, int64_t m_head, int64_t op) {
    shape_t s = {N, C, D, N0, r, prefix, H, m_token, m_head, op, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    s.pa = (prefix + 1) / 2;                 /* prefix tokens among A (even) and B (odd) */
    s.pb = prefix / 2;
    s.na = (N + 1) / 2 - s.pa;               /* matchable A, B tokens */
    s.nb = N / 2 - s.pb;
    s.n_unm = s.na - r;
    s.K = N - r;
    s.nap = (s.na + 3) / 4 * 4;              /* padded for the kernels */
    s.nbp = (s.nb + 15) / 16 * 16;
    s.a_floats = (s.nap * D + 15) / 16 * 16;  /* so that B^T starts on a 64-byte boundary */
    return s;
}

static void scratch_free(scratch_t *w) {
    free(w->a); free(w->dst_size); free(w->inv_new); free(w->edges); free(w->partner); free(w->pos);
    free(w->merged); free(w->touched);
}

static int scratch_alloc(scratch_t *w, const shape_t *s) {
    const size_t na = (size_t)(s->na > 0 ? s->na : 1), K = (size_t)(s->K > 0 ? s->K : 1);
    const size_t floats = (size_t)(s->a_floats + s->D * s->nbp + s->nap * s->nbp);
    const size_t bytes = (sizeof(float) * floats + 63) / 64 * 64;   /* C11: a multiple of the alignment */
    w->a = aligned_alloc(64, bytes);   /* cache lines: B^T columns of one thread never share one */
    w->dst_size = malloc(sizeof(float) * K);
    w->inv_new = malloc(sizeof(float) * K);
    w->edges = malloc(sizeof(edge_t) * na);
    w->partner = malloc(sizeof(int64_t) * na);
    w->pos = malloc(sizeof(int64_t) * (size_t)(s->N > 0 ? s->N : 1));   /* input position -> output row */
    w->merged = malloc(na);
    w->touched = malloc(K);
    if (!w->a || !w->dst_size || !w->inv_new || !w->edges || !w->partner || !w->pos || !w->merged || !w->touched) {
        scratch_free(w);
        return 1;
    }
    w->bt = w->a + s->a_floats;
    w->S = w->bt + s->D * s->nbp;
    memset(w->a, 0, sizeof(float) * (size_t)(s->a_floats + s->D * s->nbp));   /* padding stays 0 */
    return 0;
}

/* The metric of token p summed over heads (the mean up to a factor that cosine similarity
 * ignores), scaled to unit norm, into dst[0], dst[step], ... Reading the heads in place spares
 * the graph a separate mean-over-heads reduction. The sum is formed in a contiguous buffer
 * (vectorised) and written out once, since B's rows go to strided columns of B^T. */
static void head_sum_normalised(const shape_t *s, const float *mb, int64_t p, float *dst, int64_t step) {
    enum { LOCAL = 256 };
    float local[LOCAL];
    const int64_t D = s->D;
    float *sum = (step == 1 || D > LOCAL) ? dst : local;   /* large D: accumulate in place */
    const int64_t sstep = sum == dst ? step : 1;
    const float *row = mb + p * s->m_token;
    for (int64_t k = 0; k < D; ++k) sum[k * sstep] = row[k];
    for (int64_t h = 1; h < s->H; ++h) {
        const float *head = row + h * s->m_head;
        for (int64_t k = 0; k < D; ++k) sum[k * sstep] += head[k];
    }
    float ss = 0.f;
    if (sstep == 1)
        ss = sum_squares(sum, D);
    else
        for (int64_t k = 0; k < D; ++k) ss += sum[k * sstep] * sum[k * sstep];
    const float inv = 1.f / sqrtf(ss);
    for (int64_t k = 0; k < D; ++k) dst[k * step] = sum[k * sstep] * inv;
}

/* Normalised metric rows [t0, t1) of the N tokens into A rows or B^T columns. */
static void normalise_rows(const shape_t *s, const float *mb, scratch_t *w, int64_t t0, int64_t t1) {
    for (int64_t p = t0; p < t1; ++p) {
        if (p % 2 == 0 && p / 2 >= s->pa)
            head_sum_normalised(s, mb, p, w->a + (p / 2 - s->pa) * s->D, 1);
        else if (p % 2 == 1 && p / 2 >= s->pb)
            head_sum_normalised(s, mb, p, w->bt + (p / 2 - s->pb), s->nbp);
    }
}

/* Scores of A rows i0..i0+3 against every B token, and each row's best partner. */
static void match_block(const shape_t *s, scratch_t *w, int64_t i0) {
    scores_4rows(w->a, w->bt, w->S, i0, s->nbp, s->D);
    for (int64_t i = i0; i < i0 + 4 && i < s->na; ++i) {
        float *row = w->S + i * s->nbp;
        for (int64_t j = s->nb; j < s->nbp; ++j) row[j] = -INFINITY;
        const int64_t best = argmax_padded(row, s->nbp);
        w->edges[i].score = row[best];
        w->edges[i].a = i;
        w->partner[i] = best;
    }
}

/* The r best edges merge; where every input token goes; the groups' sizes and weights. Serial,
 * O(N log N + r C).
 *   merge: group = sum(size_i x_i) / sum(size_i), sizes add         (ToMe)
 *   prune: matched A tokens dropped, partners and sizes unchanged    (ToFu)
 *   mlerp: group = sum(x_i) / |sum(x_i)| * max_i |x_i|, sizes add    (ToFu's MLERP)
 * Per group d: dst_size[d] weighs the partner's own row, inv_new[d] is the final factor (merge)
 * or the largest member norm (mlerp, finished by rescale_groups once the sum exists). */
static void place(const shape_t *s, const float *xb, const float *sb, scratch_t *w, float *osb) {
    const int64_t prefix = s->prefix, C = s->C;
    qsort(w->edges, (size_t)s->na, sizeof(edge_t), by_score_desc);
    memset(w->merged, 0, (size_t)s->na);
    for (int64_t e = 0; e < s->r; ++e) w->merged[w->edges[e].a] = 1;
    for (int64_t p = 0; p < prefix; ++p) w->pos[p] = p;
    for (int64_t j = 0; j < s->nb; ++j) w->pos[2 * (s->pb + j) + 1] = prefix + s->n_unm + j;
    int64_t next = prefix;
    for (int64_t i = 0; i < s->na; ++i)
        w->pos[2 * (s->pa + i)] = w->merged[i] ? prefix + s->n_unm + w->partner[i] : next++;
    for (int64_t p = 0; p < s->N; ++p)
        if (!(p >= prefix && p % 2 == 0 && w->merged[p / 2 - s->pa])) {
            osb[w->pos[p]] = sb ? sb[p] : 1.f;
            if (s->op == OP_MLERP) w->inv_new[w->pos[p]] = sqrtf(sum_squares(xb + p * C, C));
        }
    memset(w->touched, 0, (size_t)s->K);
    if (s->op == OP_PRUNE) return;
    for (int64_t i = 0; i < s->na; ++i) {
        if (!w->merged[i]) continue;
        const int64_t p = 2 * (s->pa + i), d = w->pos[p];
        if (!w->touched[d]) { w->dst_size[d] = s->op == OP_MERGE ? osb[d] : 1.f; w->touched[d] = 1; }
        osb[d] += sb ? sb[p] : 1.f;
        if (s->op == OP_MLERP) {
            const float norm = sqrtf(sum_squares(xb + p * C, C));
            if (norm > w->inv_new[d]) w->inv_new[d] = norm;
        }
    }
    if (s->op == OP_MERGE)
        for (int64_t d = 0; d < s->K; ++d)
            if (w->touched[d]) w->inv_new[d] = 1.f / osb[d];
}

/* Output channels [c0, c1): kept rows copied; each group's (weighted) sum, and for merge its
 * division by the group's size. */
static void write_channels(const shape_t *s, const float *xb, const float *sb, const scratch_t *w, float *ob,
                           int64_t c0, int64_t c1) {
    const int64_t C = s->C, prefix = s->prefix;
    const size_t bytes = sizeof(float) * (size_t)(c1 - c0);
    for (int64_t p = 0; p < s->N; ++p) {
        if (p >= prefix && p % 2 == 0 && w->merged[p / 2 - s->pa]) continue;
        const int64_t d = w->pos[p];
        if (!w->touched[d]) { memcpy(ob + d * C + c0, xb + p * C + c0, bytes); continue; }
        const float sd = w->dst_size[d];             /* a partner: its weighted value to start the sum */
        float *od = ob + d * C;
        const float *xd = xb + p * C;
        for (int64_t c = c0; c < c1; ++c) od[c] = sd * xd[c];
    }
    if (s->op == OP_PRUNE) return;
    for (int64_t i = 0; i < s->na; ++i) {
        if (!w->merged[i]) continue;
        const int64_t p = 2 * (s->pa + i);
        const float ss = s->op == OP_MERGE && sb ? sb[p] : 1.f;
        float *od = ob + w->pos[p] * C;
        const float *xs = xb + p * C;
        for (int64_t c = c0; c < c1; ++c) od[c] += ss * xs[c];
    }
    if (s->op != OP_MERGE) return;
    for (int64_t d = 0; d < s->K; ++d) {
        if (!w->touched[d]) continue;
        const float inv = w->inv_new[d];
        float *od = ob + d * C;
        for (int64_t c = c0; c < c1; ++c) od[c] *= inv;
    }
}

/* MLERP, groups [d0, d1): the sum's direction at the norm of the group's largest member. */
static void rescale_groups(const shape_t *s, const scratch_t *w, float *ob, int64_t d0, int64_t d1) {
    const int64_t C = s->C;
    for (int64_t d = d0; d < d1; ++d) {
        if (!w->touched[d]) continue;
        float *od = ob + d * C;
        const float f = w->inv_new[d] / sqrtf(sum_squares(od, C));
        for (int64_t c = 0; c < C; ++c) od[c] *= f;
    }
}

static void remap_index(const shape_t *s, const int64_t *ib, const scratch_t *w, int64_t *iob) {
    for (int64_t t = 0; t < s->N0; ++t) iob[t] = w->pos[ib[t]];
}

/* Returns 0 on success, 1 if scratch memory could not be allocated.
 *
 * x      (B, N, C)  tokens            metric: per image, token and head D contiguous floats
 *                                     (strides m_batch, m_token, m_head; H heads, averaged)
 * size   (B, N)     or NULL (all 1)   index  (B, N0)  or NULL: original token -> position now
 * x_out  (B, N-r, C)                  size_out (B, N-r)
 * index_out (B, N0) written when index is given; 0 <= r <= max_reduction(N, prefix)
 * op: OP_MERGE (ToMe), OP_PRUNE or OP_MLERP (ToFu); see place()
 * nthreads: torch.get_num_threads(), the size of the shared OpenMP pool
 */
int tome_merge_f32(const float *x, const float *metric, const float *size, const int64_t *index,
                   int64_t B, int64_t N, int64_t C, int64_t D, int64_t N0, int64_t r, int64_t prefix,
                   int64_t H, int64_t m_batch, int64_t m_token, int64_t m_head, int64_t op,
                   float *x_out, float *size_out, int64_t *index_out, int64_t nthreads) {
    const shape_t s = make_shape(N, C, D, N0, r, prefix, H, m_token, m_head, op);
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    if (B >= nthreads) {                             /* a batch: one image per thread at a time */
        #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(|:failed)
        for (int64_t bi = 0; bi < B; ++bi) {
            scratch_t w;
            if (scratch_alloc(&w, &s)) { failed = 1; continue; }
            const float *xb = x + bi * N * C, *sb = size ? size + bi * N : NULL;
            normalise_rows(&s, metric + bi * m_batch, &w, 0, N);
            for (int64_t i0 = 0; i0 < s.nap; i0 += 4) match_block(&s, &w, i0);
            place(&s, xb, sb, &w, size_out + bi * s.K);
            write_channels(&s, xb, sb, &w, x_out + bi * s.K * C, 0, C);
            if (op == OP_MLERP) rescale_groups(&s, &w, x_out + bi * s.K * C, 0, s.K);
            if (index) remap_index(&s, index + bi * N0, &w, index_out + bi * N0);
            scratch_free(&w);
        }
        return failed;
    }
    scratch_t w;                                     /* fewer images than threads: split each one */
    if (scratch_alloc(&w, &s)) return 1;
    for (int64_t bi = 0; bi < B; ++bi) {
        const float *xb = x + bi * N * C, *mb = metric + bi * m_batch, *sb = size ? size + bi * N : NULL;
        float *ob = x_out + bi * s.K * C, *osb = size_out + bi * s.K;
        #pragma omp parallel num_threads(nthreads)
        {
            #pragma omp for schedule(static)
            for (int64_t t0 = 0; t0 < N; t0 += 32)   /* 16 B tokens: a whole cache line of each B^T row */
                normalise_rows(&s, mb, &w, t0, t0 + 32 < N ? t0 + 32 : N);
            #pragma omp for schedule(static)
            for (int64_t i0 = 0; i0 < s.nap; i0 += 4) match_block(&s, &w, i0);
            #pragma omp single
            place(&s, xb, sb, &w, osb);
            #pragma omp for schedule(static)
            for (int64_t c0 = 0; c0 < C; c0 += 32) write_channels(&s, xb, sb, &w, ob, c0, c0 + 32 < C ? c0 + 32 : C);
            if (op == OP_MLERP) {
                #pragma omp for schedule(static)
                for (int64_t d0 = 0; d0 < s.K; d0 += 16) rescale_groups(&s, &w, ob, d0, d0 + 16 < s.K ? d0 + 16 : s.K);
            }
        }
        if (index) remap_index(&s, index + bi * N0, &w, index_out + bi * N0);
    }
    scratch_free(&w);
    return 0;
}
