// The forward row passes of the compiled CPU backend (inductor_backend.py), hand-vectorised with ATen's
// at::vec (AVX512, AVX2 or the portable fallback, chosen when the module is built).
//
// For every row of the (N, V) logits and every base B of the loss (S: x = s, T: x = t, U: x = 0, CE: the
// cross-entropy's softmax, x = s over every finite s), the columns (m, c, Z, S1, S2, n) of
// `inductor_backend._passes`:
//
//   m  = max of x over the base's entries (0 for U),
//   c  = the centre: d = s - t at the mode (the mean over ties), or the mean of d for U and without
//        second moments (the KL divergences),
//   p  = exp2((x - m) * scale) (1 for U),  e = d - c,
//   Z  = sum p,  S1 = sum p e,  S2 = sum p e^2 (0 without second moments, and for CE, which needs only
//        m and Z),  n = the number of entries where s and t are both finite.
//
// Why not Inductor: written as tensor expressions these passes compile to one loop nest per call, but
// each masked sum becomes a cascade-summation helper kept in memory and each `where` a blend of
// converted masks; the forward then took about twice as long as the same passes written here (2 cores,
// fp32, N = 2048, V = 32000: "ss" passes 59 -> 36 ms).
//
// Each base sweeps the row up to three times (maximum, centre, moments); the row (2V values) stays in the
// core's L2 cache between sweeps, so only the first sweep reads memory. Sums are kept in fp32 vector
// registers over blocks of BLOCK entries (BLOCK / W terms per lane) and added across blocks in double, so
// they are as precise as a pairwise sum. The validity test follows the contract: -inf excluded, NaN kept
// (it propagates through the maximum and the exponentials into Z).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr int64_t BLOCK = 1024;  // a multiple of W: only a row's last block has a partial vector
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

enum Base : int64_t { S = 0, T = 1, U = 2, CE = 3 };  // as in inductor_backend.py
enum Column : int64_t { M, CENTRE, Z, S1, S2, COUNT, COLUMNS };

template <typename X>
inline Vec load_vec(const X* p) {
  if constexpr (std::is_same_v<X, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<X>(p, out);
    return out;
  }
}

inline double hsum(const Vec& v) {
  alignas(64) float lanes[W];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < W; ++i) total += lanes[i];
  return total;
}

inline float hmax(const Vec& v) {  // NaN wins, as in at::vec::maximum
  alignas(64) float lanes[W];
  v.store(lanes);
  float top = NEG_INF;
  for (int64_t i = 0; i < W; ++i) top = (std::isnan(lanes[i]) || lanes[i] > top) ? lanes[i] : top;
  return top;
}

// One row of s and t, read as fp32 vectors of W entries.
template <typename XS, typename XT>
struct Row {
  const XS* s;
  const XT* t;
  int64_t V;

  // f(s, t) on every W entries of [begin, end); a partial vector at the row's end is padded with -inf,
  // which no base counts as an entry.
  template <typename F>
  inline void sweep(int64_t begin, int64_t end, F&& f) const {
    int64_t j = begin;
    for (; j + W <= end; j += W) f(load_vec(s + j), load_vec(t + j));
    if (j < end) {
      XS ps[W];
      XT pt[W];
      for (int64_t i = 0; i < W; ++i) {
        ps[i] = j + i < end ? s[j + i] : XS(NEG_INF);
        pt[i] = j + i < end ? t[j + i] : XT(NEG_INF);
      }
      f(load_vec(ps), load_vec(pt));
    }
  }

  // The sums of K vector expressions over the row, in fp32 within each block and in double across.
  template <int K, typename F>
  inline std::array<double, K> sums(F&& f) const {
    std::array<double, K> total{};
    for (int64_t b = 0; b < V; b += BLOCK) {
      std::array<Vec, K> acc;
      acc.fill(Vec(0.f));
      sweep(b, std::min(V, b + BLOCK), [&](const Vec& a, const Vec& c) { f(a, c, acc); });
      for (int k = 0; k < K; ++k) total[k] += hsum(acc[k]);
    }
    return total;
  }
};

