/* One decode step of a llama-shaped model (llama, qwen2, mistral), all in C, for the CPU backend.
 *
 * Through MLX a decode step of SmolLM2 at 16 rows is ~75 ms, of which the weight products (the
 * kernel in skinny.c) are ~36: the rest is MLX running some 2,500 small graph nodes on one thread
 * while the second core waits, and attention reading every row's own copy of its prompt's keys
 * and values. Here a step is one call (32-33 ms): the products read weights packed for them,
 * attention and the element-wise work are split over the same threads, which meet at barriers they
 * spin at, and the prompt's keys and values are held once per prompt, which every row of its
 * group reads, together with the others.
 *
 * Layout (float32, all contiguous; the caller owns every buffer):
 *   weights: per layer the input norm, q|k|v stacked [H*Dh + 2*KV*Dh, d] (+ bias), o [d, H*Dh],
 *            the post-attention norm, gate|up stacked [2F, d], down [d, F], and the head [vocab, d],
 *            each product's weight packed in panels of 16 rows (see panels() below; written by
 *            mlx_grpo_fold, which folds the adapters in); the embedding [vocab, d] row-major.
 *   prompt keys [L][U][KV][Dh][Tp16] (transposed), values [L][U][KV][Tp16][Dh], Tp16 = Tp rounded up
 *   to a multiple of 16, with visibility [U][Tp] (padding hidden);
 *   completion keys/values [L][B][KV][Tc16][Dh]: row b's slot s is its s-th generated token.
 * Row b belongs to prompt row_prompt[b]; its slot s sits at RoPE position row_pos0[b] + s.
 * The step's sizes, scalars and weight pointers come in three arrays indexed by the enums below
 * (pointers: W_GLOBAL global ones, then L_COUNT per layer; 0 for a bias the layer does not have).
 */
#include <sched.h>
#include <stdlib.h>

#include "kernels.h"

extern int omp_get_thread_num(void), omp_get_num_threads(void);

enum { W_EMBED, W_HEAD, W_NORM, W_GLOBAL };
enum { L_IN_NORM, L_QKV, L_QKV_BIAS, L_O, L_O_BIAS, L_POST_NORM, L_GATE_UP, L_GATE_UP_BIAS, L_DOWN, L_DOWN_BIAS,
       L_COUNT };

/* Spin until all T threads of the step arrive. The step's phases are short (tens of microseconds),
 * and libgomp's own barriers put a waiting thread to sleep at once when more of its threads exist
 * than cores (MLX's thread keeps a team of its own for skinny.c), which cost a SmolLM2 step ~10 ms.
 * A thread that has spun SPINS times yields its core at every further look: a teammate the kernel
 * took off its core (the BLAS's own threads still spin after a product, for up to ~0.1 s) gets it
 * back, instead of waiting out a time slice while this one spins. */
#define SPINS 1024
typedef struct {
  int count, sense;
} barrier_t;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static void barrier(barrier_t *bar, int T, int *mine) {
  if (T <= 1) return;
  int want = !*mine;
  *mine = want;
  if (__atomic_add_fetch(&bar->count, 1, __ATOMIC_ACQ_REL) == T) {
    __atomic_store_n(&bar->count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&bar->sense, want, __ATOMIC_RELEASE);
  } else {
    for (int n = 0; __atomic_load_n(&bar->sense, __ATOMIC_ACQUIRE) != want; n++)
      if (n < SPINS) relax();
      else sched_yield();
  }
}

/* One thread of the step's team: its number, the team's size, its side of the barrier, and its
 * scratch. */
typedef struct {
  barrier_t *bar;
  int t, T, sense;
  float *spill; /* the thread's [rows, 48] for a product's last panels */
} team_t;

static void sync_team(team_t *tm) { barrier(tm->bar, tm->T, &tm->sense); }

