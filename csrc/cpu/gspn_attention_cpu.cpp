// CPU kernel of the fused GSPN attention of the SD-XL swap (attention_fwd / attention_bwd).
//
// The inputs are channels-last token grids (B, H, W, E), so a *unit* (a group of `lanes` channels of
// one batch element, one channel per vector lane, as in gspn_propagate_proj_cpu.cpp) reads a pixel's
// lanes from one contiguous run.  A task loads the unit's v, sigmoid(k) and q + u_bias as [pixel]
// vectors once, then runs every direction over them: the three tap logits of a pixel are projected on
// the fly from the proxy of its batch element (converted once per b, [pixel][S] zero-padded to a
// multiple of 4) and normalised once, and drive both states of the lane, the numerator (input v) and
// the denominator (input 1).  Their merged sums are kept per pixel; the output sigmoid(q + u) num /
// max(den, tiny) is written channels-last.  All directions walk the image layout (a column direction's
// pixels are a row apart).  Lanes past E are padding (zero inputs and weights, outputs dropped).  The
// math is gspn_step.h's (attention_h, attention_out, attention_backward_step), shared with CUDA.
//
// The backward recomputes the forward sums (all directions), turns dL/dout into dL/dnum, dL/dden and
// dL/dq per pixel, then per direction recomputes one group (chunk) of lines at a time, keeping both
// states and the taps, walks it backwards and reduces the tap logits' gradients into dL/dweight,
// dL/dbias (per lane) and dL/dproxy (summed over the lanes per pixel, per batch element).  Units are
// split into one contiguous range per task with its own partial sums, added in task order afterwards,
// so results do not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../gspn_layout.h"
#include "../gspn_step.h"
#include "gspn_propagate_common.h"

namespace gspn {
namespace {

constexpr int kTaps = 3;

// Pixel (line s, position j) of a direction in the image layout.
struct AttnGeometry {
  PlaneGeometry g;
  int64_t W;
  int64_t pixel(int64_t s, int64_t j) const { return g.columns ? j * W + s : s * W + j; }
};

template <typename scalar_t>
struct AttnInputs {
  const scalar_t *q, *k, *v, *proxy, *weight, *bias, *merge, *ub;
  explicit AttnInputs(const AttentionArgs& a)
      : q(a.q.const_data_ptr<scalar_t>()),
        k(a.k.const_data_ptr<scalar_t>()),
        v(a.v.const_data_ptr<scalar_t>()),
        proxy(a.proxy.const_data_ptr<scalar_t>()),
        weight(a.weight.const_data_ptr<scalar_t>()),
        bias(a.bias.const_data_ptr<scalar_t>()),
        merge(a.merge.const_data_ptr<scalar_t>()),
        ub(a.u_bias.const_data_ptr<scalar_t>()) {}
};

// Thread-local buffers of the attention op.
template <typename acc_t>
struct AttnWorkspace {
  using V = typename Vec<acc_t>::type;
  static constexpr int64_t lanes = Vec<acc_t>::lanes;
  int64_t HW = 0, S = 0, Sp = 0, E = 0, b = -1;
  std::vector<acc_t> p;                      // proxy of batch element b, [HW][Sp]
  std::vector<V> v, lam, dlam_ds, gq, g;     // the unit's v, sigmoid(k) (and its derivative), q + u, dL/dout
  std::vector<V> num, den;                   // merged numerator and denominator sums [HW]
  std::vector<V> dnum, dden, dv, dlam;       // their gradients; dL/dv, dL/dlam accumulated over directions
  std::vector<V> w, bias, merge;             // projection rows [K][Sp][3], biases [K][3], merge weights [K]
  std::vector<V> lines;                      // padded lines: previous and current of both states (forward)
  std::vector<V> adj, zero;                  // the same for the adjoints (backward); a zero line
  std::vector<Taps<V>> ztaps;                // a zero line of taps
  std::vector<V> hn, hd;                     // a group's states (padded lines)
  std::vector<Taps<V>> taps;                 // a group's taps (padded lines)
  std::vector<V> dg;                         // a group's tap logit gradients [pixel][3]
  std::vector<int64_t> qs;                   // a group's pixels, in group order
  std::vector<acc_t> dps;                    // dL/dproxy of b summed over the lanes of its units [HW][Sp]
  std::vector<V> dwb;                        // dL/dweight [Sp][3], dL/dbias [3] per lane

