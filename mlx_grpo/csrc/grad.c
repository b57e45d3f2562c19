/* The update's forward pass and its backward, in C for the CPU backend, for llama-shaped models
 * whose only trainable parameters are LoRA adapters on a frozen float32 base: the gradient of a loss
 * over the completions' log-probabilities with respect to every adapter's A and B.
 *
 * Through MLX, SmolLM2's update (forward and backward over 16 completions of 64 tokens) took ~3x its
 * FLOP bound: the products run at the BLAS's speed, but the graph's element-wise work (softmaxes,
 * norms, RoPE, SiLU, the 49k-vocabulary log-softmax and their gradients) runs one element at a time
 * and as many passes over memory. Here the products are cblas_sgemm calls on the model's own
 * weights (for the backward: dx = dy W, the same weights read the other way; the base gets no
 * gradient) and the rest runs in vectors between them, as in forward.c.
 *
 * The caller computes the loss: mlx_grpo_grad_forward gives the log-probabilities and keeps what the
 * backward needs (`saved`, mlx_grpo_grad_saved_floats(dims, M) floats); mlx_grpo_grad_backward takes
 * the loss's gradient with respect to each log-probability and writes the adapters' gradients.
 *
 * Tokens come flat (M of them) in segments: segment s is tokens [start, start + len), at RoPE
 * positions pos0, pos0 + 1, ...; it attends every token of its ancestors (parent, its parent, ...:
 * a prompts' shared prefix, a prompt) and its own tokens causally. Position j is scored when
 * targets[j] >= 0: logp[j] = log softmax(logits_j / temperature)[targets[j]] (0 elsewhere). Weights:
 * passes.h's table. Gradients: per layer and product (passes.h's order), two pointers (0: no
 * adapter): dA [r][K] (the gradient of A^T, i.e. of mlx-lm's lora_a transposed) and dB [r][N] (that
 * of mlx-lm's lora_b, divided by the adapter's scale).
 */
#include "passes.h"

enum { G_START, G_LEN, G_PARENT, G_POS0, G_FIELDS }; /* a segment's fields in seg[] */
enum { K_IN, K_MID, K_QKV, K_ATT, K_GU, K_COUNT };       /* what a layer keeps, per token, in this order */

typedef struct {
  size_t at[K_COUNT], layer; /* offsets of each array within a layer's share of `saved`, its size */
} saved_t;

static saved_t saved_layout(const model_t *md, int M) {
  const size_t w[K_COUNT] = {md->d, md->d, md->QKV, md->QD, 2 * (size_t)md->F};
  saved_t s;
  size_t at = 0;
  for (int k = 0; k < K_COUNT; k++) s.at[k] = at, at += w[k] * M;
  s.layer = at;
  return s;
}

/* Floats the forward keeps for M tokens: each layer's input, its middle (after attention), q|k|v
 * after RoPE, attention's output, gate|up; then the last layer's output, and at each scored
 * position the gradient of its log-probability with respect to the final norm's output. */
int64_t mlx_grpo_grad_saved_floats(const int64_t *dims, const float *fp, int64_t M) {
  const model_t md = read_model(dims, fp);
  return (int64_t)saved_layout(&md, (int)M).layer * md.L + 2 * (int64_t)M * md.d;
}

/* A segment's context: its ancestors' token spans, the root's first. */
#define MAX_DEPTH 8
typedef struct {
  int start[MAX_DEPTH], len[MAX_DEPTH], spans, total;
} context_t;

static int context_of(const int32_t *seg, int s, context_t *c) {
  int chain[MAX_DEPTH], depth = 0;
  for (int p = seg[s * G_FIELDS + G_PARENT]; p >= 0; p = seg[p * G_FIELDS + G_PARENT]) {
    if (depth == MAX_DEPTH) return -1;
    chain[depth++] = p;
  }
  c->spans = depth, c->total = 0;
  for (int i = 0; i < depth; i++) {
    const int p = chain[depth - 1 - i];
    c->start[i] = seg[p * G_FIELDS + G_START], c->len[i] = seg[p * G_FIELDS + G_LEN];
    c->total += c->len[i];
  }
  return 0;
}

/* Key head h of the tokens in c's spans (or of n tokens from `first`, when c is NULL), gathered from
 * q|k|v rows: keys transposed kT [Dh][n16] and values as rows v [n16][Dh] (what attend() reads), and
 * for the backward also keys as rows k and values transposed vT; slots past the tokens zero. */
