/* cblas_sgemm for the few-row products of decoding, preloaded in front of the BLAS.
 *
 * A decode step multiplies a handful of rows (one per completion) by every weight matrix:
 * x[M,K] @ W[N,K]^T with M around 16. Such a product is bound by reading W, and OpenBLAS spends
 * much of it packing W into panels first. Here each thread streams its share of W's rows once,
 * four at a time (a tile), and takes four rows of x at a time against them in registers (16
 * accumulators of 16 floats, summed at the end in one tree of shuffles); the tile stays in the
 * L1 cache for the next four rows of x, and while it does, the next tile is prefetched, so that
 * memory is read all along instead of in bursts. Anything else -- another layout, more than
 * MAX_ROWS rows, a small W -- goes on to the next cblas_sgemm in the process (the BLAS preloaded
 * after this library; plain loops, with a warning, if there is none). Threads: as many as that
 * BLAS is set to use now (openblas_get_num_threads; MKL's count where OpenBLAS is absent; one
 * where neither answers), so a caller that limits the BLAS limits this too.
 *
 * Built on the user's machine by mlx_grpo/skinny.py with -O3 -march=native -fopenmp; the vector
 * type is GCC's, which compiles to AVX-512, AVX2 or NEON as the machine has.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>

#define MAX_ROWS 48          /* past 48 rows OpenBLAS is as fast (measured, SmolLM2 and Qwen shapes) */
#define MIN_WEIGHTS 65536    /* N * K below this: nothing to stream, leave it to the BLAS */
#define ROW_MAJOR 101
#define NO_TRANS 111
#define TRANS 112
#define NR 4                 /* rows of W per tile */

#include "vec.h"

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn next_sgemm;
static int (*blas_threads)(void);
static int threads_looked_up;
static long calls;
static int enabled = 1;

/* MR rows of x against the tile's NR rows of W over the first K16 columns (a[i][j]: 16 partial
 * sums), prefetching `step` floats from `pf` on for every 16 columns when `pf` is set. The sums
 * build in locals and reach `a` once at the end: accumulated through the pointer, GCC kept them
 * in memory (a load and a store around every multiply-add), a third of the speed. */
#define TILE(MR)                                                                                  \
  static void tile##MR(int K16, const float *x, int ldx, const float *const *w, v16 a[4][NR],      \
                       const float *pf, int step) {                                               \
    v16 acc[MR][NR];                                                                              \
    for (int i = 0; i < MR; i++)                                                                  \
      for (int j = 0; j < NR; j++) acc[i][j] = (v16){0};                                          \
    for (int k = 0; k < K16; k += 16) {                                                           \
      v16 wv[NR];                                                                                 \
      for (int j = 0; j < NR; j++) wv[j] = *(const v16 *)(w[j] + k);                              \
      if (pf)                                                                                     \
        for (int p = 0; p < step; p += 16) __builtin_prefetch(pf + (size_t)k / 16 * step + p, 0, 3); \
      for (int i = 0; i < MR; i++) {                                                              \
        v16 xv = *(const v16 *)(x + (size_t)i * ldx + k);                                         \
        for (int j = 0; j < NR; j++) acc[i][j] += xv * wv[j];                                     \
      }                                                                                           \
    }                                                                                             \
    for (int i = 0; i < 4; i++)                                                                   \
      for (int j = 0; j < NR; j++) a[i][j] = i < MR ? acc[i < MR ? i : 0][j] : (v16){0};          \
  }
TILE(1)
TILE(2)
TILE(3)
TILE(4)

static inline void put(float *o, float s, float alpha, float beta) {
  *o = beta == 0.0f ? alpha * s : alpha * s + beta * *o; /* beta 0: C is not read (BLAS rule) */
}

static void rows(int M, int n0, int n1, int K, const float *x, int ldx, const float *W, int ldw,
                 float *out, int ldo, float alpha, float beta) {
  int K16 = K & ~15;
  int n = n0;
  for (; n + NR <= n1; n += NR) {
    const float *w[NR];
    for (int j = 0; j < NR; j++) w[j] = W + (size_t)(n + j) * ldw;
    for (int m0 = 0; m0 < M; m0 += 4) {
      int mr = M - m0 < 4 ? M - m0 : 4;
      const float *xm = x + (size_t)m0 * ldx;
      /* while this tile computes from cache, fetch the next one: its NR * K floats (contiguous
         when ldw == K) split over the chunks of x and the iterations of each */
      const float *pf = 0;
      int step = 0;
      if (ldw == K && n + 2 * NR <= n1 && K16 >= 16) {
        int chunks = (M + 3) / 4, span = (NR * K + chunks - 1) / chunks, iters = K16 / 16;
        step = ((span + iters - 1) / iters + 15) & ~15;
        pf = W + (size_t)(n + NR) * ldw + (size_t)(m0 / 4) * span;
      }
      v16 a[4][NR];
      switch (mr) {
        case 4: tile4(K16, xm, ldx, w, a, pf, step); break;
        case 3: tile3(K16, xm, ldx, w, a, pf, step); break;
        case 2: tile2(K16, xm, ldx, w, a, pf, step); break;
        default: tile1(K16, xm, ldx, w, a, pf, step);
      }
      v16 sums = hsum16(a); /* lane 4i + j: row i of x against row j of W */
      for (int i = 0; i < mr; i++) {
        const float *xr = xm + (size_t)i * ldx;
        for (int j = 0; j < NR; j++) {
          float s = sums[4 * i + j];
          for (int k = K16; k < K; k++) s += xr[k] * w[j][k];
          put(out + (size_t)(m0 + i) * ldo + n + j, s, alpha, beta);
        }
      }
    }
  }
  for (; n < n1; n++) { /* the last rows of W, fewer than NR */
    const float *wr = W + (size_t)n * ldw;
    for (int m = 0; m < M; m++) {
      const float *xr = x + (size_t)m * ldx;
      float s = 0;
      for (int k = 0; k < K; k++) s += xr[k] * wr[k];
      put(out + (size_t)m * ldo + n, s, alpha, beta);
    }
  }
}

