/* A forward pass of a llama-shaped model (llama, qwen2, mistral) over many tokens a row, all at
 * once, in C for the CPU backend, with nothing differentiated: the prompts' prefill (keys, values and
 * the last position's hidden state, for decode.c and for scoring) and the scoring pass of a GRPO step
 * (the completions' log-probabilities under the KL reference, and under the sampling policy when a
 * step updates more than once).
 *
 * Through MLX, SmolLM2's reference pass over 16 completions of 64 tokens took ~2.5 s against a FLOP
 * bound of ~1: its products run at the BLAS's speed, but attention's softmax evaluates e^x one
 * element at a time (~16 ns each), and norms, RoPE, SiLU and the log-softmax over the vocabulary
 * are as many passes over memory. Here the products are the same BLAS calls (cblas_sgemm, on the
 * model's own row-major weights: no copy), and the rest runs in vectors between them: e^x 16 lanes
 * at a time, each row's queries scored together against its prompt's keys (shared by its group)
 * and its own keys so far, the log-softmax fused with the output head a few hundred rows at a time.
 *
 * Rows attend to a shared prefix (a prompt, or the prompts' common start; none: Tp = 0) in decode.c's
 * layout -- keys [L][U][KV][Dh][Tp16] transposed, values [L][U][KV][Tp16][Dh], visibility [U][Tp] --
 * row b to prefix row_prompt[b], then causally to their own tokens. Row b's tokens come flat,
 * tokens[starts[b] .. starts[b+1]), its i-th at RoPE position row_pos0[b] + i. Outputs, each
 * optional (NULL: not computed): logp[j] = log softmax(logits_j / temperature)[targets[j]]; each
 * row's own keys and values in the prefix layout ([L][B][KV][Dh][n16], [L][B][KV][n16][Dh], n16 =
 * the longest row's tokens rounded up to 16, slots past a row's length zero); and last[B][d], the
 * final norm's output at each row's last token (what the output head reads).
 *
 * Weights (float32, row-major, the model's own buffers): W_EMBED, W_HEAD ([vocab, d]), W_NORM, then
 * per layer S_COUNT pointers: the two norms, then for each of the seven products (q, k, v, o, gate,
 * up, down) its weight [N, K], bias [N] (0: none), and an adapter's A^T [r, K] and scale B^T [N, r]
 * with the rank r (0: none) -- out = x W^T + bias + (x A^T^T) (scale B^T)^T.
 */
#include "passes.h"

