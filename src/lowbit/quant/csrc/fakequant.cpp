// Fused fake-quant kernels for lowbit.quant.ops (CPU, float32 and float64, contiguous data).
//
// Each kernel is one pass over the data. The arithmetic repeats the torch formulas of
// ops_reference.py operation for operation (multiply by a precomputed reciprocal, round half to
// even with nearbyint, a clamp that keeps NaN), and the build disables floating-point
// contraction, so results equal the formulas bit for bit.
//
// Scale operands are small contiguous tensors indexed through a Layout: the data is a sequence of
// rows of `inner` elements; row r uses scale row r / mid, which is one value (vec false) or
// `inner` values, one per element (vec true). A per-tensor scale is one row of numel elements;
// per-output-channel scales are rows of numel / C; XNOR's beta (N, 1, H, W) is vec with mid = C.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t kGrain = 1 << 15;

struct Layout {
  int64_t numel, mid, inner;
  bool vec;
};

template <typename T>
inline T clip(T v, T lo, T hi) {  // torch.clamp: NaN stays NaN (both comparisons are false)
  return v < lo ? lo : (v > hi ? hi : v);
}

// body(i, n, si): elements [i, i + n) of one row, whose scale values start at index si (the
// same value for all n when !vec, else one each).
template <typename Body>
void for_rows(const Layout& L, const Body& body) {
  at::parallel_for(0, L.numel, kGrain, [&](int64_t b, int64_t e) {
    int64_t i = b;
    while (i < e) {
      const int64_t r = i / L.inner, off = i - r * L.inner;
      const int64_t stop = std::min(e, (r + 1) * L.inner);
      const int64_t si = (r / L.mid) * (L.vec ? L.inner : 1) + (L.vec ? off : 0);
      body(i, stop - i, si);
      i = stop;
    }
  });
}

Layout layout(const Tensor& x, int64_t mid, int64_t inner, bool vec) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "lowbit_fakequant: contiguous CPU data");
  return Layout{x.numel(), std::max<int64_t>(mid, 1), std::max<int64_t>(inner, 1), vec};
}

template <typename T>
const T* ptr(const Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == c10::CppTypeToScalarType<T>::value,
              "lowbit_fakequant: operand dtype/layout");
  return t.const_data_ptr<T>();
}

// Calls f(j, scale index) for the elements of a row: a loop the compiler vectorises in both
// cases (one scale value hoisted, or one scale value per element).
#define LOWBIT_ROW_LOOP(VEC, N, SI, BODY_SCALAR, BODY_VEC) \
  if (!(VEC)) {                                          \
    for (int64_t j = 0; j < (N); ++j) { BODY_SCALAR; }   \
  } else {                                               \
    for (int64_t j = 0; j < (N); ++j) { BODY_VEC; }      \
  }

template <typename T>
void lsq_quant_impl(const Tensor& x, const Tensor& inv, const Tensor& s, Tensor& y, T lo, T hi,
                    const Layout& L) {
  const T *xp = ptr<T>(x), *ip = ptr<T>(inv), *sp = ptr<T>(s);
  T* yp = y.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *xr = xp + i, *ir = ip + si, *sr = sp + si;
    T* yr = yp + i;
    const T iv0 = ir[0], s0 = sr[0];
    LOWBIT_ROW_LOOP(L.vec, n, si,
                    yr[j] = clip<T>(std::nearbyint(xr[j] * iv0), lo, hi) * s0,
                    yr[j] = clip<T>(std::nearbyint(xr[j] * ir[j]), lo, hi) * sr[j])
  });
}

template <typename T>
void lsq_backward_impl(const Tensor& g, const Tensor& x, const Tensor& inv, Tensor& dx,
                       Tensor& gds, T lo, T hi, const Layout& L) {
  const T *gp = ptr<T>(g), *xp = ptr<T>(x), *ip = ptr<T>(inv);
  T *dp = dx.mutable_data_ptr<T>(), *sp = gds.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *gr = gp + i, *xr = xp + i, *ir = ip + si;
    T *dr = dp + i, *sr = sp + i;
    auto one = [&](int64_t j, T iv) {
      const T q = xr[j] * iv;
      const T r = std::nearbyint(q);
      const T rc = clip<T>(r, lo, hi);
      const T inside = static_cast<T>(r == rc);
      dr[j] = gr[j] * inside;
      sr[j] = (rc - clip<T>(q, lo - 1, hi + 1) * inside) * gr[j];
    };
    const T iv0 = ir[0];
    LOWBIT_ROW_LOOP(L.vec, n, si, one(j, iv0), one(j, ir[j]))
  });
}

