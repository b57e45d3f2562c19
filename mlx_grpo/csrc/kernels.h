/* The pieces of a llama-shaped forward pass that decode.c (one token a row, a step) and forward.c
 * (many tokens a row at once) share: e^x on 16 lanes, RMSNorm, RoPE, and attention's scores,
 * softmax and weighted sums over keys stored for them. */
#ifndef MLX_GRPO_KERNELS_H
#define MLX_GRPO_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

int mlx_grpo_blas_threads(void);
extern int omp_get_num_procs(void);

/* The model's sizes and scalars, as both entry points take them (dims[], fp[]). */
enum { D_LAYERS, D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_FFN, D_VOCAB, D_ROPE_DIMS, D_ROPE_TRADITIONAL,
       D_THREADS, D_COUNT };
enum { F_EPS, F_ROPE_BASE, F_ROPE_SCALE, F_ATTN_SCALE, F_INV_TEMPERATURE, F_COUNT };

/* Lane by lane: a where m is set (all ones), else b. */
static inline v16 vselect(vi16 m, v16 a, v16 b) { return (v16)(((vi16)a & m) | ((vi16)b & ~m)); }

/* e^x on 16 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7 (relative
 * error ~5e-9 before rounding), 2^n through the exponent bits. x is clamped to where e^x is a
 * normal float; below that the result is ~1e-38 instead of smaller, which no sum here can tell. */