typedef struct {
  float *kT, *k, *v, *vT;
} gathered_t;

static void gather(const float *qkv, const model_t *md, int h, const context_t *c, int first, int n, int n16,
                   const gathered_t *g, int backward) {
  const int Dh = md->Dh;
  memset(g->kT, 0, sizeof(float) * Dh * n16), memset(g->v, 0, sizeof(float) * Dh * n16);
  if (backward) memset(g->k, 0, sizeof(float) * Dh * n16), memset(g->vT, 0, sizeof(float) * Dh * n16);
  const int spans = c ? c->spans : 1;
  for (int sp = 0, slot = 0; sp < spans; sp++) {
    const int start = c ? c->start[sp] : first, len = c ? c->len[sp] : n;
    for (int i = 0; i < len; i++, slot++) {
      const float *row = qkv + (size_t)(start + i) * md->QKV;
      const float *key = row + md->QD + (size_t)h * Dh, *val = row + md->QD + md->KD + (size_t)h * Dh;
      memcpy(g->v + (size_t)slot * Dh, val, sizeof(float) * Dh);
      for (int e = 0; e < Dh; e++) g->kT[(size_t)e * n16 + slot] = key[e];
      if (!backward) continue;
      memcpy(g->k + (size_t)slot * Dh, key, sizeof(float) * Dh);
      for (int e = 0; e < Dh; e++) g->vT[(size_t)e * n16 + slot] = val[e];
    }
  }
}

/* out[t] += sum_i w[i][t] x[i] (Dh values) for t < n (out's rows ldo apart, w's ldw): each key's sum
 * over the nq queries built in registers, 64 columns at a time. */
static void outer_add(int nq, const float *w, int ldw, const float *const *x, int n, int Dh, float *out, int ldo) {
  if (Dh % 16) { /* head sizes off the vector width: plain loops */
    for (int t = 0; t < n; t++)
      for (int i = 0; i < nq; i++)
        for (int e = 0; e < Dh; e++) out[(size_t)t * ldo + e] += w[(size_t)i * ldw + t] * x[i][e];
    return;
  }
  for (int c = 0; c < Dh; c += 64) {
    const int m = Dh - c < 64 ? (Dh - c) / 16 : 4;
    for (int t = 0; t < n; t++) {
      v16 acc[4] = {{0}, {0}, {0}, {0}};
      for (int i = 0; i < nq; i++) {
        const float wt = w[(size_t)i * ldw + t];
        for (int j = 0; j < m; j++) acc[j] += wt * *(const v16 *)(x[i] + c + 16 * j);
      }
      float *o = out + (size_t)t * ldo + c;
      for (int j = 0; j < m; j++) *(v16 *)(o + 16 * j) += acc[j];
    }
  }
}

/* Attention's backward for one segment's n tokens and key head h: from the gradient of its output
 * (datt rows), the queries' gradients (into dqkv's query columns) and the keys' and values' (the
 * context's into dctx [C][2 Dh]: key then value; the segment's own into down [n][2 Dh]). The weights
 * are recomputed (as attend() computes them), QC queries at a time. */
typedef struct {
  row_head_t k;
  const gathered_t *ctx, *own;
} back_head_t;