/* The products read weights packed in panels: 16 rows of W[N,K] interleaved, P[p][k][j] =
 * W[16p + j][k], rows past N zero (mlx_grpo_fold writes them so). A panel's k-th 16 floats are one
 * vector, multiplied by one element of x broadcast: no horizontal sums (the row-major kernel of
 * skinny.c ends every tile with a tree of shuffles), 24 multiply-adds per 11 loads in the 8-row by
 * 3-panel block below, and the weights stream through memory in the order they are read. Alone, on
 * SmolLM2's shapes with the weights in cache, 1.3-2.5x skinny.c's speed; in a SmolLM2 step, where
 * they come from memory (~17 GB/s here), 31 -> 25 ms. Any number of rows: 128 or 256 decode 2-3x
 * faster than through MLX, whose BLAS is at its best there. */
#define PANEL 16
#define BLOCK_ROWS 8   /* rows of x per block: 8 x 3 accumulators of 16 lanes */
#define BLOCK_PANELS 3
#define KC 64          /* columns of x (and the panels' depth) per pass: 3 panels' slice, 12 KB, stays
                          in L1 (a SmolLM2 step: 64 4-5% faster than 128; 32, 48, 96, 256, K slower) */

static inline __attribute__((always_inline)) void block(int MR, int NP, int K, int k0, int k1, const float *x, const float *P,
                                                        float *out, int ldo) {
  v16 acc[BLOCK_ROWS][BLOCK_PANELS];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NP; j++) acc[i][j] = k0 ? *(const v16 *)(out + (size_t)i * ldo + PANEL * j) : (v16){0};
  for (int k = k0; k < k1; k++) {
    v16 wv[BLOCK_PANELS];
    for (int j = 0; j < NP; j++) wv[j] = *(const v16 *)(P + ((size_t)j * K + k) * PANEL);
    for (int i = 0; i < MR; i++) {
      const float xs = x[(size_t)i * K + k];
      for (int j = 0; j < NP; j++) acc[i][j] += xs * wv[j];
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NP; j++) *(v16 *)(out + (size_t)i * ldo + PANEL * j) = acc[i][j];
}

/* block() with MR and NP as constants, so that the accumulators live in registers. */
#define BLOCK_CASE(mr)                                                                               \
  case mr:                                                                                           \
    if (NP == 3) block(mr, 3, K, k0, k1, x, P, out, ldo);                                            \
    else if (NP == 2) block(mr, 2, K, k0, k1, x, P, out, ldo);                                       \
    else block(mr, 1, K, k0, k1, x, P, out, ldo);                                                    \
    break;
static void block_any(int MR, int NP, int K, int k0, int k1, const float *x, const float *P, float *out, int ldo) {
  switch (MR) {
    BLOCK_CASE(1) BLOCK_CASE(2) BLOCK_CASE(3) BLOCK_CASE(4) BLOCK_CASE(5) BLOCK_CASE(6) BLOCK_CASE(7)
    BLOCK_CASE(8)
  }
}

/* out[:, 16 p0 .. 16 p1) of out[M,N] = x[M,K] @ W^T, W packed. The last panel's columns past N go to
 * spill[M, 48] first, so out is never written past N. */
static void panels(int M, int N, int K, const float *x, const float *P, float *out, int p0, int p1, float *spill) {
  for (int p = p0; p < p1; p += BLOCK_PANELS) {
    int NP = p1 - p < BLOCK_PANELS ? p1 - p : BLOCK_PANELS, whole = (p + NP) * PANEL <= N;
    float *o = whole ? out + (size_t)p * PANEL : spill;
    int ldo = whole ? N : PANEL * BLOCK_PANELS;
    const float *Pp = P + (size_t)p * K * PANEL;
    for (int k0 = 0; k0 < K; k0 += KC) {
      int k1 = k0 + KC < K ? k0 + KC : K;
      for (int m = 0; m < M; m += BLOCK_ROWS)
        block_any(M - m < BLOCK_ROWS ? M - m : BLOCK_ROWS, NP, K, k0, k1, x + (size_t)m * K, Pp, o + (size_t)m * ldo, ldo);
    }
    if (!whole)
      for (int m = 0; m < M; m++)
        for (int n = p * PANEL; n < N; n++) out[(size_t)m * N + n] = spill[(size_t)m * ldo + n - p * PANEL];
  }
}