template <typename T>
void clipped_impl(const Tensor& x, const Tensor& inv, const Tensor& step, Tensor& y, T hi,
                  const Layout& L) {
  const T *xp = ptr<T>(x), *ip = ptr<T>(inv), *tp = ptr<T>(step);
  T* yp = y.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *xr = xp + i, *ir = ip + si, *tr = tp + si;
    T* yr = yp + i;
    const T iv0 = ir[0], t0 = tr[0];
    LOWBIT_ROW_LOOP(L.vec, n, si,
                    yr[j] = clip<T>(std::nearbyint(xr[j] * iv0), T(0), hi) * t0,
                    yr[j] = clip<T>(std::nearbyint(xr[j] * ir[j]), T(0), hi) * tr[j])
  });
}

template <typename T>
void clipped_backward_impl(const Tensor& g, const Tensor& x, const Tensor& a, Tensor& dx,
                           Tensor& gda, const Layout& L) {
  const T *gp = ptr<T>(g), *xp = ptr<T>(x), *ap = ptr<T>(a);
  T *dp = dx.mutable_data_ptr<T>(), *op = gda.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *gr = gp + i, *xr = xp + i, *ar = ap + si;
    T *dr = dp + i, *orow = op + i;
    auto one = [&](int64_t j, T av) {
      const bool above = xr[j] >= av;
      dr[j] = gr[j] * static_cast<T>(xr[j] >= T(0) && !above);
      orow[j] = gr[j] * static_cast<T>(above);
    };
    const T a0 = ar[0];
    LOWBIT_ROW_LOOP(L.vec, n, si, one(j, a0), one(j, ar[j]))
  });
}

template <typename T>
void sign_impl(const Tensor& x, const Tensor& scale, Tensor& y, const Layout& L) {
  const T *xp = ptr<T>(x), *cp = ptr<T>(scale);
  T* yp = y.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *xr = xp + i, *cr = cp + si;
    T* yr = yp + i;
    const T c0 = cr[0];
    LOWBIT_ROW_LOOP(L.vec, n, si,
                    yr[j] = c0 * (xr[j] >= T(0) ? T(1) : T(-1)),
                    yr[j] = cr[j] * (xr[j] >= T(0) ? T(1) : T(-1)))
  });
}

template <typename T>
void sign_backward_impl(const Tensor& g, const Tensor& x, const Tensor& scale, Tensor& dx,
                        const Layout& L) {
  const T *gp = ptr<T>(g), *xp = ptr<T>(x), *cp = ptr<T>(scale);
  T* dp = dx.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *gr = gp + i, *xr = xp + i, *cr = cp + si;
    T* dr = dp + i;
    const T c0 = cr[0];
    LOWBIT_ROW_LOOP(L.vec, n, si,
                    dr[j] = (gr[j] * c0) * static_cast<T>(std::abs(xr[j]) <= T(1)),
                    dr[j] = (gr[j] * cr[j]) * static_cast<T>(std::abs(xr[j]) <= T(1)))
  });
}

template <typename T>
void stochastic_impl(const Tensor& x, const Tensor& u, const Tensor& inv, const Tensor& s,
                     Tensor& y, T lo, T hi, const Layout& L) {
  const T *xp = ptr<T>(x), *up = ptr<T>(u), *ip = ptr<T>(inv), *sp = ptr<T>(s);
  T* yp = y.mutable_data_ptr<T>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const T *xr = xp + i, *ur = up + i, *ir = ip + si, *sr = sp + si;
    T* yr = yp + i;
    const T iv0 = ir[0], s0 = sr[0];
    LOWBIT_ROW_LOOP(L.vec, n, si,
                    yr[j] = s0 * clip<T>(std::floor(xr[j] * iv0 + ur[j]), lo, hi),
                    yr[j] = sr[j] * clip<T>(std::floor(xr[j] * ir[j] + ur[j]), lo, hi))
  });
}

// PyTorch's per-tensor affine fake quantisation (fake_quantize_per_tensor_affine on CPU):
// q = zp + nearbyint(x * inv) (inv = 1 / scale in float), clamped as fmin/fmax clamp (NaN goes
// to qmin, as there), output (q - zp) * scale; the gradient mask is qmin <= q <= qmax before the clamp.
void affine_impl(const Tensor& x, const Tensor& inv, const Tensor& scale, const Tensor& zp,
                 Tensor& y, float qmin, float qmax, const Layout& L) {
  const float *xp = ptr<float>(x), *ip = ptr<float>(inv), *sp = ptr<float>(scale),
              *zpp = ptr<float>(zp);
  float* yp = y.mutable_data_ptr<float>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const float iv = ip[si], sc = sp[si], z = zpp[si];
    const float *xr = xp + i;
    float* yr = yp + i;
    for (int64_t j = 0; j < n; ++j) {
      float q = z + std::nearbyint(xr[j] * iv);
      q = q >= qmin ? q : qmin;  // std::fmax(q, qmin): NaN becomes qmin
      q = q <= qmax ? q : qmax;
      yr[j] = (q - z) * sc;
    }
  });
}

