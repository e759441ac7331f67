// Host-side layout handling shared by the CPU and CUDA bindings.
//
// Every direction is mapped onto one canonical scan: tensors of shape (N, L, M), contiguous, the
// scan running over L (forwards or backwards) and the line axis M contiguous in memory.
//   t2b: (H, W) as is, forwards        b2t: as is, backwards
//   l2r: transposed to (W, H), forwards r2l: transposed, backwards
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

// (B, C, H, W) -> contiguous (N, L, M) for the scan.
inline at::Tensor to_canonical(const at::Tensor& t, const Direction& dir) {
  at::Tensor c = dir.transpose ? t.transpose(-1, -2) : t;
  c = c.contiguous();
  return c.view({c.size(0) * c.size(1), c.size(-2), c.size(-1)});
}

// Contiguous (N, L, M) -> contiguous (B, C, H, W) with the shape of `like`.
inline at::Tensor from_canonical(const at::Tensor& c, const at::Tensor& like, const Direction& dir) {
  if (!dir.transpose) return c.view(like.sizes());
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

// chunk_size <= 0 or >= L means one group over the whole scan axis (the global variant).
inline int64_t effective_chunk(int64_t chunk_size, int64_t L) {
  return (chunk_size <= 0 || chunk_size >= L) ? (L > 0 ? L : 1) : chunk_size;
}

// The five scan inputs in canonical layout, with the scan geometry.
struct ScanArgs {
  at::Tensor x, lam, wn, wm, wp;
  int64_t N, L, M, k;
  bool reverse;
};

inline ScanArgs canonical_args(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                               const at::Tensor& w_mid, const at::Tensor& w_pos, const Direction& dir,
                               int64_t chunk_size) {
  ScanArgs a{to_canonical(x, dir), to_canonical(lam, dir), to_canonical(w_neg, dir), to_canonical(w_mid, dir),
             to_canonical(w_pos, dir), 0, 0, 0, 0, dir.reverse};
  a.N = a.x.size(0);
  a.L = a.x.size(1);
  a.M = a.x.size(2);
  a.k = effective_chunk(chunk_size, a.L);
  return a;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validation, layout and allocation around a backend's forward kernel `kernel(args, h)`.
template <typename Kernel>
at::Tensor scan_forward(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& w_neg,
                        const at::Tensor& w_mid, const at::Tensor& w_pos, c10::string_view direction,
                        int64_t chunk_size, Kernel&& kernel) {
  check_inputs({x, lam, w_neg, w_mid, w_pos}, "gspn scan_fwd");
  const Direction dir = parse_direction(direction);
  const ScanArgs a = canonical_args(x, lam, w_neg, w_mid, w_pos, dir, chunk_size);
  at::Tensor h = at::empty_like(a.x);
  if (h.numel() > 0) kernel(a, h);
  return from_canonical(h, x, dir);
}

// The same around a backward kernel `kernel(args, grad_h, h, dx, dlam, dwn, dwm, dwp)`.
template <typename Kernel>
Grads scan_backward(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& lam,
                    const at::Tensor& w_neg, const at::Tensor& w_mid, const at::Tensor& w_pos,
                    const at::Tensor& h, c10::string_view direction, int64_t chunk_size, Kernel&& kernel) {
  check_inputs({x, lam, w_neg, w_mid, w_pos, h, grad_h}, "gspn scan_bwd");
  const Direction dir = parse_direction(direction);
  const ScanArgs a = canonical_args(x, lam, w_neg, w_mid, w_pos, dir, chunk_size);
  const at::Tensor gc = to_canonical(grad_h, dir), hc = to_canonical(h, dir);
  at::Tensor dx = at::empty_like(a.x), dlam = at::empty_like(a.x), dwn = at::empty_like(a.x),
             dwm = at::empty_like(a.x), dwp = at::empty_like(a.x);
  if (dx.numel() > 0) kernel(a, gc, hc, dx, dlam, dwn, dwm, dwp);
  return {from_canonical(dx, x, dir), from_canonical(dlam, x, dir), from_canonical(dwn, x, dir),
          from_canonical(dwm, x, dir), from_canonical(dwp, x, dir)};
}

}  // namespace gspn