static void attend_back(const back_head_t *bk, int h, const float *qkv, int QKV, const float *datt, int QD, float *dqkv,
                        float *dctx, float *down, float *sc, float *dp) {
  const row_head_t *k = &bk->k;
  const int nq_all = k->n * k->rep, lds = k->Tp16 + k->n16, Dh = k->Dh;
  for (int i0 = 0; i0 < nq_all; i0 += QC) {
    const int nq = nq_all - i0 < QC ? nq_all - i0 : QC;
    const int last = (i0 + nq - 1) / k->rep, upto = SLOTS16(last + 1);
    const float *q[QC], *dout[QC];
    float *dq[QC];
    for (int i = 0; i < nq; i++) {
      const int tok = (i0 + i) / k->rep, head = h * k->rep + (i0 + i) % k->rep;
      q[i] = qkv + (size_t)tok * QKV + (size_t)head * Dh;
      dq[i] = dqkv + (size_t)tok * QKV + (size_t)head * Dh;
      dout[i] = datt + (size_t)tok * QD + (size_t)head * Dh;
    }
    /* the weights p, as the forward had them */
    if (k->Tp16) scores(nq, q, k->pkT, k->Tp16, k->Tp16 / 16, Dh, k->scale, sc, lds);
    scores(nq, q, k->kT, k->n16, upto / 16, Dh, k->scale, sc + k->Tp16, lds);
    for (int i = 0; i < nq; i++)
      softmax_causal(sc + (size_t)i * lds, k->Tp16, k->show, sc + (size_t)i * lds + k->Tp16, (i0 + i) / k->rep + 1, upto);
    /* dp = dout . v, then the scores' gradient in place: scale p (dp - sum p dp) */
    if (k->Tp16) scores(nq, dout, bk->ctx->vT, k->Tp16, k->Tp16 / 16, Dh, 1.0f, dp, lds);
    scores(nq, dout, bk->own->vT, k->n16, upto / 16, Dh, 1.0f, dp + k->Tp16, lds);
    for (int i = 0; i < nq; i++) {
      const float *p = sc + (size_t)i * lds;
      float *g = dp + (size_t)i * lds;
      v16 acc = (v16){0};
      for (int t = 0; t < k->Tp16; t += 16) acc += *(const v16 *)(p + t) * *(const v16 *)(g + t);
      for (int t = 0; t < upto; t += 16) acc += *(const v16 *)(p + k->Tp16 + t) * *(const v16 *)(g + k->Tp16 + t);
      float sum = 0;
      for (int e = 0; e < 16; e++) sum += acc[e];
      for (int t = 0; t < k->Tp16; t += 16)
        *(v16 *)(g + t) = *(const v16 *)(p + t) * (*(const v16 *)(g + t) - sum) * k->scale;
      for (int t = k->Tp16; t < k->Tp16 + upto; t += 16)
        *(v16 *)(g + t) = *(const v16 *)(p + t) * (*(const v16 *)(g + t) - sum) * k->scale;
    }
    if (k->Tp) values(nq, dp, lds, bk->ctx->k, k->Tp, Dh, dq);
    values(nq, dp + k->Tp16, lds, bk->own->k, last + 1, Dh, dq);
    /* keys and values: dk[t] += sum_i ds[i][t] q_i, dv[t] += sum_i p[i][t] dout_i */
    if (k->Tp) {
      outer_add(nq, dp, lds, q, k->Tp, Dh, dctx, 2 * Dh), outer_add(nq, sc, lds, dout, k->Tp, Dh, dctx + Dh, 2 * Dh);
    }
    outer_add(nq, dp + k->Tp16, lds, q, last + 1, Dh, down, 2 * Dh);
    outer_add(nq, sc + k->Tp16, lds, dout, last + 1, Dh, down + Dh, 2 * Dh);
  }
}

/* The attention of every segment, forward (att) or backward (from datt into dqkv, which must be
 * zero), one segment and key head a task over the threads. */
typedef struct {
  const model_t *md;
  int nseg, ctx16, n16;
  const int32_t *seg;
  const context_t *ctx;
  const int *ctx_at; /* where segment s's context gradient starts in ctx_grad (floats / (KV 2 Dh)) */
  vi16 *shows;       /* per thread: the context slots' mask */
  float *work;       /* per thread: gathered keys and values, scores, gradients */
  size_t work_floats;
} attention_t;

static size_t attention_work(const model_t *md, int ctx16, int n16) {
  return (size_t)md->Dh * 4 * (ctx16 + n16) + 2 * (size_t)QC * (ctx16 + n16) + 2 * (size_t)n16 * md->Dh;
}

