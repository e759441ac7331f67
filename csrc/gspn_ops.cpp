// The operator schemas: one definition, implemented per backend in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(gspn_lightning, m) {
  // h = scan(x, lam, w_neg, w_mid, w_pos) along `direction`; chunk_size <= 0 is the global scan.
  m.def("scan_fwd(Tensor x, Tensor lam, Tensor w_neg, Tensor w_mid, Tensor w_pos, str direction, "
        "int chunk_size) -> Tensor");
  // Gradients of the five inputs, given dL/dh and the forward output h.
  m.def("scan_bwd(Tensor grad_h, Tensor x, Tensor lam, Tensor w_neg, Tensor w_mid, Tensor w_pos, "
        "Tensor h, str direction, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