// The entries of a base: both logits finite, or for CE the student's.
template <int64_t B>
inline Vec entries(const Vec& s, const Vec& t) {
  const Vec inf(NEG_INF);
  if constexpr (B == CE) {
    return s != inf;
  } else {
    return (s != inf) & (t != inf);
  }
}

template <int64_t B>
inline Vec logits(const Vec& s, const Vec& t) {
  if constexpr (B == T) {
    return t;
  } else {
    return s;
  }
}

// A softmax base (S, T or CE): its maximum, centre and moments, written to out[COLUMNS].
template <int64_t B, bool SECOND, typename XS, typename XT>
void softmax_base(const Row<XS, XT>& row, float scale, double mean_d, float count, float* out) {
  Vec top(NEG_INF);
  row.sweep(0, row.V, [&](const Vec& s, const Vec& t) {
    top = at::vec::maximum(top, Vec::blendv(Vec(NEG_INF), logits<B>(s, t), entries<B>(s, t)));
  });
  const float m = hmax(top);
  const float m_safe = m == NEG_INF ? 0.f : m;  // a row without entries: every p is masked to 0
  const Vec shift(m_safe * scale), step(scale), one(1.f);
  float centre = static_cast<float>(mean_d);
  if constexpr (B != CE && SECOND) {  // d at the mode, averaged over ties
    const Vec mode(m);
    auto at_mode = row.template sums<2>([&](const Vec& s, const Vec& t, std::array<Vec, 2>& acc) {
      const Vec hit = entries<B>(s, t) & (logits<B>(s, t) == mode);
      acc[0] = acc[0] + ((s - t) & hit);
      acc[1] = acc[1] + (one & hit);
    });
    centre = static_cast<float>(at_mode[0] / std::max(at_mode[1], 1.0));
  }
  const Vec c(centre);
  double z = 0, s1 = 0, s2 = 0;
  if constexpr (B == CE) {
    z = row.template sums<1>([&](const Vec& s, const Vec& t, std::array<Vec, 1>& acc) {
      acc[0] = acc[0] + (at::vec::fmsub(s, step, shift).exp2() & entries<B>(s, t));
    })[0];
  } else {
    auto m3 = row.template sums<3>([&](const Vec& s, const Vec& t, std::array<Vec, 3>& acc) {
      const Vec ok = entries<B>(s, t);
      const Vec p = at::vec::fmsub(logits<B>(s, t), step, shift).exp2() & ok;
      const Vec e = ((s - t) - c) & ok;
      const Vec pe = p * e;
      acc[0] = acc[0] + p;
      acc[1] = acc[1] + pe;
      if constexpr (SECOND) acc[2] = at::vec::fmadd(pe, e, acc[2]);
    });
    z = m3[0], s1 = m3[1], s2 = m3[2];
  }
  out[M] = m, out[CENTRE] = centre, out[Z] = static_cast<float>(z), out[S1] = static_cast<float>(s1);
  out[S2] = static_cast<float>(s2), out[COUNT] = count;
}

// U: p = 1 on every entry, centred on the mean of d.
template <bool SECOND, typename XS, typename XT>
void uniform_base(const Row<XS, XT>& row, double mean_d, float count, float* out) {
  const Vec c(static_cast<float>(mean_d));
  auto m2 = row.template sums<2>([&](const Vec& s, const Vec& t, std::array<Vec, 2>& acc) {
    const Vec e = ((s - t) - c) & entries<S>(s, t);
    acc[0] = acc[0] + e;
    if constexpr (SECOND) acc[1] = at::vec::fmadd(e, e, acc[1]);
  });
  out[M] = 0.f, out[CENTRE] = static_cast<float>(mean_d), out[Z] = count;
  out[S1] = static_cast<float>(m2[0]), out[S2] = static_cast<float>(m2[1]), out[COUNT] = count;
}