void affine_backward_impl(const Tensor& g, const Tensor& x, const Tensor& inv, const Tensor& zp,
                          Tensor& dx, float qmin, float qmax, const Layout& L) {
  const float *gp = ptr<float>(g), *xp = ptr<float>(x), *ip = ptr<float>(inv),
              *zpp = ptr<float>(zp);
  float* dp = dx.mutable_data_ptr<float>();
  for_rows(L, [&](int64_t i, int64_t n, int64_t si) {
    const float iv = ip[si], z = zpp[si];
    const float *gr = gp + i, *xr = xp + i;
    float* dr = dp + i;
    for (int64_t j = 0; j < n; ++j) {
      const float q = z + std::nearbyint(xr[j] * iv);
      dr[j] = gr[j] * static_cast<float>((qmin <= q) & (q <= qmax));
    }
  });
}

// ------------------------------------------------------------------------------ entry points
Tensor affine_quant(const Tensor& x, const Tensor& inv, const Tensor& scale, const Tensor& zp,
                    int64_t qmin, int64_t qmax) {
  const Layout L = layout(x, 1, x.numel(), false);
  Tensor y = at::empty_like(x);
  affine_impl(x, inv, scale, zp, y, float(qmin), float(qmax), L);
  return y;
}

Tensor affine_backward(const Tensor& g, const Tensor& x, const Tensor& inv, const Tensor& zp,
                       int64_t qmin, int64_t qmax) {
  const Layout L = layout(x, 1, x.numel(), false);
  Tensor dx = at::empty_like(x);
  affine_backward_impl(g, x, inv, zp, dx, float(qmin), float(qmax), L);
  return dx;
}

Tensor lsq_quant(const Tensor& x, const Tensor& inv, const Tensor& s, int64_t qn, int64_t qp,
                 int64_t mid, int64_t inner, bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lsq_quant", [&] {
    lsq_quant_impl<scalar_t>(x, inv, s, y, -scalar_t(qn), scalar_t(qp), L);
  });
  return y;
}

std::vector<Tensor> lsq_quant_backward(const Tensor& g, const Tensor& x, const Tensor& inv,
                                       int64_t qn, int64_t qp, int64_t mid, int64_t inner,
                                       bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor dx = at::empty_like(x), gds = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lsq_quant_backward", [&] {
    lsq_backward_impl<scalar_t>(g, x, inv, dx, gds, -scalar_t(qn), scalar_t(qp), L);
  });
  return {dx, gds};
}

Tensor clipped_uniform(const Tensor& x, const Tensor& inv, const Tensor& step, int64_t n,
                       int64_t mid, int64_t inner, bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clipped_uniform", [&] {
    clipped_impl<scalar_t>(x, inv, step, y, scalar_t(n), L);
  });
  return y;
}

std::vector<Tensor> clipped_backward(const Tensor& g, const Tensor& x, const Tensor& a,
                                     int64_t mid, int64_t inner, bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor dx = at::empty_like(x), gda = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clipped_backward", [&] {
    clipped_backward_impl<scalar_t>(g, x, a, dx, gda, L);
  });
  return {dx, gda};
}

Tensor sign_ste(const Tensor& x, const Tensor& scale, int64_t mid, int64_t inner, bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sign_ste", [&] {
    sign_impl<scalar_t>(x, scale, y, L);
  });
  return y;
}

Tensor sign_backward(const Tensor& g, const Tensor& x, const Tensor& scale, int64_t mid,
                     int64_t inner, bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sign_backward", [&] {
    sign_backward_impl<scalar_t>(g, x, scale, dx, L);
  });
  return dx;
}

Tensor stochastic_round(const Tensor& x, const Tensor& u, const Tensor& inv, const Tensor& s,
                        int64_t qn, int64_t qp, int64_t mid, int64_t inner, bool vec) {
  const Layout L = layout(x, mid, inner, vec);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stochastic_round", [&] {
    stochastic_impl<scalar_t>(x, u, inv, s, y, -scalar_t(qn), scalar_t(qp), L);
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_quant", &lsq_quant);
  m.def("lsq_quant_backward", &lsq_quant_backward);
  m.def("clipped_uniform", &clipped_uniform);
  m.def("clipped_backward", &clipped_backward);
  m.def("sign_ste", &sign_ste);
  m.def("sign_backward", &sign_backward);
  m.def("stochastic_round", &stochastic_round);
  m.def("affine_quant", &affine_quant);
  m.def("affine_backward", &affine_backward);
}