  void init(const AttentionArgs& a, bool backward) {
    HW = a.H * a.W;
    S = a.S;
    Sp = (S + 3) / 4 * 4;
    E = a.E;
    p.assign(HW * Sp, acc_t(0));
    for (auto* t : {&v, &lam, &gq, &num, &den}) t->resize(HW);
    w.resize(a.K * Sp * kTaps);
    bias.resize(a.K * kTaps);
    merge.resize(a.K);
    const int64_t side = std::max(a.H, a.W);
    lines.assign(4 * (side + 2), V{});
    if (!backward) return;
    for (auto* t : {&dlam_ds, &g, &dnum, &dden, &dv, &dlam}) t->resize(HW);
    adj.assign(4 * (side + 2), V{});
    zero.assign(side + 2, V{});
    ztaps.assign(side + 2, Taps<V>{});
    hn.resize(HW + 2 * side);
    hd.resize(HW + 2 * side);
    taps.resize(HW + 2 * side);
    dg.resize(HW * kTaps);
    qs.resize(HW);
    dps.assign(HW * Sp, acc_t(0));
    dwb.resize((Sp + 1) * kTaps);
  }

  // Convert (and pad to Sp) the proxy of batch element `bb` unless it is the current one.
  template <typename scalar_t>
  void load_proxy(const scalar_t* proxy, int64_t bb) {
    if (bb == b) return;
    b = bb;
    const scalar_t* src = proxy + bb * HW * S;
    for (int64_t q = 0; q < HW; ++q) {
      for (int64_t s = 0; s < S; ++s) p[q * Sp + s] = static_cast<acc_t>(src[q * S + s]);
    }
  }

  // The projection rows, biases and merge weights of channels [c0, c0 + nc), zero in the lanes past nc.
  template <typename scalar_t>
  void load_rows(const AttnInputs<scalar_t>& in, const AttentionArgs& a, int64_t c0, int64_t nc) {
    std::fill(w.begin(), w.end(), V{});
    std::fill(bias.begin(), bias.end(), V{});
    std::fill(merge.begin(), merge.end(), V{});
    for (int64_t k = 0; k < a.K; ++k) {
      for (int64_t l = 0; l < nc; ++l) {
        const int64_t c = c0 + l;
        merge[k][l] = static_cast<acc_t>(in.merge[k * E + c]);
        for (int t = 0; t < kTaps; ++t) {
          const int64_t r = (k * kTaps + t) * E + c;
          bias[k * kTaps + t][l] = static_cast<acc_t>(in.bias[r]);
          for (int64_t s = 0; s < S; ++s) w[(k * Sp + s) * kTaps + t][l] = static_cast<acc_t>(in.weight[r * S + s]);
        }
      }
    }
  }

  // dst[q][l] = src[(b HW + q) E + c0 + l] (+ add[c0 + l]), zero in the lanes past nc.
  template <typename scalar_t>
  void gather(const scalar_t* src, int64_t c0, int64_t nc, std::vector<V>& dst, const scalar_t* add = nullptr) const {
    const scalar_t* base = src + b * HW * E + c0;
    V extra{};
    if (add != nullptr) {
      for (int64_t l = 0; l < nc; ++l) extra[l] = static_cast<acc_t>(add[c0 + l]);
    }
    for (int64_t q = 0; q < HW; ++q) {
      V t{};
      const scalar_t* s = base + q * E;
      for (int64_t l = 0; l < nc; ++l) t[l] = static_cast<acc_t>(s[l]);
      dst[q] = t + extra;
    }
  }

  // dst[(b HW + q) E + c0 + l] = src[q][l] for the first nc lanes.
  template <typename scalar_t>
  void scatter(const std::vector<V>& src, int64_t c0, int64_t nc, scalar_t* dst) const {
    scalar_t* base = dst + b * HW * E + c0;
    for (int64_t q = 0; q < HW; ++q) {
      scalar_t* d = base + q * E;
      for (int64_t l = 0; l < nc; ++l) d[l] = static_cast<scalar_t>(src[q][l]);
    }
  }

