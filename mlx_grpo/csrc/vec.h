/* GCC vector types (AVX-512, AVX2 or NEON as the machine has) and the horizontal sums that
 * skinny.c and decode.c share. */
#ifndef MLX_GRPO_VEC_H
#define MLX_GRPO_VEC_H

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int vi16 __attribute__((vector_size(64), aligned(4)));

#define SHUF(x, y, ...) __builtin_shuffle(x, y, (vi16){__VA_ARGS__})

/* The sums of 16 vectors as the 16 lanes of one (lane 4i + j: the sum of acc[i][j]): a tree of 15
 * adds and 30 shuffles, where summing each vector's lanes one by one took longer than the
 * few-row products at K = 576. */
static inline v16 hsum16(v16 acc[4][4]) {
  const v16 *a = &acc[0][0]; /* the 16 in a row */
  v16 b[8], c[4], d[2];
  for (int p = 0; p < 8; p++) /* lanes: 8 of a[2p], then 8 of a[2p+1] */
    b[p] = SHUF(a[2 * p], a[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(a[2 * p], a[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int p = 0; p < 4; p++) /* 4 lanes each of a[4p] .. a[4p+3] */
    c[p] = SHUF(b[2 * p], b[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF(b[2 * p], b[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int p = 0; p < 2; p++) /* 2 lanes each of a[8p] .. a[8p+7] */
    d[p] = SHUF(c[2 * p], c[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUF(c[2 * p], c[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUF(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUF(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#endif