template <bool SECOND, typename XS, typename XT>
void rows(const XS* s, const XT* t, int64_t n_rows, int64_t V, int64_t stride_s, int64_t stride_t,
          const std::vector<int64_t>& bases, const std::vector<double>& scales, float* out) {
  const int64_t nb = static_cast<int64_t>(bases.size());
  at::parallel_for(0, n_rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const Row<XS, XT> row{s + r * stride_s, t + r * stride_t, V};
      const Vec one(1.f);
      // n and the sum of d over the entries (the centre of U and of every base without second moments)
      auto nd = row.template sums<2>([&](const Vec& a, const Vec& b, std::array<Vec, 2>& acc) {
        const Vec ok = entries<S>(a, b);
        acc[0] = acc[0] + (one & ok);
        acc[1] = acc[1] + ((a - b) & ok);
      });
      const float count = static_cast<float>(nd[0]);
      const double mean_d = nd[1] / std::max(nd[0], 1.0);
      for (int64_t i = 0; i < nb; ++i) {
        float* o = out + (r * nb + i) * COLUMNS;
        const float scale = static_cast<float>(scales[i]);
        switch (bases[i]) {
          case S: softmax_base<S, SECOND>(row, scale, mean_d, count, o); break;
          case T: softmax_base<T, SECOND>(row, scale, mean_d, count, o); break;
          case CE: softmax_base<CE, SECOND>(row, scale, mean_d, count, o); break;
          default: uniform_base<SECOND>(row, mean_d, count, o); break;
        }
      }
    }
  });
}

template <typename XS, typename XT>
void dispatch_second(const torch::Tensor& s, const torch::Tensor& t, const std::vector<int64_t>& bases,
                     const std::vector<double>& scales, bool second, torch::Tensor& out) {
  auto call = [&](auto flag) {
    rows<decltype(flag)::value>(s.data_ptr<XS>(), t.data_ptr<XT>(), s.size(0), s.size(1), s.stride(0),
                                t.stride(0), bases, scales, out.data_ptr<float>());
  };
  if (second) call(std::true_type{}); else call(std::false_type{});
}

template <typename XS>
void dispatch_teacher(const torch::Tensor& s, const torch::Tensor& t, const std::vector<int64_t>& bases,
                      const std::vector<double>& scales, bool second, torch::Tensor& out) {
  switch (t.scalar_type()) {
    case at::kFloat: dispatch_second<XS, float>(s, t, bases, scales, second, out); break;
    case at::kBFloat16: dispatch_second<XS, at::BFloat16>(s, t, bases, scales, second, out); break;
    case at::kHalf: dispatch_second<XS, at::Half>(s, t, bases, scales, second, out); break;
    default: TORCH_CHECK(false, "cpu_rows: teacher logits must be float32, bfloat16 or float16");
  }
}

}  // namespace

// (N, V) student and teacher logits with unit stride along V -> (N, len(bases), 6) float32.
torch::Tensor row_passes(torch::Tensor student, torch::Tensor teacher, std::vector<int64_t> bases,
                         std::vector<double> scales, bool second) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), "cpu_rows: (N, V) logits of one shape");
  TORCH_CHECK(student.stride(1) == 1 && teacher.stride(1) == 1, "cpu_rows: unit stride along V");
  TORCH_CHECK(bases.size() == scales.size(), "cpu_rows: one scale per base");
  auto out = torch::empty({student.size(0), static_cast<int64_t>(bases.size()), COLUMNS},
                          student.options().dtype(at::kFloat));
  switch (student.scalar_type()) {
    case at::kFloat: dispatch_teacher<float>(student, teacher, bases, scales, second, out); break;
    case at::kBFloat16: dispatch_teacher<at::BFloat16>(student, teacher, bases, scales, second, out); break;
    case at::kHalf: dispatch_teacher<at::Half>(student, teacher, bases, scales, second, out); break;
    default: TORCH_CHECK(false, "cpu_rows: student logits must be float32, bfloat16 or float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_passes", &row_passes, "the forward row passes of csd_kernels' compiled CPU backend");
}