  // A new unit: v, sigmoid(k) (and its derivative), q + u_bias (and dL/dout), the sums zeroed.
  template <typename scalar_t>
  void load_unit(const AttnInputs<scalar_t>& in, const scalar_t* gy, int64_t c0, int64_t nc) {
    gather(in.v, c0, nc, v);
    gather(in.k, c0, nc, lam);
    gather(in.q, c0, nc, gq, in.ub);
    const bool backward = gy != nullptr;
    for (int64_t q = 0; q < HW; ++q) {
      const Sigmoid<V> s = sigmoid_and_grad<V>(lam[q]);
      lam[q] = s.s;
      if (backward) dlam_ds[q] = s.ds;
    }
    std::fill(num.begin(), num.end(), V{});
    std::fill(den.begin(), den.end(), V{});
    if (!backward) return;
    gather(gy, c0, nc, g);
    std::fill(dv.begin(), dv.end(), V{});
    std::fill(dlam.begin(), dlam.end(), V{});
  }
};

// Forward of direction k over the unit: m hn and m hd added to ws.num and ws.den.
template <typename acc_t>
void attn_forward(const AttnGeometry& lg, int64_t k, AttnWorkspace<acc_t>& ws) {
  using V = typename Vec<acc_t>::type;
  const int64_t M = lg.g.M, P2 = M + 2, Sp = ws.Sp;
  const V m = ws.merge[k];
  const V *w = ws.w.data() + k * Sp * kTaps, *bias = ws.bias.data() + k * kTaps;
  const acc_t* P = ws.p.data();
  const V *X = ws.v.data(), *LAM = ws.lam.data();
  V *NUM = ws.num.data(), *DEN = ws.den.data();
  V* pn = ws.lines.data() + 1;
  V* cn = pn + P2;
  V* pd = cn + P2;
  V* cd = pd + P2;
  pn[-1] = pn[M] = cn[-1] = cn[M] = pd[-1] = pd[M] = cd[-1] = cd[M] = V{};
  for (int64_t grp = 0; grp < num_groups(lg.g.L, lg.g.k); ++grp) {
    const int64_t s0 = group_begin(grp, lg.g.k), s1 = group_end(grp, lg.g.k, lg.g.L);
    for (int64_t step = 0; step < s1 - s0; ++step) {
      const int64_t s = line_at(step, s0, s1, lg.g.reverse);
      const bool first = step == 0;
      for_line(M, [&](auto neg, auto pos, int64_t j) {
        const int64_t q = lg.pixel(s, j);
        Taps<V> t{};
        if (!first) {
          V g[kTaps];
          project_fields<kTaps>(w, bias, P + q * Sp, Sp, g);
          t = normalize_taps<V>(g[0], g[1], g[2], neg, pos);
        }
        V hn, hd;
        attention_h<V>(X[q], LAM[q], t, pn[j - 1], pn[j], pn[j + 1], pd[j - 1], pd[j], pd[j + 1], first, hn, hd);
        cn[j] = hn;
        cd[j] = hd;
        NUM[q] += m * hn;
        DEN[q] += m * hd;
      });
      std::swap(pn, cn);
      std::swap(pd, cd);
    }
  }
}


// Backward of direction k over the unit (ws.dnum, ws.dden set): adds its shares of dL/dv, dL/dlam to
// ws.dv, ws.dlam and its dL/dproxy to ws.dps, sets ws.dwb to its dL/dweight, dL/dbias per lane and
// returns dL/dmerge per lane.
template <typename acc_t>
typename Vec<acc_t>::type attn_backward(const AttnGeometry& lg, int64_t k, AttnWorkspace<acc_t>& ws) {
  using V = typename Vec<acc_t>::type;
  const int64_t M = lg.g.M, P2 = M + 2, Sp = ws.Sp;
  const V m = ws.merge[k];
  const V *w = ws.w.data() + k * Sp * kTaps, *bias = ws.bias.data() + k * kTaps;
  const acc_t* P = ws.p.data();
  const V *X = ws.v.data(), *LAM = ws.lam.data(), *DN = ws.dnum.data(), *DD = ws.dden.data();
  V *DV = ws.dv.data(), *DL = ws.dlam.data(), *dg = ws.dg.data();
  int64_t* qs = ws.qs.data();
  auto nline = [&](int64_t step) { return ws.hn.data() + step * P2 + 1; };
  auto dline = [&](int64_t step) { return ws.hd.data() + step * P2 + 1; };
  auto tline = [&](int64_t step) { return ws.taps.data() + step * P2 + 1; };
  const V* zero = ws.zero.data() + 1;
  const Taps<V>* ztaps = ws.ztaps.data() + 1;
  for (int64_t i = 0; i < lg.g.k; ++i) {  // the pads stay 0
    nline(i)[-1] = nline(i)[M] = dline(i)[-1] = dline(i)[M] = V{};
    tline(i)[-1] = tline(i)[M] = Taps<V>{};
  }
  std::fill(ws.dwb.begin(), ws.dwb.end(), V{});
  V dm{};
  for (int64_t grp = 0; grp < num_groups(lg.g.L, lg.g.k); ++grp) {
    const int64_t s0 = group_begin(grp, lg.g.k), s1 = group_end(grp, lg.g.k, lg.g.L), len = s1 - s0;
    // recompute the group's states and taps
    for (int64_t step = 0; step < len; ++step) {
      const int64_t s = line_at(step, s0, s1, lg.g.reverse);
      const bool first = step == 0;
      V *hn = nline(step), *hd = dline(step);
      const V* pn = first ? zero : nline(step - 1);
      const V* pd = first ? zero : dline(step - 1);
      Taps<V>* tc = tline(step);
      for_line(M, [&](auto neg, auto pos, int64_t j) {
        const int64_t q = lg.pixel(s, j);
        qs[step * M + j] = q;
        Taps<V> t{};
        if (!first) {
          V g[kTaps];
          project_fields<kTaps>(w, bias, P + q * Sp, Sp, g);
          t = normalize_taps<V>(g[0], g[1], g[2], neg, pos);
        }
        tc[j] = t;
        attention_h<V>(X[q], LAM[q], t, pn[j - 1], pn[j], pn[j + 1], pd[j - 1], pd[j], pd[j + 1], first, hn[j],
                       hd[j]);
      });
    }
    // walk it backwards; the next line's adjoints are in (ann, adn), 0 after the last line
    V* ann = ws.adj.data() + 1;
    V* anc = ann + P2;
    V* adn = anc + P2;
    V* adc = adn + P2;
    std::fill(ws.adj.begin(), ws.adj.begin() + 4 * P2, V{});
    for (int64_t step = len - 1; step >= 0; --step) {
      const bool first = step == 0;
      const V *hn = nline(step), *hd = dline(step);
      const V* pn = first ? zero : nline(step - 1);
      const V* pd = first ? zero : dline(step - 1);
      const Taps<V>* tc = tline(step);
      const Taps<V>* tn = step + 1 < len ? tline(step + 1) : ztaps;
      V dml{};  // this line's part of dL/dm (summed per line: short chains)
      for (int64_t j = 0; j < M; ++j) {
        const int64_t i = step * M + j, q = qs[i];
        const AttentionGrads<V> r = attention_backward_step<V>(
            DN[q], DD[q], m, X[q], LAM[q], tc[j], hn[j], hd[j], pn[j - 1], pn[j], pn[j + 1], pd[j - 1], pd[j],
            pd[j + 1], tn[j + 1].wn, ann[j + 1], adn[j + 1], tn[j].wm, ann[j], adn[j], tn[j - 1].wp, ann[j - 1],
            adn[j - 1], first);
        anc[j] = r.an;
        adc[j] = r.ad;
        DV[q] += r.dv;
        DL[q] += r.dlam;
        dml += r.dm;
        V* d = dg + i * kTaps;
        d[0] = r.dgn;
        d[1] = r.dgm;
        d[2] = r.dgp;
      }
      dm += dml;
      std::swap(ann, anc);
      std::swap(adn, adc);
    }
    // the adjoint of the projection: dL/dproxy (summed over the lanes), dL/dweight and dL/dbias (per
    // lane, add_projection_grads)
    const int64_t n = len * M;
    for (int64_t i = 0; i < n; ++i) {
      const V* d = dg + i * kTaps;
      acc_t* dp = ws.dps.data() + qs[i] * Sp;
      for (int64_t s = 0; s < Sp; ++s) {
        const V* wr = w + s * kTaps;
        const V v = wr[0] * d[0] + (wr[1] * d[1] + wr[2] * d[2]);
        dp[s] += tree_sum<acc_t, kVecBytes>(&v);
      }
    }
    add_projection_grads<kTaps>(ws.dwb.data(), dg, P, qs, n, Sp);
  }
  return dm;
}

template <typename acc_t>
acc_t tiny_of(at::ScalarType t) {
  // the reference divides by den.clamp_min(finfo(dtype).tiny) in the inputs' dtype
  return t == at::kDouble ? static_cast<acc_t>(std::numeric_limits<double>::min())
                          : static_cast<acc_t>(std::numeric_limits<float>::min());
}

template <typename scalar_t>
void attention_forward_cpu(const AttentionArgs& a, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t NL = Vec<acc_t>::lanes;
  const AttnInputs<scalar_t> in(a);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t HW = a.H * a.W, G = (a.E + NL - 1) / NL, U = a.B * G;
  const V tiny = V{} + tiny_of<acc_t>(a.v.scalar_type());
  const int64_t grain = parallel_grain(HW * a.K * NL * (1 + a.S / 4));
  at::parallel_for(0, U, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    AttnWorkspace<acc_t> ws;
    ws.init(a, /*backward=*/false);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / G, c0 = (u % G) * NL, nc = std::min(NL, a.E - c0);
      ws.load_proxy(in.proxy, b);
      ws.load_rows(in, a, c0, nc);
      ws.load_unit(in, static_cast<const scalar_t*>(nullptr), c0, nc);
      for (int64_t k = 0; k < a.K; ++k) attn_forward(AttnGeometry{a.geometry(k), a.W}, k, ws);
      for (int64_t q = 0; q < HW; ++q) ws.num[q] = attention_out<V>(ws.gq[q], ws.num[q], ws.den[q], tiny);
      ws.scatter(ws.num, c0, nc, o);
    }
  });
}