/* out[M,N] = x[M,K] @ W[N,K]^T (+ bias), W packed, by the whole team, each thread its share of the
 * panels, between two barriers: x complete before, out complete after. */
static void linear(team_t *tm, int M, int N, int K, const float *x, const float *P, const float *bias, float *out) {
  int p0, p1;
  sync_team(tm);
  split((N + PANEL - 1) / PANEL, tm->t, tm->T, &p0, &p1); /* the thread's panels */
  panels(M, N, K, x, P, out, p0, p1, tm->spill);
  int n1 = p1 * PANEL < N ? p1 * PANEL : N;
  if (bias)
    for (int m = 0; m < M; m++)
      for (int n = p0 * PANEL; n < n1; n++) out[(size_t)m * N + n] += bias[n];
  sync_team(tm);
}

/* out[t] = scale * q . k[t] for n keys Dh apart (one query, a row's completion): 16 keys at a time,
 * their 16 sums in one tree. */
static void scores_of(const float *q, const float *k, int n, int Dh, float scale, float *out) {
  int D16 = Dh & ~15, t = 0;
  for (; t + 16 <= n; t += 16) {
    v16 acc[4][4];
    for (int j = 0; j < 16; j++) {
      const float *kr = k + (size_t)(t + j) * Dh;
      v16 a = (v16){0};
      for (int d = 0; d < D16; d += 16) a += *(const v16 *)(q + d) * *(const v16 *)(kr + d);
      acc[j / 4][j % 4] = a;
    }
    v16 sums = hsum16(acc);
    for (int j = 0; j < 16; j++) {
      float s = sums[j];
      for (int d = D16; d < Dh; d++) s += q[d] * k[(size_t)(t + j) * Dh + d];
      out[t + j] = s * scale;
    }
  }
  for (; t < n; t++) out[t] = dot(q, k + (size_t)t * Dh, Dh) * scale;
}

/* Attention of rows b0 .. b1 (one prompt's, u) for key head h of layer l at step s: their queries
 * (rep each) in chunks of QC, scored against the prompt's keys together and each row's own
 * completion keys, written to att. sc: QC rows of Tp16 + Tc16 scores. */
typedef struct {
  const float *pkT, *pv, *ck, *cv; /* this layer's and head's: pkT [Dh][Tp16], pv [Tp16][Dh] */
  const vi16 *show;                /* the prompt's slots shown, 16 a vector (softmax_two) */
  size_t c_row;                     /* floats from one row's completion keys (or values) to the next */
  int Tp, Tp16, Tc16, Dh, rep, s;
  float scale;
} head_keys_t;