/* Thread t of T: its share of W's rows (out's columns), in whole tiles. */
static void share(int M, int N, int K, const float *x, int ldx, const float *W, int ldw, float *out, int ldo,
                  float alpha, float beta, int t, int T) {
  int per = ((N + T - 1) / T + NR - 1) / NR * NR;
  int a = t * per < N ? t * per : N, b = a + per < N ? a + per : N;
  if (a < b) rows(M, a, b, K, x, ldx, W, ldw, out, ldo, alpha, beta);
}

static void skinny(int M, int N, int K, const float *x, int ldx, const float *W, int ldw, float *out,
                   int ldo, float alpha, float beta, int threads) {
  if (threads <= 1) {
    rows(M, 0, N, K, x, ldx, W, ldw, out, ldo, alpha, beta);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    extern int omp_get_thread_num(void), omp_get_num_threads(void);
    share(M, N, K, x, ldx, W, ldw, out, ldo, alpha, beta, omp_get_thread_num(), omp_get_num_threads());
  }
}

/* The threads the BLAS is set to use now (one where it does not say). */
__attribute__((visibility("hidden"))) int mlx_grpo_blas_threads(void) {
  if (!__atomic_load_n(&threads_looked_up, __ATOMIC_ACQUIRE)) {
    blas_threads = (int (*)(void))dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
    if (!blas_threads) blas_threads = (int (*)(void))dlsym(RTLD_DEFAULT, "MKL_Get_Max_Threads");
    __atomic_store_n(&threads_looked_up, 1, __ATOMIC_RELEASE);
  }
  return blas_threads ? blas_threads() : 1;
}

/* Any cblas_sgemm call, by the definition: for the case with no BLAS to hand it to. */
static void reference(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      float s = 0;
      for (int k = 0; k < K; k++) {
        /* element (i,k) of op(A) and (k,j) of op(B), in either storage order */
        int a_row = (ta == NO_TRANS) ? i : k, a_col = (ta == NO_TRANS) ? k : i;
        int b_row = (tb == NO_TRANS) ? k : j, b_col = (tb == NO_TRANS) ? j : k;
        float a = order == ROW_MAJOR ? A[(size_t)a_row * lda + a_col] : A[(size_t)a_col * lda + a_row];
        float b = order == ROW_MAJOR ? B[(size_t)b_row * ldb + b_col] : B[(size_t)b_col * ldb + b_row];
        s += a * b;
      }
      float *o = order == ROW_MAJOR ? C + (size_t)i * ldc + j : C + (size_t)j * ldc + i;
      put(o, s, alpha, beta);
    }
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
  if (__atomic_load_n(&enabled, __ATOMIC_RELAXED) && order == ROW_MAJOR && ta == NO_TRANS && tb == TRANS && M >= 2 && M <= MAX_ROWS && K >= 16 &&
      (long)N * K >= MIN_WEIGHTS && lda >= K && ldb >= K && ldc >= N) {
    __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    skinny(M, N, K, A, lda, B, ldb, C, ldc, alpha, beta, mlx_grpo_blas_threads());
    return;
  }
  if (!next_sgemm) next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  if (next_sgemm) {
    next_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  /* No BLAS after this library (preloaded without one): slow, but never a wrong result or a crash. */
  static int warned;
  if (!__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
    fprintf(stderr, "mlx-grpo: %s preloaded without a BLAS after it; products computed by plain loops\n",
            "the few-row kernel");
  reference(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* How many products this library computed itself (for tests and the benchmark). */
long mlx_grpo_skinny_calls(void) { return __atomic_load_n(&calls, __ATOMIC_RELAXED); }

/* 0: every call goes on to the BLAS (a peer timed in the same process); 1: back on. */
void mlx_grpo_skinny_enable(int on) { __atomic_store_n(&enabled, on, __ATOMIC_RELAXED); }