int mlx_grpo_forward(const int64_t *dims, const float *fp, const uintptr_t *w, int B, const int32_t *starts,
                     const int32_t *tokens, const float *pk, const float *pv, const uint8_t *pvis, int U, int Tp,
                     const int32_t *row_prompt, const int32_t *row_pos0, const int32_t *targets, float *logp,
                     float *keys_out, float *values_out, float *last) {
  const model_t md = read_model(dims, fp);
  const int L = md.L, d = md.d, H = md.H, KV = md.KV, Dh = md.Dh, F = md.F, V = md.V, rd = md.rd, trad = md.trad,
            T = md.T, QD = md.QD, KD = md.KD, QKV = md.QKV, rep = md.rep, half = md.half;
  const float eps = md.eps, scale = md.scale, inv_t = md.inv_t;
  const int Tp16 = SLOTS16(Tp), M = starts[B];
  int n16 = 0; /* the longest row's slots */
  for (int b = 0; b < B; b++) n16 = SLOTS16(starts[b + 1] - starts[b]) > n16 ? SLOTS16(starts[b + 1] - starts[b]) : n16;
  if (M == 0) return 0;

  float *x = malloc(sizeof(float) * (size_t)M * d), *xn = malloc(sizeof(float) * (size_t)M * d),
        *qkv = malloc(sizeof(float) * (size_t)M * QKV), *att = malloc(sizeof(float) * (size_t)M * QD),
        *gu = malloc(sizeof(float) * (size_t)M * 2 * F), *act = malloc(sizeof(float) * (size_t)M * F), *tmp = malloc(sizeof(float) * (size_t)M * d),
        *cs = malloc(sizeof(float) * ((size_t)M * half + 1)), *sn = malloc(sizeof(float) * ((size_t)M * half + 1)),
        /* each row's own keys transposed [B][KV][Dh][n16] and values [B][KV][n16][Dh]: a layer's at a
           time here, unless every layer's is wanted (keys_out, values_out) */
        *kT = keys_out ? keys_out : calloc((size_t)B * KV * Dh * n16, sizeof(float)),
        *vv = values_out ? values_out : calloc((size_t)B * KV * n16 * Dh, sizeof(float)),
        *scores_buf = malloc(sizeof(float) * (size_t)T * QC * (Tp16 + n16)),
        *logits = logp ? malloc(sizeof(float) * (size_t)HEAD_ROWS * V) : NULL;
  vi16 *show = malloc(sizeof(vi16) * ((size_t)U * Tp16 / 16 + 1));
  int ok = x && xn && qkv && att && gu && act && tmp && cs && sn && kT && vv && scores_buf && (logits || !logp) && show;
  if (!ok) goto done;

  const float *embed = (const float *)w[W_EMBED];
  for (int b = 0; b < B; b++)
    for (int j = starts[b]; j < starts[b + 1]; j++) {
      memcpy(x + (size_t)j * d, embed + (size_t)tokens[j] * d, sizeof(float) * d);
      rope_angles((float)(row_pos0[b] + j - starts[b]) * fp[F_ROPE_SCALE], half, fp[F_ROPE_BASE], cs + (size_t)j * half,
                  sn + (size_t)j * half);
    }
  prompt_masks(U, Tp, Tp16, pvis, show);

  const size_t layer_kv = (size_t)B * KV * Dh * n16; /* floats of a layer's own keys (or values) */
  if (keys_out) memset(keys_out, 0, sizeof(float) * layer_kv * L), memset(values_out, 0, sizeof(float) * layer_kv * L);
  for (int l = 0; l < L && ok; l++) {
    const uintptr_t *lw = w + W_GLOBAL + (size_t)l * S_COUNT, *pw = lw + S_PRODUCTS;
    float *kT_l = kT + (keys_out ? l * layer_kv : 0), *vv_l = vv + (keys_out ? l * layer_kv : 0);
    norm_rows(M, d, x, (const float *)lw[S_IN_NORM], eps, xn, T);
    ok &= product(pw + P_Q * P_FIELDS, M, QD, d, xn, qkv, QKV) == 0;
    ok &= product(pw + P_K * P_FIELDS, M, KD, d, xn, qkv + QD, QKV) == 0;
    ok &= product(pw + P_V * P_FIELDS, M, KD, d, xn, qkv + QD + KD, QKV) == 0;
    /* RoPE, and each row's own keys and values into their slots */
#pragma omp parallel for num_threads(T) schedule(static)
    for (int b = 0; b < B; b++)
      for (int j = starts[b]; j < starts[b + 1]; j++) {
        float *row = qkv + (size_t)j * QKV;
        const int i = j - starts[b];
        for (int h = 0; h < H + KV; h++) rope(row + (size_t)h * Dh, rd, trad, cs + (size_t)j * half, sn + (size_t)j * half);
        for (int h = 0; h < KV; h++) {
          float *kt = kT_l + ((size_t)b * KV + h) * Dh * n16, *v = vv_l + (((size_t)b * KV + h) * n16 + i) * Dh;
          for (int e = 0; e < Dh; e++) kt[(size_t)e * n16 + i] = row[QD + (size_t)h * Dh + e];
          memcpy(v, row + QD + KD + (size_t)h * Dh, sizeof(float) * Dh);
        }
      }
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int bh = 0; bh < B * KV; bh++) {
      const int b = bh / KV, h = bh % KV, u = row_prompt[b], n = starts[b + 1] - starts[b];
      if (n == 0) continue;
      float *sc = scores_buf + (size_t)omp_get_thread_num() * QC * (Tp16 + n16);
      size_t p_at = (((size_t)l * U + u) * KV + h) * Tp16 * Dh;
      row_head_t k = {pk + p_at, pv + p_at, kT_l + ((size_t)b * KV + h) * Dh * n16, vv_l + ((size_t)b * KV + h) * n16 * Dh,
                      show + (size_t)u * (Tp16 / 16), Tp, Tp16, n, n16, Dh, rep, scale};
      attend(&k, h, qkv + (size_t)starts[b] * QKV, QKV, att + (size_t)starts[b] * QD, QD, sc);
    }
    ok &= product(pw + P_O * P_FIELDS, M, d, QD, att, tmp, d) == 0;
    add_rows((size_t)M * d, x, tmp, T);
    norm_rows(M, d, x, (const float *)lw[S_POST_NORM], eps, xn, T);
    ok &= product(pw + P_GATE * P_FIELDS, M, F, d, xn, gu, 2 * F) == 0;
    ok &= product(pw + P_UP * P_FIELDS, M, F, d, xn, gu + F, 2 * F) == 0;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int m = 0; m < M; m++) swiglu_row(gu + (size_t)m * 2 * F, gu + (size_t)m * 2 * F + F, act + (size_t)m * F, F);
    ok &= product(pw + P_DOWN * P_FIELDS, M, d, F, act, tmp, d) == 0;
    add_rows((size_t)M * d, x, tmp, T);
  }
  if (!ok) goto done;
  norm_rows(M, d, x, (const float *)w[W_NORM], eps, xn, T);
  if (last)
    for (int b = 0; b < B; b++)
      if (starts[b + 1] > starts[b]) memcpy(last + (size_t)b * d, xn + (size_t)(starts[b + 1] - 1) * d, sizeof(float) * d);
  for (int m0 = 0; logp && m0 < M; m0 += HEAD_ROWS) {
    const int mr = M - m0 < HEAD_ROWS ? M - m0 : HEAD_ROWS;
    cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, mr, V, d, inv_t, xn + (size_t)m0 * d, d, (const float *)w[W_HEAD], d, 0.0f,
                logits, V);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int m = 0; m < mr; m++) {
      const float *z = logits + (size_t)m * V;
      logp[m0 + m] = z[targets[m0 + m]] - logsumexp_row(z, V);
    }
  }

done:
  if (!keys_out) free(kT), free(vv);
  free(x), free(xn), free(qkv), free(att), free(gu), free(act), free(tmp), free(cs), free(sn), free(scores_buf), free(logits),
      free(show);
  return ok ? 0 : -1;
}