static void attention(const attention_t *a, const float *qkv, float *att, const float *datt, float *dqkv, float *ctx_grad) {
  const model_t *md = a->md;
  const int KV = md->KV, Dh = md->Dh;
#pragma omp parallel for num_threads(md->T) schedule(dynamic, 1)
  for (int sh = 0; sh < a->nseg * KV; sh++) {
    const int s = sh / KV, h = sh % KV, start = a->seg[s * G_FIELDS + G_START], n = a->seg[s * G_FIELDS + G_LEN];
    if (n == 0) continue;
    const int th = omp_get_thread_num(), C = a->ctx[s].total, C16 = SLOTS16(C), n16 = SLOTS16(n);
    float *w = a->work + (size_t)th * a->work_floats;
    gathered_t ctx = {w, w + (size_t)Dh * C16, w + (size_t)2 * Dh * C16, w + (size_t)3 * Dh * C16};
    w += (size_t)4 * Dh * C16;
    gathered_t own = {w, w + (size_t)Dh * n16, w + (size_t)2 * Dh * n16, w + (size_t)3 * Dh * n16};
    w += (size_t)4 * Dh * n16;
    float *sc = w, *dp = w + (size_t)QC * (C16 + n16), *down = dp + (size_t)QC * (C16 + n16);
    vi16 *show = a->shows + (size_t)th * (a->ctx16 / 16 + 1);
    if (C) gather(qkv, md, h, &a->ctx[s], 0, 0, C16, &ctx, datt != NULL);
    gather(qkv, md, h, NULL, start, n, n16, &own, datt != NULL);
    for (int t = 0; t < C16; t++) show[t / 16][t % 16] = t < C ? -1 : 0;
    back_head_t bk = {{ctx.kT, ctx.v, own.kT, own.v, show, C, C16, n, n16, Dh, md->rep, md->scale}, &ctx, &own};
    if (!datt) {
      attend(&bk.k, h, qkv + (size_t)start * md->QKV, md->QKV, att + (size_t)start * md->QD, md->QD, sc);
      continue;
    }
    float *dctx = ctx_grad + ((size_t)a->ctx_at[s] * KV + (size_t)h * C) * 2 * Dh;
    memset(dctx, 0, sizeof(float) * 2 * Dh * C), memset(down, 0, sizeof(float) * 2 * Dh * n);
    attend_back(&bk, h, qkv + (size_t)start * md->QKV, md->QKV, datt + (size_t)start * md->QD, md->QD,
                dqkv + (size_t)start * md->QKV, dctx, down, sc, dp);
    for (int i = 0; i < n; i++) {
      float *row = dqkv + (size_t)(start + i) * md->QKV + md->QD + (size_t)h * Dh;
      for (int e = 0; e < Dh; e++) row[e] += down[(size_t)i * 2 * Dh + e], row[md->KD + e] += down[(size_t)i * 2 * Dh + Dh + e];
    }
  }
  if (!datt) return;
  /* each segment's context gradient into its ancestors' rows (serially: segments share ancestors) */
  for (int s = 0; s < a->nseg; s++)
    for (int h = 0; h < KV && a->seg[s * G_FIELDS + G_LEN] > 0; h++) { /* an empty segment left none */
      const context_t *c = &a->ctx[s];
      const float *g = ctx_grad + ((size_t)a->ctx_at[s] * KV + (size_t)h * c->total) * 2 * Dh;
      for (int sp = 0; sp < c->spans; sp++)
        for (int i = 0; i < c->len[sp]; i++, g += 2 * Dh) {
          float *row = dqkv + (size_t)(c->start[sp] + i) * md->QKV + md->QD + (size_t)h * Dh;
          for (int e = 0; e < Dh; e++) row[e] += g[e], row[md->KD + e] += g[Dh + e];
        }
    }
}

/* dx (beta 0: =, 1: +=) dy W for a product of the table (dy [M, N], rows ldy apart), and its adapter's
 * gradients (dA = (dy scale B^T)^T x, dB = (x A^T^T)^T dy; t: [M, r] scratch) */
static void product_back(const uintptr_t *pw, const uintptr_t *pg, int M, int N, int K, const float *x, const float *dy,
                         int ldy, float beta, float *dx, float *t) {
  cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, M, K, N, 1.0f, dy, ldy, (const float *)pw[P_W], K, beta, dx, K);
  const int r = (int)pw[P_RANK];
  if (r == 0) return;
  const float *AT = (const float *)pw[P_A], *BS = (const float *)pw[P_BS];
  cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, M, r, N, 1.0f, dy, ldy, BS, r, 0.0f, t, r);
  cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, M, K, r, 1.0f, t, r, AT, K, 1.0f, dx, K);
  cblas_sgemm(ROW_MAJOR, TRANS, NO_TRANS, r, K, M, 1.0f, t, r, x, K, 0.0f, (float *)pg[0], K);
  cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, M, r, K, 1.0f, x, K, AT, K, 0.0f, t, r);
  cblas_sgemm(ROW_MAJOR, TRANS, NO_TRANS, r, N, M, 1.0f, t, r, dy, ldy, 0.0f, (float *)pg[1], N);
}