static void attend_rows(const head_keys_t *k, int b0, int b1, int h, const float *qkv, int QKV, float *att, int QD,
                        float *sc) {
  const int nq_all = (b1 - b0) * k->rep, lds = k->Tp16 + k->Tc16, n = k->s + 1;
  for (int i0 = 0; i0 < nq_all; i0 += QC) {
    const int nq = nq_all - i0 < QC ? nq_all - i0 : QC;
    const float *q[QC];
    float *out[QC];
    for (int i = 0; i < nq; i++) {
      int b = b0 + (i0 + i) / k->rep, head = h * k->rep + (i0 + i) % k->rep;
      q[i] = qkv + (size_t)b * QKV + (size_t)head * k->Dh;
      out[i] = att + (size_t)b * QD + (size_t)head * k->Dh;
      memset(out[i], 0, sizeof(float) * k->Dh);
    }
    scores(nq, q, k->pkT, k->Tp16, k->Tp16 / 16, k->Dh, k->scale, sc, lds);
    /* the completion's keys are each row's own, [slots][Dh] (a new key is one contiguous write) */
    for (int i = 0; i < nq; i++)
      scores_of(q[i], k->ck + (size_t)((i0 + i) / k->rep) * k->c_row, n, k->Dh, k->scale, sc + (size_t)i * lds + k->Tp16);
    for (int i = 0; i < nq; i++) softmax_two(sc + (size_t)i * lds, k->Tp16, k->show, sc + (size_t)i * lds + k->Tp16, n);
    values(nq, sc, lds, k->pv, k->Tp, k->Dh, out);
    for (int i = 0; i < nq;) {
      int b = b0 + (i0 + i) / k->rep, j = i;
      while (j < nq && b0 + (i0 + j) / k->rep == b) j++;
      values(j - i, sc + (size_t)i * lds + k->Tp16, lds, k->cv + (size_t)(b - b0) * k->c_row, n, k->Dh, out + i);
      i = j;
    }
  }
}

/* In place, each of B rows of n: x - log(sum(e^x)). */
static void log_softmax_rows(float *x, int B, int n) {
  for (int b = 0; b < B; b++) {
    float *row = x + (size_t)b * n, shift = logsumexp_row(row, n);
    for (int i = 0; i < n; i++) row[i] -= shift;
  }
}

/* One step for B rows: feeds tokens[b], writes each row's keys and values into completion slot s,
 * and leaves log softmax(logits / temperature) in logprobs[B, vocab]. Returns 0, or -1 when memory
 * ran out. One parallel region: the products split the weights'
 * panels between the threads, attention splits (row, key head) pairs, the element-wise work splits
 * rows. */