struct AttnGrads {
  at::Tensor dq, dk, dv, dproxy, dweight, dbias, dmerge, dub;
};

template <typename scalar_t>
void attention_backward_cpu(const AttentionArgs& a, const at::Tensor& grad_out, AttnGrads& gr, at::Tensor& dm_partial,
                            at::Tensor& dub_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t NL = Vec<acc_t>::lanes;
  const AttnInputs<scalar_t> in(a);
  const scalar_t* gy = grad_out.const_data_ptr<scalar_t>();
  scalar_t *dqo = gr.dq.mutable_data_ptr<scalar_t>(), *dko = gr.dk.mutable_data_ptr<scalar_t>(),
           *dvo = gr.dv.mutable_data_ptr<scalar_t>();
  acc_t* dmo = dm_partial.mutable_data_ptr<acc_t>();
  acc_t* dubo = dub_partial.mutable_data_ptr<acc_t>();
  const int64_t HW = a.H * a.W, S = a.S, E = a.E, R = a.K * kTaps * E;
  const int64_t G = (E + NL - 1) / NL, U = a.B * G;
  const V tiny = V{} + tiny_of<acc_t>(a.v.scalar_type());
  const int64_t grain = parallel_grain(3 * HW * a.K * NL * (1 + S / 4));
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (U + grain - 1) / grain));
  auto task_begin = [&](int64_t t) { return U * t / tasks; };
  const auto acc_opts = a.v.options().dtype(at::toOpMathType(a.v.scalar_type()));
  at::Tensor dwb = at::zeros({tasks, R * (S + 1)}, acc_opts);
  std::vector<at::Tensor> dprox(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t u0 = task_begin(t), u1 = task_begin(t + 1);
    const int64_t nb = u1 > u0 ? (u1 - 1) / G - u0 / G + 1 : 0;
    dprox[t] = at::zeros({nb, HW, S}, acc_opts);
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    const FlushDenormals ftz;
    AttnWorkspace<acc_t> ws;
    ws.init(a, /*backward=*/true);
    const int64_t Sp = ws.Sp;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = task_begin(t), u1 = task_begin(t + 1), b0 = u0 / G;
      acc_t* dw = dwb[t].mutable_data_ptr<acc_t>();
      acc_t* db = dw + R * S;
      acc_t* dp = dprox[t].mutable_data_ptr<acc_t>();
      auto flush = [&]() {  // the dL/dproxy sums of the current batch element added into place
        if (ws.b < 0) return;
        acc_t* dst = dp + (ws.b - b0) * HW * S;
        for (int64_t q = 0; q < HW; ++q) {
          for (int64_t s = 0; s < S; ++s) dst[q * S + s] += ws.dps[q * Sp + s];
        }
        std::fill(ws.dps.begin(), ws.dps.end(), acc_t(0));
      };
      ws.b = -1;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / G, c0 = (u % G) * NL, nc = std::min(NL, E - c0);
        if (b != ws.b) flush();
        ws.load_proxy(in.proxy, b);
        ws.load_rows(in, a, c0, nc);
        ws.load_unit(in, gy, c0, nc);
        for (int64_t k = 0; k < a.K; ++k) attn_forward(AttnGeometry{a.geometry(k), a.W}, k, ws);
        V dub{};
        for (int64_t q = 0; q < HW; ++q) {
          const AttentionOutGrads<V> og = attention_out_backward<V>(ws.g[q], ws.gq[q], ws.num[q], ws.den[q], tiny);
          ws.dnum[q] = og.dnum;
          ws.dden[q] = og.dden;
          ws.gq[q] = og.dgq;  // dL/dq from here on
          dub += og.dgq;
        }
        ws.scatter(ws.gq, c0, nc, dqo);
        for (int64_t l = 0; l < nc; ++l) dubo[b * E + c0 + l] = dub[l];
        for (int64_t k = 0; k < a.K; ++k) {
          const V dm = attn_backward(AttnGeometry{a.geometry(k), a.W}, k, ws);
          for (int64_t l = 0; l < nc; ++l) {
            const int64_t c = c0 + l;
            dmo[(b * E + c) * a.K + k] = dm[l];
            for (int tp = 0; tp < kTaps; ++tp) {
              const int64_t r = (k * kTaps + tp) * E + c;
              db[r] += ws.dwb[Sp * kTaps + tp][l];
              for (int64_t s = 0; s < S; ++s) dw[r * S + s] += ws.dwb[s * kTaps + tp][l];
            }
          }
        }
        for (int64_t q = 0; q < HW; ++q) ws.dlam[q] *= ws.dlam_ds[q];  // dL/dk
        ws.scatter(ws.dv, c0, nc, dvo);
        ws.scatter(ws.dlam, c0, nc, dko);
      }
      flush();
    }
  });
  // reduce the partials in task order
  at::Tensor dwb_sum = dwb.sum(0);
  gr.dweight.copy_(dwb_sum.narrow(0, 0, R * S).view({R, S}));
  gr.dbias.copy_(dwb_sum.narrow(0, R * S, R));
  at::Tensor dp_acc = at::zeros({a.B, HW, S}, acc_opts);
  for (int64_t t = 0; t < tasks; ++t) {
    if (dprox[t].size(0) > 0) dp_acc.narrow(0, task_begin(t) / G, dprox[t].size(0)).add_(dprox[t]);
  }
  gr.dproxy.copy_(dp_acc.view(gr.dproxy.sizes()));
}

