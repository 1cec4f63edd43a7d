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
// Each row is swept three times for all its bases together (maxima, centres, moments: `one_row`); the row
// (2V values) stays in the core's L2 cache between sweeps, so only the first sweep reads memory. Sums are
// kept in fp32 vector registers over blocks of BLOCK entries (BLOCK / W terms per lane) and added across
// blocks in double, so they are as precise as a pairwise sum. The validity test follows the contract:
// -inf excluded, NaN kept (it propagates through the maximum and the exponentials into Z).

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

// The entries of the row: both logits finite (S, T, U); the cross-entropy's are those where s is finite.
inline Vec entries(const Vec& s, const Vec& t) {
  const Vec inf(NEG_INF);
  return (s != inf) & (t != inf);
}

// The bases one call computes, the same for every row, and where each one's columns go.
struct Plan {
  bool has[4] = {false, false, false, false};  // indexed by Base
  int64_t slot[4] = {-1, -1, -1, -1};
  float scale[4] = {0.f, 0.f, 0.f, 0.f};
  bool second = false;
  int64_t n_bases = 0;
};

// Accumulator slots of the moments sweep: (Z, S1, S2) of S and T, (S1, S2) of U, Z of CE.
enum Acc : int { ZS, S1S, S2S, ZT, S1T, S2T, S1U, S2U, ZCE, ACCS };

// All bases of one row in three sweeps, whichever bases the loss needs: (1) n, the sum of d and every
// softmax's maximum; (2) the centres, d at each softmax's mode (only with second moments); (3) the
// moments of every base. Each sweep loads s and t once for all bases (a separate sweep per base cost "ts"
// about a third more). When the cross-entropy's softmax has S's scale and maximum (temperature 1 and a
// finite teacher at the student's top entry), both take their weights from one exponential.
template <typename XS, typename XT>
void one_row(const Row<XS, XT>& row, const Plan& plan, float* out) {
  const bool hs = plan.has[S], ht = plan.has[T], hu = plan.has[U], hce = plan.has[CE];
  const Vec inf(NEG_INF), one(1.f);
  Vec top_s(NEG_INF), top_t(NEG_INF), top_ce(NEG_INF);
  const auto nd = row.template sums<2>([&](const Vec& s, const Vec& t, std::array<Vec, 2>& acc) {
    const Vec ok = entries(s, t);
    acc[0] = acc[0] + (one & ok);
    acc[1] = acc[1] + ((s - t) & ok);
    if (hs) top_s = at::vec::maximum(top_s, Vec::blendv(inf, s, ok));
    if (ht) top_t = at::vec::maximum(top_t, Vec::blendv(inf, t, ok));
    if (hce) top_ce = at::vec::maximum(top_ce, Vec::blendv(inf, s, s != inf));
  });
  const float count = static_cast<float>(nd[0]);
  const float mean_d = static_cast<float>(nd[1] / std::max(nd[0], 1.0));
  float m[4] = {hmax(top_s), hmax(top_t), 0.f, hmax(top_ce)};
  float centre[4] = {mean_d, mean_d, mean_d, mean_d};
  if (plan.second && (hs || ht)) {  // d at the mode, averaged over ties
    const Vec mode_s(m[S]), mode_t(m[T]);
    const auto h = row.template sums<4>([&](const Vec& s, const Vec& t, std::array<Vec, 4>& acc) {
      const Vec ok = entries(s, t), d = s - t;
      if (hs) {
        const Vec hit = ok & (s == mode_s);
        acc[0] = acc[0] + (d & hit);
        acc[1] = acc[1] + (one & hit);
      }
      if (ht) {
        const Vec hit = ok & (t == mode_t);
        acc[2] = acc[2] + (d & hit);
        acc[3] = acc[3] + (one & hit);
      }
    });
    if (hs) centre[S] = static_cast<float>(h[0] / std::max(h[1], 1.0));
    if (ht) centre[T] = static_cast<float>(h[2] / std::max(h[3], 1.0));
  }
  // A base without entries has m = -inf: its exponentials are masked to 0, around a shift of 0.
  auto shift = [&](int b) { return Vec((m[b] == NEG_INF ? 0.f : m[b]) * plan.scale[b]); };
  const Vec shift_s = shift(S), shift_t = shift(T), shift_ce = shift(CE);
  const Vec step_s(plan.scale[S]), step_t(plan.scale[T]), step_ce(plan.scale[CE]);
  const Vec c_s(centre[S]), c_t(centre[T]), c_u(mean_d);
  const bool shared = hs && hce && plan.scale[S] == plan.scale[CE] && m[S] == m[CE];
  const bool second = plan.second;
  const auto mo = row.template sums<ACCS>([&](const Vec& s, const Vec& t, std::array<Vec, ACCS>& acc) {
    const Vec ok = entries(s, t), d = s - t;
    Vec q(0.f);  // the cross-entropy's weights, every finite s
    if (hce) q = at::vec::fmsub(s, shared ? step_s : step_ce, shared ? shift_s : shift_ce).exp2() & (s != inf);
    if (hce) acc[ZCE] = acc[ZCE] + q;
    if (hs) {
      const Vec p = shared ? (q & ok) : (at::vec::fmsub(s, step_s, shift_s).exp2() & ok);
      const Vec e = (d - c_s) & ok, pe = p * e;
      acc[ZS] = acc[ZS] + p;
      acc[S1S] = acc[S1S] + pe;
      if (second) acc[S2S] = at::vec::fmadd(pe, e, acc[S2S]);
    }
    if (ht) {
      const Vec p = at::vec::fmsub(t, step_t, shift_t).exp2() & ok;
      const Vec e = (d - c_t) & ok, pe = p * e;
      acc[ZT] = acc[ZT] + p;
      acc[S1T] = acc[S1T] + pe;
      if (second) acc[S2T] = at::vec::fmadd(pe, e, acc[S2T]);
    }
    if (hu) {
      const Vec e = (d - c_u) & ok;
      acc[S1U] = acc[S1U] + e;
      if (second) acc[S2U] = at::vec::fmadd(e, e, acc[S2U]);
    }
  });
  auto write = [&](int b, double z, double s1, double s2) {
    float* o = out + plan.slot[b] * COLUMNS;
    o[M] = m[b], o[CENTRE] = centre[b], o[Z] = static_cast<float>(z), o[S1] = static_cast<float>(s1);
    o[S2] = static_cast<float>(s2), o[COUNT] = count;
  };
  if (hs) write(S, mo[ZS], mo[S1S], mo[S2S]);
  if (ht) write(T, mo[ZT], mo[S1T], mo[S2T]);
  if (hu) write(U, nd[0], mo[S1U], mo[S2U]);
  if (hce) write(CE, mo[ZCE], 0.0, 0.0);
}

