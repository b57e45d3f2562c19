/* What forward.c (a pass nothing differentiates) and grad.c (a pass and its backward, for the
 * adapters' gradients) share: the weight table's layout, a product with its adapter, attention of a
 * row's queries over a context and its own keys, and whole-batch norms and sums. */
#ifndef MLX_GRPO_PASSES_H
#define MLX_GRPO_PASSES_H

#include <stdlib.h>

#include "kernels.h"

extern int omp_get_thread_num(void);

enum { W_EMBED, W_HEAD, W_NORM, W_GLOBAL };
enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN, P_COUNT };
enum { P_W, P_BIAS, P_A, P_BS, P_RANK, P_FIELDS };
enum { S_IN_NORM, S_POST_NORM, S_PRODUCTS, S_COUNT = S_PRODUCTS + P_COUNT * P_FIELDS };

#define ROW_MAJOR 101
#define NO_TRANS 111
#define TRANS 112
#define HEAD_ROWS 256 /* positions through the output head at a time (256 x vocab floats of logits): past the
                         few-row kernel (skinny.c), which would read the whole head again every 48 rows */

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);

/* out[M, N] (rows ldo apart) = x[M, K] @ W^T + bias + adapter, the product p of a layer's table. */
static int product(const uintptr_t *pw, int M, int N, int K, const float *x, float *out, int ldo) {
  cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, M, N, K, 1.0f, x, K, (const float *)pw[P_W], K, 0.0f, out, ldo);
  const float *bias = (const float *)pw[P_BIAS];
  if (bias)
    for (int m = 0; m < M; m++)
      for (int n = 0; n < N; n++) out[(size_t)m * ldo + n] += bias[n];
  const int r = (int)pw[P_RANK];
  if (r > 0) { /* x A^T^T first: [M, r], then its product with scale B^T, added */
    float *t = malloc(sizeof(float) * (size_t)M * r);
    if (!t) return -1;
    cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, M, r, K, 1.0f, x, K, (const float *)pw[P_A], K, 0.0f, t, r);
    cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, M, N, r, 1.0f, t, r, (const float *)pw[P_BS], r, 1.0f, out, ldo);
    free(t);
  }
  return 0;
}

/* In place over one query's scores: the prompt's Tp16 at x, shown where show says, and its own keys
 * at c, the first n shown (causal); c past n up to `upto` (the chunk's widest) set to zero, as the
 * chunk's weighted sums read that far. */
static void softmax_causal(float *x, int Tp16, const vi16 *show, float *c, int n, int upto) {
  softmax_two(x, Tp16, show, c, n);
  for (int t = SLOTS16(n); t < upto; t++) c[t] = 0;
}

/* Attention of row b's n tokens for key head h: the queries (token i, query head of h) QC at a
 * time, scored against the prompt's keys pkT [Dh][Tp16] and the row's own kT [Dh][n16], causally. */
typedef struct {
  const float *pkT, *pv, *kT, *v; /* pv [Tp16][Dh], v [n16][Dh] */
  const vi16 *show;
  int Tp, Tp16, n, n16, Dh, rep;
  float scale;
} row_head_t;

static void attend(const row_head_t *k, int h, const float *qkv, int QKV, float *att, int QD, float *sc) {
  const int nq_all = k->n * k->rep, lds = k->Tp16 + k->n16;
  for (int i0 = 0; i0 < nq_all; i0 += QC) {
    const int nq = nq_all - i0 < QC ? nq_all - i0 : QC;
    const int last = (i0 + nq - 1) / k->rep, upto = SLOTS16(last + 1); /* own keys the chunk reads */
    const float *q[QC];
    float *out[QC];
    for (int i = 0; i < nq; i++) {
      int tok = (i0 + i) / k->rep, head = h * k->rep + (i0 + i) % k->rep;
      q[i] = qkv + (size_t)tok * QKV + (size_t)head * k->Dh;
      out[i] = att + (size_t)tok * QD + (size_t)head * k->Dh;
      memset(out[i], 0, sizeof(float) * k->Dh);
    }
    if (k->Tp16) scores(nq, q, k->pkT, k->Tp16, k->Tp16 / 16, k->Dh, k->scale, sc, lds);
    scores(nq, q, k->kT, k->n16, upto / 16, k->Dh, k->scale, sc + k->Tp16, lds);
    for (int i = 0; i < nq; i++)
      softmax_causal(sc + (size_t)i * lds, k->Tp16, k->show, sc + (size_t)i * lds + k->Tp16, (i0 + i) / k->rep + 1, upto);
    if (k->Tp) values(nq, sc, lds, k->pv, k->Tp, k->Dh, out);
    values(nq, sc + k->Tp16, lds, k->v, last + 1, k->Dh, out);
  }
}

/* RMSNorm of every row, split over the threads. */
static void norm_rows(int M, int d, const float *x, const float *w, float eps, float *out, int T) {
#pragma omp parallel for num_threads(T) schedule(static)
  for (int m = 0; m < M; m++) rms_norm(1, d, x + (size_t)m * d, w, eps, out + (size_t)m * d);
}

static void add_rows(size_t n, float *x, const float *y, int T) {
#pragma omp parallel for num_threads(T) schedule(static)
  for (size_t i = 0; i < n; i++) x[i] += y[i];
}

#endif