int mlx_grpo_decode_step(const int64_t *dims, const float *fp, const uintptr_t *w, int B, const int32_t *tokens,
                         const float *pk, const float *pv, const uint8_t *pvis, int U, int Tp, float *ck, float *cv,
                         int Tc, int s, const int32_t *row_prompt, const int32_t *row_pos0, float *logprobs) {
  const model_t md = read_model(dims, fp);
  const int L = md.L, d = md.d, H = md.H, KV = md.KV, Dh = md.Dh, F = md.F, V = md.V, rd = md.rd, trad = md.trad,
            T = md.T, QD = md.QD, KD = md.KD, QKV = md.QKV, rep = md.rep, half = md.half;
  const float eps = md.eps, scale = md.scale, inv_t = md.inv_t;
  const int Tp16 = SLOTS16(Tp), Tc16 = SLOTS16(Tc);

  float *x = malloc(sizeof(float) * (size_t)B * d), *xn = malloc(sizeof(float) * (size_t)B * d),
        *qkv = malloc(sizeof(float) * (size_t)B * QKV), *att = malloc(sizeof(float) * (size_t)B * QD),
        *gu = malloc(sizeof(float) * (size_t)B * 2 * F), *act = malloc(sizeof(float) * (size_t)B * F),
        *tmp = malloc(sizeof(float) * (size_t)B * d), *cs = malloc(sizeof(float) * ((size_t)B * half + 1)),
        *sn = malloc(sizeof(float) * ((size_t)B * half + 1)),
        *scores = malloc(sizeof(float) * (size_t)T * QC * (Tp16 + Tc16)),
        *spill = malloc(sizeof(float) * (size_t)T * B * PANEL * BLOCK_PANELS);
  vi16 *show = malloc(sizeof(vi16) * ((size_t)U * Tp16 / 16 + 1));
  int ok = x && xn && qkv && att && gu && act && tmp && cs && sn && scores && spill && show;
  if (!ok) goto done;

  const float *embed = (const float *)w[W_EMBED];
  for (int b = 0; b < B; b++) memcpy(x + (size_t)b * d, embed + (size_t)tokens[b] * d, sizeof(float) * d);
    for (int b = 0; b < B; b++)
    rope_angles((float)(row_pos0[b] + s) * fp[F_ROPE_SCALE], half, fp[F_ROPE_BASE], cs + (size_t)b * half, sn + (size_t)b * half);
  prompt_masks(U, Tp, Tp16, pvis, show);

  barrier_t bar = {0, 0};
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    team_t tm = {&bar, t, nt, 0, spill + (size_t)t * B * PANEL * BLOCK_PANELS};
    int r0, r1; /* this thread's rows: its attention reads the keys its own RoPE wrote, unsynchronised */
    split(B, t, nt, &r0, &r1);
    float *sc = scores + (size_t)t * QC * (Tp16 + Tc16);
    for (int l = 0; l < L; l++) {
      const uintptr_t *lw = w + W_GLOBAL + (size_t)l * L_COUNT;
      rms_norm(r1 - r0, d, x + (size_t)r0 * d, (const float *)lw[L_IN_NORM], eps, xn + (size_t)r0 * d);
      linear(&tm, B, QKV, d, xn, (const float *)lw[L_QKV], (const float *)lw[L_QKV_BIAS], qkv);
      for (int b = r0; b < r1; b++) {
        float *row = qkv + (size_t)b * QKV;
        for (int h = 0; h < H + KV; h++) rope(row + (size_t)h * Dh, rd, trad, cs + (size_t)b * half, sn + (size_t)b * half);
        for (int h = 0; h < KV; h++) {
          size_t at = (((size_t)l * B + b) * KV + h) * Tc16 * Dh + (size_t)s * Dh;
          memcpy(ck + at, row + QD + (size_t)h * Dh, sizeof(float) * Dh);
          memcpy(cv + at, row + QD + KD + (size_t)h * Dh, sizeof(float) * Dh);
        }
      }
      /* a prompt's rows at a time (they are neighbours) */
      for (int b0 = r0, b1; b0 < r1; b0 = b1) {
        const int u = row_prompt[b0];
        for (b1 = b0 + 1; b1 < r1 && row_prompt[b1] == u;) b1++;
        for (int h = 0; h < KV; h++) {
          size_t p_at = (((size_t)l * U + u) * KV + h) * Tp16 * Dh, c_at = (((size_t)l * B + b0) * KV + h) * Tc16 * Dh;
          head_keys_t k = {pk + p_at, pv + p_at, ck + c_at, cv + c_at, show + (size_t)u * (Tp16 / 16), (size_t)KV * Tc16 * Dh,
                           Tp, Tp16, Tc16, Dh, rep, s, scale};
          attend_rows(&k, b0, b1, h, qkv, QKV, att, QD, sc);
        }
      }
      linear(&tm, B, d, QD, att, (const float *)lw[L_O], (const float *)lw[L_O_BIAS], tmp);
      for (size_t i = (size_t)r0 * d; i < (size_t)r1 * d; i++) x[i] += tmp[i];
      rms_norm(r1 - r0, d, x + (size_t)r0 * d, (const float *)lw[L_POST_NORM], eps, xn + (size_t)r0 * d);
      linear(&tm, B, 2 * F, d, xn, (const float *)lw[L_GATE_UP], (const float *)lw[L_GATE_UP_BIAS], gu);
      for (int b = r0; b < r1; b++) swiglu_row(gu + (size_t)b * 2 * F, gu + (size_t)b * 2 * F + F, act + (size_t)b * F, F);
      linear(&tm, B, d, F, act, (const float *)lw[L_DOWN], (const float *)lw[L_DOWN_BIAS], tmp);
      for (size_t i = (size_t)r0 * d; i < (size_t)r1 * d; i++) x[i] += tmp[i];
    }
    rms_norm(r1 - r0, d, x + (size_t)r0 * d, (const float *)w[W_NORM], eps, xn + (size_t)r0 * d);
    linear(&tm, B, V, d, xn, (const float *)w[W_HEAD], 0, logprobs);
    if (inv_t != 1.0f)
      for (size_t i = (size_t)r0 * V; i < (size_t)r1 * V; i++) logprobs[i] *= inv_t;
    log_softmax_rows(logprobs + (size_t)r0 * V, r1 - r0, V);
  }