static inline v16 vexp(v16 x) {
  const v16 hi = (v16){0} + 88.3762626647949f, lo = (v16){0} + -87.3365447504019f;
  x = vselect(x > hi, hi, x);
  x = vselect(x < lo, lo, x);
  const v16 magic = (v16){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  v16 n = (x * 1.44269504088896341f + magic) - magic;
  v16 r = x - n * 0.693359375f - n * -2.12194440e-4f; /* ln 2 in two parts */
  v16 p = (v16){0} + (1.0f / 5040);
  p = p * r + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  return p * (v16)e;
}

static inline float sexp(float x) {
  v16 v = (v16){0} + x;
  return vexp(v)[0];
}

static inline float dot(const float *a, const float *b, int n) {
  v16 acc = (v16){0};
  int k = 0;
  for (; k + 16 <= n; k += 16) acc += *(const v16 *)(a + k) * *(const v16 *)(b + k);
  float s = 0;
  for (int i = 0; i < 16; i++) s += acc[i];
  for (; k < n; k++) s += a[k] * b[k];
  return s;
}

/* The threads to use: `wanted`, else (0) as many as the BLAS is set to; never more than the cores,
 * as the step's threads spin at their barriers and must each have one. */
static int team_size(int64_t wanted) {
  int T = wanted > 0 ? (int)wanted : mlx_grpo_blas_threads();
  if (T > omp_get_num_procs()) T = omp_get_num_procs();
  return T < 1 ? 1 : T;
}

/* Thread t of T's contiguous share [*a, *b) of n items. */
static inline void split(int n, int t, int T, int *a, int *b) {
  int per = (n + T - 1) / T;
  *a = t * per < n ? t * per : n;
  *b = *a + per < n ? *a + per : n;
}

/* The model's sizes and scalars, read from dims[] and fp[] (and the team's size) once. */
typedef struct {
  int L, d, H, KV, Dh, F, V, rd, trad, T, QD, KD, QKV, rep, half;
  float eps, scale, inv_t;
} model_t;

static inline model_t read_model(const int64_t *dims, const float *fp) {
  model_t m = {(int)dims[D_LAYERS], (int)dims[D_HIDDEN], (int)dims[D_HEADS], (int)dims[D_KV_HEADS],
               (int)dims[D_HEAD_DIM], (int)dims[D_FFN], (int)dims[D_VOCAB], (int)dims[D_ROPE_DIMS],
               (int)dims[D_ROPE_TRADITIONAL], team_size(dims[D_THREADS])};
  m.QD = m.H * m.Dh, m.KD = m.KV * m.Dh, m.QKV = m.QD + 2 * m.KD, m.rep = m.H / m.KV, m.half = m.rd / 2;
  m.eps = fp[F_EPS], m.scale = fp[F_ATTN_SCALE], m.inv_t = fp[F_INV_TEMPERATURE];
  return m;
}

/* MLX's RMSNorm: x / sqrt(mean(x^2) + eps) * w. */
static void rms_norm(int B, int d, const float *x, const float *w, float eps, float *out) {
  for (int b = 0; b < B; b++) {
    const float *xr = x + (size_t)b * d;
    float ss = dot(xr, xr, d);
    float inv = 1.0f / sqrtf(ss / d + eps);
    for (int i = 0; i < d; i++) out[(size_t)b * d + i] = xr[i] * inv * w[i];
  }
}

/* MLX's RoPE on one head vector at position pos (cos/sin of pos * inv_freq precomputed per row). */
static void rope(float *v, int dims, int traditional, const float *cs, const float *sn) {
  int half = dims / 2;
  for (int i = 0; i < half; i++) {
    int a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
    float x1 = v[a], x2 = v[b];
    v[a] = x1 * cs[i] - x2 * sn[i];
    v[b] = x1 * sn[i] + x2 * cs[i];
  }
}

/* Over the prompt, attention takes the queries that read the same keys together: the heads of a
 * row that share a key head (grouped-query attention) and every row of the thread from the same
 * prompt (its group). The prompt's keys are stored transposed, [Dh][slots] with the slots padded
 * to a multiple of 16 (SLOTS16), so 16 keys' scores are one vector: a key vector loaded once serves
 * every query, and no horizontal sums are left; values stay [slots][Dh], four queries' sums built at
 * a time. A row's completion keys stay [slots][Dh]: stored transposed, each new key was written
 * across Dh cache lines, which cost more (1.2 ms a SmolLM2 step) than its scores saved. */
#define QC 8  /* queries scored together */
#define SLOTS16(n) (((n) + 15) & ~15)

/* s[i][t] = scale * q_i . k_t for the NQ queries q[i] and keys t < 16 * tiles, kt[d][t] (rows ld
 * apart); s's rows lds apart. */
static inline __attribute__((always_inline)) void scores_n(int NQ, const float *const *q, const float *kt, int ld,
                                                           int tiles, int Dh, float scale, float *s, int lds) {
  for (int t = 0; t < 16 * tiles; t += 16) {
    v16 acc[QC];
    for (int i = 0; i < NQ; i++) acc[i] = (v16){0};
    for (int d = 0; d < Dh; d++) {
      const v16 k = *(const v16 *)(kt + (size_t)d * ld + t);
      for (int i = 0; i < NQ; i++) acc[i] += q[i][d] * k;
    }
    for (int i = 0; i < NQ; i++) *(v16 *)(s + (size_t)i * lds + t) = acc[i] * scale;
  }
}

#define SCORES_CASE(n) \
  case n: scores_n(n, q, kt, ld, tiles, Dh, scale, s, lds); break;
static void scores(int nq, const float *const *q, const float *kt, int ld, int tiles, int Dh, float scale, float *s,
                   int lds) {
  switch (nq) { SCORES_CASE(1) SCORES_CASE(2) SCORES_CASE(3) SCORES_CASE(4) SCORES_CASE(5) SCORES_CASE(6)
                SCORES_CASE(7) SCORES_CASE(8) }
}

/* out[i] += sum_{t < n} p[i][t] v[t] for NQ <= 4 queries (p's rows ldp apart), values Dh apart,
 * Dh a multiple of 16: 64 columns at a time in registers. */
static inline __attribute__((always_inline)) void values_n(int NQ, const float *p, int ldp, const float *v, int n,
                                                           int Dh, float *const *out) {
  for (int c = 0; c < Dh; c += 64) {
    const int m = Dh - c < 64 ? (Dh - c) / 16 : 4;
    v16 acc[4][4];
    for (int i = 0; i < NQ; i++)
      for (int j = 0; j < 4; j++) acc[i][j] = (v16){0};
    for (int t = 0; t < n; t++) {
      const float *vr = v + (size_t)t * Dh + c;
      v16 vv[4];
      for (int j = 0; j < 4; j++) vv[j] = j < m ? *(const v16 *)(vr + 16 * j) : (v16){0};
      for (int i = 0; i < NQ; i++) {
        const float w = p[(size_t)i * ldp + t];
        for (int j = 0; j < 4; j++) acc[i][j] += w * vv[j];
      }
    }
    for (int i = 0; i < NQ; i++)
      for (int j = 0; j < m; j++) *(v16 *)(out[i] + c + 16 * j) += acc[i][j];
  }
}

static void values(int nq, const float *p, int ldp, const float *v, int n, int Dh, float *const *out) {
  if (Dh % 16) { /* head sizes off the vector width: plain loops */
    for (int i = 0; i < nq; i++)
      for (int t = 0; t < n; t++)
        for (int d = 0; d < Dh; d++) out[i][d] += p[(size_t)i * ldp + t] * v[(size_t)t * Dh + d];
    return;
  }
  for (int i = 0; i < nq; i += 4) {
    switch (nq - i < 4 ? nq - i : 4) {
      case 1: values_n(1, p + (size_t)i * ldp, ldp, v, n, Dh, out + i); break;
      case 2: values_n(2, p + (size_t)i * ldp, ldp, v, n, Dh, out + i); break;
      case 3: values_n(3, p + (size_t)i * ldp, ldp, v, n, Dh, out + i); break;
      default: values_n(4, p + (size_t)i * ldp, ldp, v, n, Dh, out + i);
    }
  }
}


/* MLX's fast RoPE angles for one position (pos already times the scale): angle_i = pos *
 * base^(-i / half), i < half, as cos and sin. */
static inline void rope_angles(float pos, int half, float base, float *cs, float *sn) {
  for (int i = 0; i < half; i++) {
    float a = pos * expf(-(float)i * (logf(base) / half));
    cs[i] = cosf(a);
    sn[i] = sinf(a);
  }
}

/* a = SiLU(g) * up over F values. */
static inline void swiglu_row(const float *g, const float *up, float *a, int F) {
  int i = 0;
  for (; i + 16 <= F; i += 16) {
    v16 gv = *(const v16 *)(g + i);
    *(v16 *)(a + i) = gv / (1.0f + vexp(-gv)) * *(const v16 *)(up + i);
  }
  for (; i < F; i++) a[i] = g[i] / (1.0f + sexp(-g[i])) * up[i];
}

static inline v16 vmax(v16 a, v16 b) { return vselect(a > b, a, b); }

/* log(sum(e^z)) over n values, 16 at a time. */
static inline float logsumexp_row(const float *z, int n) {
  v16 mv = (v16){0} - INFINITY;
  int i = 0;
  for (; i + 16 <= n; i += 16) mv = vmax(mv, *(const v16 *)(z + i));
  float top = mv[0];
  for (int e = 1; e < 16; e++) top = mv[e] > top ? mv[e] : top;
  for (; i < n; i++) top = z[i] > top ? z[i] : top;
  v16 acc = (v16){0};
  for (i = 0; i + 16 <= n; i += 16) acc += vexp(*(const v16 *)(z + i) - top);
  float sum = 0;
  for (int e = 0; e < 16; e++) sum += acc[e];
  for (; i < n; i++) sum += sexp(z[i] - top);
  return top + logf(sum);
}

/* Which of each prompt's Tp16 slots attention sees (all ones: shown; zero: padding or hidden by
 * vis[U][Tp]), 16 slots a vector, for softmax_two. */
static inline void prompt_masks(int U, int Tp, int Tp16, const uint8_t *vis, vi16 *show) {
  for (int u = 0; u < U; u++)
    for (int t = 0; t < Tp16; t++) show[(size_t)u * (Tp16 / 16) + t / 16][t % 16] = t < Tp && vis[(size_t)u * Tp + t] ? -1 : 0;
}

/* In place over one query's scores, 16 at a time: the prompt's Tp16 at x (shown: show[t] all ones,
 * else zero -- hidden or padding) and the completion's first n at c, turned into softmax weights
 * (0 where not shown, and in c's last 16 past n). */
static void softmax_two(float *x, int Tp16, const vi16 *show, float *c, int n) {
  const v16 ninf = (v16){0} - INFINITY;
  const int n16 = SLOTS16(n);
  vi16 lane;
  for (int l = 0; l < 16; l++) lane[l] = l;
  v16 mv = ninf;
  for (int t = 0; t < Tp16; t += 16) mv = vmax(mv, vselect(show[t / 16], *(v16 *)(x + t), ninf));
  for (int t = 0; t < n16; t += 16) mv = vmax(mv, vselect(lane + t < n, *(v16 *)(c + t), ninf));
  float mx = mv[0];
  for (int l = 1; l < 16; l++) mx = mv[l] > mx ? mv[l] : mx;
  v16 sum = (v16){0};
  for (int t = 0; t < Tp16; t += 16) {
    v16 e = vselect(show[t / 16], vexp(*(v16 *)(x + t) - mx), (v16){0});
    *(v16 *)(x + t) = e;
    sum += e;
  }
  for (int t = 0; t < n16; t += 16) {
    v16 e = vselect(lane + t < n, vexp(*(v16 *)(c + t) - mx), (v16){0});
    *(v16 *)(c + t) = e;
    sum += e;
  }
  float total = 0;
  for (int l = 0; l < 16; l++) total += sum[l];
  const float inv = 1.0f / total;
  for (int t = 0; t < Tp16; t += 16) *(v16 *)(x + t) *= inv;
  for (int t = 0; t < n16; t += 16) *(v16 *)(c + t) *= inv;
}

#endif