/* out += the gradient of RMSNorm's input x from its output's dy: inv (dy w) - x inv^3 (dy w . x) / d. */
static void norm_back_rows(int M, int d, const float *x, const float *w, float eps, const float *dy, float *out, int T) {
#pragma omp parallel for num_threads(T) schedule(static)
  for (int m = 0; m < M; m++) {
    const float *xr = x + (size_t)m * d, *g = dy + (size_t)m * d;
    float *o = out + (size_t)m * d;
    const float inv = 1.0f / sqrtf(dot(xr, xr, d) / d + eps);
    v16 acc = (v16){0};
    int i = 0;
    for (; i + 16 <= d; i += 16) acc += *(const v16 *)(g + i) * *(const v16 *)(w + i) * *(const v16 *)(xr + i);
    float gx = 0;
    for (int e = 0; e < 16; e++) gx += acc[e];
    for (; i < d; i++) gx += g[i] * w[i] * xr[i];
    const float c = inv * inv * inv * gx / d;
    for (i = 0; i < d; i++) o[i] += inv * g[i] * w[i] - c * xr[i];
  }
}

/* From d(SiLU(g) u) = da, dg and du in place of g|u's gradient row dgu [2F]. */
static void swiglu_back_row(const float *gu, const float *da, float *dgu, int F) {
  int i = 0;
  for (; i + 16 <= F; i += 16) {
    const v16 g = *(const v16 *)(gu + i), u = *(const v16 *)(gu + F + i), a = *(const v16 *)(da + i);
    const v16 sig = 1.0f / (1.0f + vexp(-g));
    *(v16 *)(dgu + i) = a * u * sig * (1.0f + g * (1.0f - sig));
    *(v16 *)(dgu + F + i) = a * g * sig;
  }
  for (; i < F; i++) {
    const float g = gu[i], u = gu[F + i], sig = 1.0f / (1.0f + expf(-g));
    dgu[i] = da[i] * u * sig * (1.0f + g * (1.0f - sig));
    dgu[F + i] = da[i] * g * sig;
  }
}

/* The sizes both calls work out from the segments. */
typedef struct {
  context_t *ctx;
  int *ctx_at, ctx_total, ctx16, n16, scored;
} shape_t;

static int shape_of(const int32_t *seg, int nseg, const int32_t *targets, int M, shape_t *sh) {
  sh->ctx = malloc(sizeof(context_t) * (nseg + 1)), sh->ctx_at = malloc(sizeof(int) * (nseg + 1));
  if (!sh->ctx || !sh->ctx_at) return -1;
  sh->ctx_total = sh->ctx16 = sh->n16 = sh->scored = 0;
  for (int s = 0; s < nseg; s++) {
    if (context_of(seg, s, &sh->ctx[s])) return -1;
    sh->ctx_at[s] = sh->ctx_total, sh->ctx_total += sh->ctx[s].total;
    if (SLOTS16(sh->ctx[s].total) > sh->ctx16) sh->ctx16 = SLOTS16(sh->ctx[s].total);
    if (SLOTS16(seg[s * G_FIELDS + G_LEN]) > sh->n16) sh->n16 = SLOTS16(seg[s * G_FIELDS + G_LEN]);
  }
  for (int j = 0; j < M; j++) sh->scored += targets[j] >= 0;
  return 0;
}

/* RoPE's cos and sin at every token's position (sign -1: the inverse rotation, for the backward). */
static void angles(const model_t *md, const float *fp, const int32_t *seg, int nseg, float sign, float *cs, float *sn) {
  for (int s = 0; s < nseg; s++)
    for (int i = 0; i < seg[s * G_FIELDS + G_LEN]; i++) {
      const int j = seg[s * G_FIELDS + G_START] + i;
      rope_angles((float)(seg[s * G_FIELDS + G_POS0] + i) * fp[F_ROPE_SCALE], md->half, fp[F_ROPE_BASE],
                  cs + (size_t)j * md->half, sn + (size_t)j * md->half);
      for (int e = 0; e < md->half; e++) sn[(size_t)j * md->half + e] *= sign;
    }
}

static void rope_rows(const model_t *md, int M, float *qkv, const float *cs, const float *sn) {
#pragma omp parallel for num_threads(md->T) schedule(static)
  for (int j = 0; j < M; j++)
    for (int h = 0; h < md->H + md->KV; h++)
      rope(qkv + (size_t)j * md->QKV + (size_t)h * md->Dh, md->rd, md->trad, cs + (size_t)j * md->half, sn + (size_t)j * md->half);
}