done:
  free(x), free(xn), free(qkv), free(att), free(gu), free(act), free(tmp), free(cs), free(sn), free(scores), free(spill), free(show);
  return ok ? 0 : -1;
}

/* r[i][l] becomes r[l][i]: for each bit of the lane index, the rows whose bit differs swap the
 * lanes whose bit differs (four rounds of two-vector shuffles). */
static inline void transpose16(v16 r[PANEL]) {
  for (int h = 8; h >= 1; h >>= 1) {
    vi16 lo, hi;
    for (int l = 0; l < 16; l++) {
      lo[l] = (l & h) ? 16 + l - h : l;
      hi[l] = (l & h) ? 16 + l : l + h;
    }
    for (int i = 0; i < PANEL; i++)
      if (!(i & h)) {
        v16 a = r[i], b = r[i + h];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + h] = __builtin_shuffle(a, b, hi);
      }
  }
}

/* A product's weight for decode's copy: `pieces` weights stacked by rows (q|k|v, gate|up; N rows in
 * all, K columns), each W_i[rows_i, K] + bs_i[rows_i, r_i] @ a_i[r_i, K] -- the adapter folded in
 * (bs = scale * B^T, a = A^T; r_i = 0: W_i as it is) -- written packed into P (ceil(N / 16)
 * panels, rows past N zero) in one pass over each weight. A thread takes whole panels: it folds
 * their 16 rows into a buffer, then turns every 16 x 16 block in registers, so the panel is
 * written in order. Returns 0, or -1 when memory ran out. */
int mlx_grpo_fold(int N, int K, int pieces, const int32_t *rows, const int32_t *ranks, const uintptr_t *W,
                  const uintptr_t *bs, const uintptr_t *a, float *P) {
  const int T = team_size(0), panels = (N + PANEL - 1) / PANEL, K16 = K & ~15;
  float *bufs = malloc(sizeof(float) * (size_t)PANEL * K * T);
  if (!bufs) return -1;
#pragma omp parallel num_threads(T)
  {
    float *buf = bufs + (size_t)omp_get_thread_num() * PANEL * K;
#pragma omp for schedule(static)
    for (int p = 0; p < panels; p++) {
      for (int j = 0, piece = 0, start = 0; j < PANEL; j++) {
        int n = p * PANEL + j;
        float *row = buf + (size_t)j * K;
        while (piece < pieces && n >= start + rows[piece]) start += rows[piece++];
        if (piece == pieces) { /* past N */
          memset(row, 0, sizeof(float) * K);
          continue;
        }
        const int i = n - start, r = ranks[piece];
        const float *wp = (const float *)W[piece], *bp = (const float *)bs[piece], *ap = (const float *)a[piece];
        memcpy(row, wp + (size_t)i * K, sizeof(float) * K);
        for (int q = 0; q < r; q++) {
          const float c = bp[(size_t)i * r + q], *ar = ap + (size_t)q * K;
          for (int k = 0; k < K; k++) row[k] += c * ar[k];
        }
      }
      float *panel = P + (size_t)p * K * PANEL;
      for (int k = 0; k < K16; k += 16) {
        v16 blk[PANEL];
        for (int j = 0; j < PANEL; j++) blk[j] = *(const v16 *)(buf + (size_t)j * K + k);
        transpose16(blk);
        for (int j = 0; j < PANEL; j++) *(v16 *)(panel + (size_t)(k + j) * PANEL) = blk[j];
      }
      for (int k = K16; k < K; k++)
        for (int j = 0; j < PANEL; j++) panel[(size_t)k * PANEL + j] = buf[(size_t)j * K + k];
    }
  }
  free(bufs);
  return 0;
}
