// Host-side layout handling shared by the CPU and CUDA bindings.
//
// Every direction is mapped onto one canonical scan over L lines of length M, forwards or backwards:
//   t2b: lines are rows (L = H, M = W), forwards     b2t: the same, backwards
//   l2r: lines are columns (L = W, M = H), forwards  r2l: the same, backwards
// Tensors are made contiguous (B*C planes).  For column scans a backend either asks for a transposed
// copy (`transpose_copy`: planes become (W, H), lines contiguous; the CUDA path) or keeps the
// image layout and handles the strided lines itself (`ScanArgs::columns`; the CPU path tiles them).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace gspn {

struct Direction {
  bool transpose;
  bool reverse;
};

inline Direction parse_direction(c10::string_view d) {
  if (d == "t2b") return {false, false};
  if (d == "b2t") return {false, true};
  if (d == "l2r") return {true, false};
  if (d == "r2l") return {true, true};
  TORCH_CHECK(false, "gspn scan: direction must be one of 't2b', 'b2t', 'l2r', 'r2l', got '",
              std::string(d.data(), d.size()), "'");
}

// (B, C, H, W) -> contiguous (B*C, ., .) planes for the scan (transposed planes if asked).
inline at::Tensor to_canonical(const at::Tensor& t, const Direction& dir, bool transpose_copy) {
  at::Tensor c = dir.transpose && transpose_copy ? t.transpose(-1, -2) : t;
  c = c.contiguous();
  return c.view({c.size(0) * c.size(1), c.size(-2), c.size(-1)});
}

// Back to a contiguous (B, C, H, W) tensor with the shape of `like`.
inline at::Tensor from_canonical(const at::Tensor& c, const at::Tensor& like, const Direction& dir,
                                 bool transpose_copy) {
  if (!(dir.transpose && transpose_copy)) return c.view(like.sizes());
  return c.view({like.size(0), like.size(1), like.size(3), like.size(2)}).transpose(-1, -2).contiguous();
}