/* The scored positions' logits (temperature applied) into z [mr][V], from the final norm's rows. */
static void head_logits(const model_t *md, const float *W, const float *xn, const int *idx, int mr, float *hs, float *z) {
  for (int m = 0; m < mr; m++) memcpy(hs + (size_t)m * md->d, xn + (size_t)idx[m] * md->d, sizeof(float) * md->d);
  cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, mr, md->V, md->d, md->inv_t, hs, md->d, W, md->d, 0.0f, z, md->V);
}

static int *scored_positions(const int32_t *targets, int M, int n) {
  int *idx = malloc(sizeof(int) * (n + 1));
  if (idx)
    for (int j = 0, k = 0; j < M; j++)
      if (targets[j] >= 0) idx[k++] = j;
  return idx;
}

/* What both entry points work out from the segments: the contexts, attention's working memory
 * (per thread) and the scored positions. */
typedef struct {
  shape_t sh;
  attention_t at;
  int *idx;
} plan_t;

static int plan(const model_t *md, const int32_t *seg, int nseg, const int32_t *targets, int M, plan_t *p) {
  memset(p, 0, sizeof *p);
  if (shape_of(seg, nseg, targets, M, &p->sh)) return -1;
  const shape_t *sh = &p->sh;
  p->at = (attention_t){md, nseg, sh->ctx16, sh->n16, seg, sh->ctx, sh->ctx_at, NULL, NULL,
                        attention_work(md, sh->ctx16, sh->n16)};
  p->at.work = malloc(sizeof(float) * p->at.work_floats * md->T);
  p->at.shows = malloc(sizeof(vi16) * (sh->ctx16 / 16 + 1) * md->T);
  p->idx = scored_positions(targets, M, sh->scored);
  return p->at.work && p->at.shows && p->idx ? 0 : -1;
}

static void unplan(plan_t *p) { free(p->sh.ctx), free(p->sh.ctx_at), free(p->at.work), free(p->at.shows), free(p->idx); }