at::Tensor attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& proxy,
                             const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& merge,
                             const at::Tensor& u_bias, std::vector<std::string> directions, int64_t chunk_size) {
  const AttentionArgs a =
      attention_args(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, "gspn attention_fwd");
  at::Tensor out = at::empty_like(a.v);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gspn_attention_fwd_cpu",
                                  [&] { attention_forward_cpu<scalar_t>(a, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& proxy, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& merge,
                  const at::Tensor& u_bias, std::vector<std::string> directions, int64_t chunk_size) {
  const AttentionArgs a =
      attention_args(q, k, v, proxy, weight, bias, merge, u_bias, directions, chunk_size, "gspn attention_bwd");
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.scalar_type() == v.scalar_type(),
              "gspn attention_bwd: grad_out must have the shape and dtype of v");
  const at::Tensor gy = grad_out.contiguous();
  AttnGrads gr{at::zeros_like(a.v),      at::zeros_like(a.v),    at::zeros_like(a.v),
               at::zeros_like(a.proxy),  at::zeros_like(a.weight), at::zeros_like(a.bias),
               at::Tensor(),             at::Tensor()};
  const auto acc_opts = v.options().dtype(at::toOpMathType(v.scalar_type()));
  at::Tensor dm_partial = at::zeros({a.B, a.E, a.K}, acc_opts), dub_partial = at::zeros({a.B, a.E}, acc_opts);
  if (v.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gspn_attention_bwd_cpu",
                                    [&] { attention_backward_cpu<scalar_t>(a, gy, gr, dm_partial, dub_partial); });
  }
  return {gr.dq,    gr.dk, gr.dv, gr.dproxy, gr.dweight, gr.dbias, merge_grad(dm_partial, v.scalar_type()),
          dub_partial.sum(0).to(v.scalar_type())};
}

}  // namespace
}  // namespace gspn

TORCH_LIBRARY_IMPL(gspn_lightning, CPU, m) {
  m.impl("attention_fwd", &gspn::attention_fwd_cpu);
  m.impl("attention_bwd", &gspn::attention_bwd_cpu);
}
