// The operator schemas: one definition, implemented per backend in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(gspn_lightning, m) {
  // h = scan(x, lam, w_neg, w_mid, w_pos) along `direction`; chunk_size <= 0 is the global scan.
  m.def("scan_fwd(Tensor x, Tensor lam, Tensor w_neg, Tensor w_mid, Tensor w_pos, str direction, "
        "int chunk_size) -> Tensor");
  // Gradients of the five inputs, given dL/dh and the forward output h.
  m.def("scan_bwd(Tensor grad_h, Tensor x, Tensor lam, Tensor w_neg, Tensor w_mid, Tensor w_pos, "
        "Tensor h, str direction, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The fused propagation of the GSPN mixer: x (B, C, H, W), raw gate logits (B, K, 6, C, H, W) in the
  // order (g_neg, g_mid, g_pos, lam, u, d), merge weights (K, C), one direction per k:
  //   y = sum_k merge[k] * (sigmoid(u_k) * scan_k(x; sigmoid(lam_k), normalize_gates(g_k)) + d_k * x)
  m.def("propagate_fwd(Tensor x, Tensor gates, Tensor merge, str[] directions, int chunk_size) -> Tensor");
  // Gradients of x, gates and merge given dL/dy; recomputes the scans (the forward saves nothing).
  m.def("propagate_bwd(Tensor grad_y, Tensor x, Tensor gates, Tensor merge, str[] directions, "
        "int chunk_size) -> (Tensor, Tensor, Tensor)");
  // The same with the low-rank gate projection fused in: the logits are never materialised but
  // computed from proxy (B, S, H, W), weight (K*6*C, S) and bias (K*6*C) as
  //   gates[b, k, f, c] = bias[r] + sum_s weight[r, s] proxy[b, s],   r = (k*6 + f)*C + c.
  m.def("propagate_proj_fwd(Tensor x, Tensor proxy, Tensor weight, Tensor bias, Tensor merge, str[] directions, "
        "int chunk_size) -> Tensor");
  // Gradients of x, proxy, weight, bias and merge given dL/dy (recomputes the logits and the scans).
  m.def("propagate_proj_bwd(Tensor grad_y, Tensor x, Tensor proxy, Tensor weight, Tensor bias, Tensor merge, "
        "str[] directions, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The fused GSPN attention of the SD-XL swap: q, k, v (B, H, W, E), proxy (B, H, W, S), tap weight
  // (K*3*E, S) and bias (K*3*E) (row (k*3 + t)*E + e), merge (K, E), u_bias (E):
  //   num, den = sum_k merge[k] * scan_k(v | 1; sigmoid(k), normalize_gates(proxy weight^T + bias))
  //   out      = sigmoid(q + u_bias) * num / max(den, tiny)                 (B, H, W, E)
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor proxy, Tensor weight, Tensor bias, Tensor merge, "
        "Tensor u_bias, str[] directions, int chunk_size) -> Tensor");
  // Gradients of the eight tensor inputs given dL/dout (recomputes the taps and the scans).
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor proxy, Tensor weight, Tensor bias, "
        "Tensor merge, Tensor u_bias, str[] directions, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  // LayerNorm over the channels of each pixel, then GRN, of the mixer's merged map y (B, C, H, W) (gspn_norm.h):
  //   out = z (1 + gamma g / (mean_c g + grn_eps)) + beta,   z = layer_norm(y; weight, bias, eps),
  //   g = ||z||_2 over the pixels per (batch, channel).
  // Also returns what the backward needs: per-pixel mean and rstd (B, H, W), g (B, C), in float32 for
  // 16-bit maps.  The parameters (C,) have y's dtype or its accumulation dtype; out is channels-last.
  m.def("layer_norm_grn_fwd(Tensor y, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, float eps, "
        "float grn_eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of y, weight, bias, gamma and beta given dL/dout (recomputes the normalised map).
  m.def("layer_norm_grn_bwd(Tensor grad_out, Tensor y, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, "
        "Tensor mean, Tensor rstd, Tensor gnorm, float grn_eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