int mlx_grpo_grad_forward(const int64_t *dims, const float *fp, const uintptr_t *w, int M, int nseg, const int32_t *seg,
                          const int32_t *tokens, const int32_t *targets, float *logp, float *saved) {
  const model_t md = read_model(dims, fp);
  const int L = md.L, d = md.d, QD = md.QD, KD = md.KD, QKV = md.QKV, F = md.F, V = md.V, T = md.T;
  const saved_t lay = saved_layout(&md, M);
  plan_t pl;
  int ok = plan(&md, seg, nseg, targets, M, &pl) == 0;
  const attention_t *at = &pl.at;
  const int *idx = pl.idx, scored = pl.sh.scored;
  float *xn = malloc(sizeof(float) * ((size_t)M * d + 1)), *act = malloc(sizeof(float) * ((size_t)M * F + 1)),
        *tmp = malloc(sizeof(float) * ((size_t)M * d + 1)), *cs = malloc(sizeof(float) * ((size_t)M * md.half + 1)),
        *sn = malloc(sizeof(float) * ((size_t)M * md.half + 1)), *hs = malloc(sizeof(float) * HEAD_ROWS * d),
        *z = malloc(sizeof(float) * (size_t)HEAD_ROWS * V);
  ok = ok && xn && act && tmp && cs && sn && hs && z;
  if (!ok) goto done;

  float *x = saved; /* layer 0's input: the embeddings */
  for (int j = 0; j < M; j++) memcpy(x + (size_t)j * d, (const float *)w[W_EMBED] + (size_t)tokens[j] * d, sizeof(float) * d);
  angles(&md, fp, seg, nseg, 1.0f, cs, sn);
  for (int l = 0; l < L && ok; l++) {
    const uintptr_t *lw = w + W_GLOBAL + (size_t)l * S_COUNT, *pw = lw + S_PRODUCTS;
    float *base = saved + (size_t)l * lay.layer, *mid = base + lay.at[K_MID], *qkv = base + lay.at[K_QKV],
          *att = base + lay.at[K_ATT], *gu = base + lay.at[K_GU], *next = saved + (size_t)(l + 1) * lay.layer;
    norm_rows(M, d, x, (const float *)lw[S_IN_NORM], md.eps, xn, T);
    ok &= product(pw + P_Q * P_FIELDS, M, QD, d, xn, qkv, QKV) == 0;
    ok &= product(pw + P_K * P_FIELDS, M, KD, d, xn, qkv + QD, QKV) == 0;
    ok &= product(pw + P_V * P_FIELDS, M, KD, d, xn, qkv + QD + KD, QKV) == 0;
    rope_rows(&md, M, qkv, cs, sn);
    attention(at, qkv, att, NULL, NULL, NULL);
    ok &= product(pw + P_O * P_FIELDS, M, d, QD, att, tmp, d) == 0;
    memcpy(mid, x, sizeof(float) * (size_t)M * d);
    add_rows((size_t)M * d, mid, tmp, T);
    norm_rows(M, d, mid, (const float *)lw[S_POST_NORM], md.eps, xn, T);
    ok &= product(pw + P_GATE * P_FIELDS, M, F, d, xn, gu, 2 * F) == 0;
    ok &= product(pw + P_UP * P_FIELDS, M, F, d, xn, gu + F, 2 * F) == 0;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int m = 0; m < M; m++) swiglu_row(gu + (size_t)m * 2 * F, gu + (size_t)m * 2 * F + F, act + (size_t)m * F, F);
    ok &= product(pw + P_DOWN * P_FIELDS, M, d, F, act, tmp, d) == 0;
    memcpy(next, mid, sizeof(float) * (size_t)M * d); /* the next layer's input (after the last: the final norm's) */
    add_rows((size_t)M * d, next, tmp, T);
    x = next;
  }
  if (!ok) goto done;
  norm_rows(M, d, x, (const float *)w[W_NORM], md.eps, xn, T);
  memset(logp, 0, sizeof(float) * M);
  float *u = saved + (size_t)L * lay.layer + (size_t)M * d;
  for (int k0 = 0; k0 < scored; k0 += HEAD_ROWS) {
    const int mr = scored - k0 < HEAD_ROWS ? scored - k0 : HEAD_ROWS;
    head_logits(&md, (const float *)w[W_HEAD], xn, idx + k0, mr, hs, z);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int m = 0; m < mr; m++) {
      const int j = idx[k0 + m];
      float *zr = z + (size_t)m * V;
      const float top = logsumexp_row(zr, V);
      logp[j] = zr[targets[j]] - top;
      int i = 0;
      for (; i + 16 <= V; i += 16) *(v16 *)(zr + i) = vexp(*(v16 *)(zr + i) - top);
      for (; i < V; i++) zr[i] = sexp(zr[i] - top);
    }
    /* the head's gradient per unit of d logp: W[target] - softmax . W (times 1 / temperature) */
    cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, mr, d, V, -md.inv_t, z, V, (const float *)w[W_HEAD], d, 0.0f, hs, d);
    for (int m = 0; m < mr; m++) {
      const int j = idx[k0 + m];
      const float *target = (const float *)w[W_HEAD] + (size_t)targets[j] * d;
      for (int e = 0; e < d; e++) u[(size_t)j * d + e] = hs[(size_t)m * d + e] + md.inv_t * target[e];
    }
  }

done:
  unplan(&pl), free(xn), free(act), free(tmp), free(cs), free(sn), free(hs), free(z);
  return ok ? 0 : -1;
}