template <typename XS, typename XT>
void rows(const XS* s, const XT* t, int64_t n_rows, int64_t V, int64_t stride_s, int64_t stride_t,
          const Plan& plan, float* out) {
  at::parallel_for(0, n_rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      one_row(Row<XS, XT>{s + r * stride_s, t + r * stride_t, V}, plan, out + r * plan.n_bases * COLUMNS);
    }
  });
}

template <typename XS>
void dispatch_teacher(const torch::Tensor& s, const torch::Tensor& t, const Plan& plan, torch::Tensor& out) {
  auto call = [&](auto* teacher) {
    rows(s.data_ptr<XS>(), teacher, s.size(0), s.size(1), s.stride(0), t.stride(0), plan, out.data_ptr<float>());
  };
  switch (t.scalar_type()) {
    case at::kFloat: call(t.data_ptr<float>()); break;
    case at::kBFloat16: call(t.data_ptr<at::BFloat16>()); break;
    case at::kHalf: call(t.data_ptr<at::Half>()); break;
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
  Plan plan;
  plan.second = second;
  plan.n_bases = static_cast<int64_t>(bases.size());
  for (int64_t i = 0; i < plan.n_bases; ++i) {
    const int64_t b = bases[i];
    TORCH_CHECK(b >= S && b <= CE && !plan.has[b], "cpu_rows: bases are distinct, each one of S, T, U, CE");
    plan.has[b] = true, plan.slot[b] = i, plan.scale[b] = static_cast<float>(scales[i]);
  }
  auto out = torch::empty({student.size(0), static_cast<int64_t>(bases.size()), COLUMNS},
                          student.options().dtype(at::kFloat));
  switch (student.scalar_type()) {
    case at::kFloat: dispatch_teacher<float>(student, teacher, plan, out); break;
    case at::kBFloat16: dispatch_teacher<at::BFloat16>(student, teacher, plan, out); break;
    case at::kHalf: dispatch_teacher<at::Half>(student, teacher, plan, out); break;
    default: TORCH_CHECK(false, "cpu_rows: student logits must be float32, bfloat16 or float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_passes", &row_passes, "the forward row passes of csd_kernels' compiled CPU backend");
}