inline void check_inputs(const std::vector<at::Tensor>& ts, const char* op) {
  const auto& x = ts[0];
  TORCH_CHECK(x.dim() == 4, op, ": expected 4-D (B, C, H, W) tensors, got ", x.dim(), "-D");
  for (const auto& t : ts) {
    TORCH_CHECK(t.sizes() == x.sizes(), op, ": all tensors must have the shape of x ", x.sizes(), ", got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": all tensors must have the dtype of x");
    TORCH_CHECK(t.device() == x.device(), op, ": all tensors must be on the device of x");
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected floating-point tensors");
}

// Tasks per chunk of a CPU at::parallel_for, from the work of one task (in pixel-steps): at least
// ~32k pixel-steps per chunk, so that a small op runs inline instead of paying the thread pool's
// start-up for microseconds of work.
inline int64_t parallel_grain(int64_t work_per_task) {
  const int64_t w = work_per_task > 0 ? work_per_task : 1;
  return (int64_t{1} << 15) / w > 1 ? (int64_t{1} << 15) / w : 1;
}

// chunk_size <= 0 or >= L means one group over the whole scan axis (the global variant).
inline int64_t effective_chunk(int64_t chunk_size, int64_t L) {
  return (chunk_size <= 0 || chunk_size >= L) ? (L > 0 ? L : 1) : chunk_size;
}

// The five scan inputs as contiguous planes, with the scan geometry.  With `columns`, line s of a
// plane is its column s (element j at j * L + s); otherwise line s is contiguous at s * M.
struct ScanArgs {
  at::Tensor x, lam, wn, wm, wp;
  int64_t N, L, M, k;
  bool reverse, columns;
};

inline ScanArgs canonical_args(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                               const at::Tensor& w_mid, const at::Tensor& w_pos, const Direction& dir,
                               int64_t chunk_size, bool transpose_copy) {
  auto c = [&](const at::Tensor& t) { return to_canonical(t, dir, transpose_copy); };
  ScanArgs a{c(x), c(lam), c(w_neg), c(w_mid), c(w_pos), 0, 0, 0, 0, dir.reverse, dir.transpose && !transpose_copy};
  a.N = x.size(0) * x.size(1);
  a.L = dir.transpose ? x.size(3) : x.size(2);
  a.M = dir.transpose ? x.size(2) : x.size(3);
  a.k = effective_chunk(chunk_size, a.L);
  return a;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validation, layout and allocation around a backend's forward kernel `kernel(args, h)`.
template <typename Kernel>
at::Tensor scan_forward(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                        const at::Tensor& w_mid, const at::Tensor& w_pos, c10::string_view direction,
                        int64_t chunk_size, bool transpose_copy, Kernel&& kernel) {
  check_inputs({x, lam, w_neg, w_mid, w_pos}, "gspn scan_fwd");
  const Direction dir = parse_direction(direction);
  const ScanArgs a = canonical_args(x, lam, w_neg, w_mid, w_pos, dir, chunk_size, transpose_copy);
  at::Tensor h = at::empty_like(a.x);
  if (h.numel() > 0) kernel(a, h);
  return from_canonical(h, x, dir, transpose_copy);
}

// The same around a backward kernel `kernel(args, grad_h, h, dx, dlam, dwn, dwm, dwp)`.
template <typename Kernel>
Grads scan_backward(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& lam,
                    const at::Tensor& w_neg, const at::Tensor& w_mid, const at::Tensor& w_pos,
                    const at::Tensor& h, c10::string_view direction, int64_t chunk_size, bool transpose_copy,
                    Kernel&& kernel) {
  check_inputs({x, lam, w_neg, w_mid, w_pos, h, grad_h}, "gspn scan_bwd");
  const Direction dir = parse_direction(direction);
  const ScanArgs a = canonical_args(x, lam, w_neg, w_mid, w_pos, dir, chunk_size, transpose_copy);
  const at::Tensor gc = to_canonical(grad_h, dir, transpose_copy), hc = to_canonical(h, dir, transpose_copy);
  at::Tensor dx = at::empty_like(a.x), dlam = at::empty_like(a.x), dwn = at::empty_like(a.x),
             dwm = at::empty_like(a.x), dwp = at::empty_like(a.x);
  if (dx.numel() > 0) kernel(a, gc, hc, dx, dlam, dwn, dwm, dwp);
  auto back = [&](const at::Tensor& t) { return from_canonical(t, x, dir, transpose_copy); };
  return {back(dx), back(dlam), back(dwn), back(dwm), back(dwp)};
}


// ---- The fused four-direction propagation (propagate_fwd / propagate_bwd) ----

// x (B, C, H, W), gates (B, K, 6, C, H, W) raw logits, merge (K, C) weights, made contiguous, with
// the geometry and the parsed directions.
struct PropagateArgs {
  at::Tensor x, gates, merge;
  int64_t B, C, H, W, K, chunk;
  std::vector<Direction> dirs;
};

// x, merge and the directions checked (gates left undefined): what the fused ops share.  x is made
// contiguous in `format` (channels-last for the CUDA propagate_proj kernels: free for NHWC inputs).
inline PropagateArgs propagate_geometry(const at::Tensor& x, const at::Tensor& merge,
                                        const std::vector<std::string>& directions, int64_t chunk_size,
                                        const char* op, at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected floating-point tensors");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = static_cast<int64_t>(directions.size());
  TORCH_CHECK(K >= 1 && K <= 4, op, ": between 1 and 4 directions, got ", K);
  TORCH_CHECK(merge.dim() == 2 && merge.size(0) == K && merge.size(1) == C, op,
              ": merge must have shape (K, C) = (", K, ", ", C, "), got ", merge.sizes());
  TORCH_CHECK(merge.scalar_type() == x.scalar_type(), op, ": merge must have the dtype of x");
  TORCH_CHECK(merge.device() == x.device(), op, ": merge must be on the device of x");
  PropagateArgs a{x.contiguous(format), at::Tensor(), merge.contiguous(), B, C, H, W, K, chunk_size <= 0 ? 0 : chunk_size, {}};
  for (const auto& d : directions) {
    a.dirs.push_back(parse_direction(d));
    for (size_t i = 0; i + 1 < a.dirs.size(); ++i) {
      TORCH_CHECK(a.dirs[i].transpose != a.dirs.back().transpose || a.dirs[i].reverse != a.dirs.back().reverse,
                  op, ": directions must be distinct, got '", d, "' twice");
    }
  }
  return a;
}

inline PropagateArgs propagate_args(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& merge,
                                    const std::vector<std::string>& directions, int64_t chunk_size,
                                    const char* op) {
  PropagateArgs a = propagate_geometry(x, merge, directions, chunk_size, op);
  TORCH_CHECK(gates.dim() == 6 && gates.size(0) == a.B && gates.size(1) == a.K && gates.size(2) == 6 &&
                  gates.size(3) == a.C && gates.size(4) == a.H && gates.size(5) == a.W,
              op, ": gates must have shape (B, K, 6, C, H, W) = (", a.B, ", ", a.K, ", 6, ", a.C, ", ", a.H, ", ",
              a.W, "), got ", gates.sizes());
  TORCH_CHECK(gates.scalar_type() == x.scalar_type(), op, ": gates must have the dtype of x");
  TORCH_CHECK(gates.device() == x.device(), op, ": gates must be on the device of x");
  a.gates = gates.contiguous();
  return a;
}

// The fused op with the gate projection (propagate_proj_*): besides x and merge, the low-rank proxy
// (B, S, H, W) and the 1x1 projection weight (K*6*C, S) and bias (K*6*C), whose row (k*6 + f)*C + c
// gives field f of direction k at channel c.  x and the proxy are made contiguous in `format`.
struct ProjArgs {
  PropagateArgs p;
  at::Tensor proxy, weight, bias;
  int64_t S;
};

inline ProjArgs proj_args(const at::Tensor& x, const at::Tensor& proxy, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& merge,
                          const std::vector<std::string>& directions, int64_t chunk_size, const char* op,
                          at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  PropagateArgs p = propagate_geometry(x, merge, directions, chunk_size, op, format);
  const int64_t R = p.K * 6 * p.C;
  TORCH_CHECK(proxy.dim() == 4 && proxy.size(0) == p.B && proxy.size(2) == p.H && proxy.size(3) == p.W, op,
              ": proxy must have shape (B, S, H, W) with (B, H, W) = (", p.B, ", ", p.H, ", ", p.W, "), got ",
              proxy.sizes());
  const int64_t S = proxy.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == R && weight.size(1) == S, op,
              ": weight must have shape (K*6*C, S) = (", R, ", ", S, "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == R, op, ": bias must have shape (K*6*C,) = (", R, ",), got ",
              bias.sizes());
  for (const at::Tensor* t : {&proxy, &weight, &bias}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": proxy, weight and bias must have the dtype of x");
    TORCH_CHECK(t->device() == x.device(), op, ": proxy, weight and bias must be on the device of x");
  }
  return {std::move(p), proxy.contiguous(format), weight.contiguous(), bias.contiguous(), S};
}

// dL/dmerge (K, C) in the dtype of x, from per-(batch, channel, direction) partial sums (B, C, K).
inline at::Tensor merge_grad(const at::Tensor& partial, at::ScalarType dtype) {
  return partial.sum(0).t().to(dtype).contiguous();
}

// Scan geometry of direction k: L lines of length M (columns for l2r/r2l) and the chunk length.
struct PlaneGeometry {
  int64_t L, M, k;
  bool columns, reverse;
};

inline PlaneGeometry plane_geometry(const PropagateArgs& a, int64_t dir) {
  const Direction& d = a.dirs[dir];
  const int64_t L = d.transpose ? a.W : a.H, M = d.transpose ? a.H : a.W;
  return {L, M, effective_chunk(a.chunk, L), d.transpose, d.reverse};
}


// ---- The fused attention of the SD-XL swap (attention_fwd / attention_bwd) ----

// q, k, v (B, H, W, E) and the proxy (B, H, W, S), channels-last token grids made contiguous; the tap
// projection weight (K*3*E, S) and bias (K*3*E) (row (k*3 + t)*E + e: tap t of direction k at channel
// e), merge (K, E), u_bias (E).
struct AttentionArgs {
  at::Tensor q, k, v, proxy, weight, bias, merge, u_bias;
  int64_t B, H, W, E, S, K, chunk;
  std::vector<Direction> dirs;

  // Scan geometry of direction i (lines are columns for l2r/r2l).
  PlaneGeometry geometry(int64_t i) const {
    const Direction& d = dirs[i];
    const int64_t L = d.transpose ? W : H, M = d.transpose ? H : W;
    return {L, M, effective_chunk(chunk, L), d.transpose, d.reverse};
  }
};

inline AttentionArgs attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& proxy, const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& merge, const at::Tensor& u_bias,
                                    const std::vector<std::string>& directions, int64_t chunk_size,
                                    const char* op) {
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, H, W, E), got ", v.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": expected floating-point tensors");
  const int64_t B = v.size(0), H = v.size(1), W = v.size(2), E = v.size(3);
  const int64_t K = static_cast<int64_t>(directions.size());
  TORCH_CHECK(K >= 1 && K <= 4, op, ": between 1 and 4 directions, got ", K);
  TORCH_CHECK(q.sizes() == v.sizes() && k.sizes() == v.sizes(), op, ": q and k must have the shape of v ",
              v.sizes());
  TORCH_CHECK(proxy.dim() == 4 && proxy.size(0) == B && proxy.size(1) == H && proxy.size(2) == W, op,
              ": proxy must have shape (B, H, W, S) with (B, H, W) = (", B, ", ", H, ", ", W, "), got ",
              proxy.sizes());
  const int64_t S = proxy.size(3), R = K * 3 * E;
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == R && weight.size(1) == S, op,
              ": weight must have shape (K*3*E, S) = (", R, ", ", S, "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == R, op, ": bias must have shape (K*3*E,) = (", R, ",)");
  TORCH_CHECK(merge.dim() == 2 && merge.size(0) == K && merge.size(1) == E, op,
              ": merge must have shape (K, E) = (", K, ", ", E, "), got ", merge.sizes());
  TORCH_CHECK(u_bias.dim() == 1 && u_bias.size(0) == E, op, ": u_bias must have shape (E,) = (", E, ",)");
  for (const at::Tensor* t : {&q, &k, &proxy, &weight, &bias, &merge, &u_bias}) {
    TORCH_CHECK(t->scalar_type() == v.scalar_type(), op, ": all tensors must have the dtype of v");
    TORCH_CHECK(t->device() == v.device(), op, ": all tensors must be on the device of v");
  }
  AttentionArgs a{q.contiguous(), k.contiguous(), v.contiguous(), proxy.contiguous(), weight.contiguous(),
                  bias.contiguous(), merge.contiguous(), u_bias.contiguous(), B, H, W, E, S, K,
                  chunk_size <= 0 ? 0 : chunk_size, {}};
  for (const auto& d : directions) {
    a.dirs.push_back(parse_direction(d));
    for (size_t i = 0; i + 1 < a.dirs.size(); ++i) {
      TORCH_CHECK(a.dirs[i].transpose != a.dirs.back().transpose || a.dirs[i].reverse != a.dirs.back().reverse,
                  op, ": directions must be distinct, got '", d, "' twice");
    }
  }
  return a;
}

}  // namespace gspn