int mlx_grpo_grad_backward(const int64_t *dims, const float *fp, const uintptr_t *w, int M, int nseg, const int32_t *seg,
                           const int32_t *targets, const float *dlogp, const float *saved, const uintptr_t *grads) {
  const model_t md = read_model(dims, fp);
  const int L = md.L, d = md.d, QD = md.QD, KD = md.KD, QKV = md.QKV, F = md.F, T = md.T;
  const saved_t lay = saved_layout(&md, M);
  plan_t pl;
  int ok = plan(&md, seg, nseg, targets, M, &pl) == 0;
  const attention_t *at = &pl.at;
  const int *idx = pl.idx, scored = pl.sh.scored;
  int rmax = 1;
  for (int l = 0; l < L; l++)
    for (int p = 0; p < P_COUNT; p++) {
      const int r = (int)w[W_GLOBAL + (size_t)l * S_COUNT + S_PRODUCTS + p * P_FIELDS + P_RANK];
      rmax = r > rmax ? r : rmax;
    }
  float *xn = malloc(sizeof(float) * ((size_t)M * d + 1)), *dxn = malloc(sizeof(float) * ((size_t)M * d + 1)),
        *dx = calloc((size_t)M * d + 1, sizeof(float)), *act = malloc(sizeof(float) * ((size_t)M * F + 1)),
        *dact = malloc(sizeof(float) * ((size_t)M * F + 1)), *dgu = malloc(sizeof(float) * ((size_t)M * 2 * F + 1)),
        *datt = malloc(sizeof(float) * ((size_t)M * QD + 1)), *dqkv = malloc(sizeof(float) * ((size_t)M * QKV + 1)),
        *cs = malloc(sizeof(float) * ((size_t)M * md.half + 1)), *sn = malloc(sizeof(float) * ((size_t)M * md.half + 1)),
        *t = malloc(sizeof(float) * ((size_t)M * rmax + 1)),
        *ctx_grad = malloc(sizeof(float) * ((size_t)pl.sh.ctx_total * md.KV * 2 * md.Dh + 1));
  ok = ok && xn && dxn && dx && act && dact && dgu && datt && dqkv && cs && sn && t && ctx_grad;
  if (!ok) goto done;

  /* the output head: each scored position's d logp times the forward's W[target] - softmax . W */
  const float *xf = saved + (size_t)L * lay.layer, *u = xf + (size_t)M * d;
  memset(dxn, 0, sizeof(float) * (size_t)M * d);
  for (int k = 0; k < scored; k++)
    for (int e = 0; e < d; e++) dxn[(size_t)idx[k] * d + e] = dlogp[idx[k]] * u[(size_t)idx[k] * d + e];
  norm_back_rows(M, d, xf, (const float *)w[W_NORM], md.eps, dxn, dx, T);
  angles(&md, fp, seg, nseg, -1.0f, cs, sn);
  for (int l = L - 1; l >= 0; l--) {
    const uintptr_t *lw = w + W_GLOBAL + (size_t)l * S_COUNT, *pw = lw + S_PRODUCTS;
    const uintptr_t *pg = grads + (size_t)l * P_COUNT * 2;
    const float *base = saved + (size_t)l * lay.layer, *x = base + lay.at[K_IN], *mid = base + lay.at[K_MID],
                *qkv = base + lay.at[K_QKV], *att = base + lay.at[K_ATT], *gu = base + lay.at[K_GU];
    /* the MLP: dx is the layer output's gradient (and stays the residual's) */
    norm_rows(M, d, mid, (const float *)lw[S_POST_NORM], md.eps, xn, T);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int m = 0; m < M; m++) swiglu_row(gu + (size_t)m * 2 * F, gu + (size_t)m * 2 * F + F, act + (size_t)m * F, F);
    product_back(pw + P_DOWN * P_FIELDS, pg + P_DOWN * 2, M, d, F, act, dx, d, 0.0f, dact, t);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int m = 0; m < M; m++) swiglu_back_row(gu + (size_t)m * 2 * F, dact + (size_t)m * F, dgu + (size_t)m * 2 * F, F);
    product_back(pw + P_GATE * P_FIELDS, pg + P_GATE * 2, M, F, d, xn, dgu, 2 * F, 0.0f, dxn, t);
    product_back(pw + P_UP * P_FIELDS, pg + P_UP * 2, M, F, d, xn, dgu + F, 2 * F, 1.0f, dxn, t);
    norm_back_rows(M, d, mid, (const float *)lw[S_POST_NORM], md.eps, dxn, dx, T);
    /* attention: dx is now the middle's gradient */
    product_back(pw + P_O * P_FIELDS, pg + P_O * 2, M, d, QD, att, dx, d, 0.0f, datt, t);
    memset(dqkv, 0, sizeof(float) * (size_t)M * QKV);
    attention(at, qkv, NULL, datt, dqkv, ctx_grad);
    rope_rows(&md, M, dqkv, cs, sn); /* the inverse rotation: the gradient before RoPE */
    norm_rows(M, d, x, (const float *)lw[S_IN_NORM], md.eps, xn, T);
    product_back(pw + P_Q * P_FIELDS, pg + P_Q * 2, M, QD, d, xn, dqkv, QKV, 0.0f, dxn, t);
    product_back(pw + P_K * P_FIELDS, pg + P_K * 2, M, KD, d, xn, dqkv + QD, QKV, 1.0f, dxn, t);
    product_back(pw + P_V * P_FIELDS, pg + P_V * 2, M, KD, d, xn, dqkv + QD + KD, QKV, 1.0f, dxn, t);
    norm_back_rows(M, d, x, (const float *)lw[S_IN_NORM], md.eps, dxn, dx, T);
  }

done:
  unplan(&pl), free(xn), free(dxn), free(dx), free(act), free(dact), free(dgu), free(datt), free(dqkv), free(cs), free(sn),
      free(t), free(ctx_grad);
  return ok ? 0 : -1;
}
