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
// Each row is swept twice for all its bases together (maxima and where the modes lie, then moments:
// `one_row`), three times where a softmax's mode is tied (the centres); the row (2V values) stays in the
// core's L2 cache between sweeps, so only the first sweep reads memory. Sums are kept in fp32 vector
// registers over blocks of BLOCK entries (BLOCK / W terms per lane) and added across blocks in double, so
// they are as precise as a pairwise sum. The validity test follows the contract:
// -inf excluded, NaN kept (it propagates through the maximum and the exponentials into Z).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <utility>
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

// 2^x for the softmax weights, about twice as fast as at::vec's exp2 (Sleef's 1-ulp exp2f): Cephes's
// exp2f, a degree-6 polynomial of the fraction f = x - round(x) in [-1/2, 1/2] (relative error below
// 2e-7, under 2 ulp) times 2^round(x) built in the exponent bits. x below -126 gives 0 (the true value
// is below FLT_MIN: a weight that no fp32 sum of terms near 1 can see), above 128 inf, NaN NaN.
inline Vec exp2_fast(const Vec& x) {
  const Vec xc = at::vec::minimum(at::vec::maximum(x, Vec(-127.f)), Vec(128.f));  // keeps NaN
  const Vec k = xc.round();
  const Vec f = xc - k;
  Vec p = at::vec::fmadd(Vec(1.535336188319500e-4f), f, Vec(1.339887440266574e-3f));
  p = at::vec::fmadd(p, f, Vec(9.618437357674640e-3f));
  p = at::vec::fmadd(p, f, Vec(5.550332471162809e-2f));
  p = at::vec::fmadd(p, f, Vec(2.402264791363012e-1f));
  p = at::vec::fmadd(p, f, Vec(6.931472028550421e-1f));
  p = at::vec::fmadd(p, f, Vec(1.f));
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec bits = (at::vec::convert_to_int_of_same_size(k) + IVec(127)) * IVec(1 << 23);
  return Vec::blendv(p * at::vec::cast<float>(bits), Vec(0.f), x < Vec(-126.f));
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

// Where a softmax's mode lies, lane by lane, from the row's first sweep: each lane keeps its largest x
// (m), d at the first entry that reached it, and whether a later entry tied it. When exactly one lane
// holds the row's maximum and saw no tie, the mode is one entry and its d is the centre, exactly as the
// ties sweep would find it; otherwise (ties at the mode, a NaN maximum, no entry) that sweep runs.
struct ModeLanes {
  Vec top{NEG_INF}, d_top{0.f}, tied{0.f};

  inline void add(const Vec& x, const Vec& d) {  // x is -inf outside the base's entries
    const Vec gt = x > top;
    tied = Vec::blendv(tied | (x == top), Vec(0.f), gt);  // ties at -inf never reach a finite maximum
    d_top = Vec::blendv(d_top, d, gt);
    top = at::vec::maximum(top, x);
  }

  // The centre d at a mode of one entry, or NaN where the ties sweep has to decide.
  inline float centre(float m) const {
    alignas(64) float lanes[W], ds[W], ties[W];
    top.store(lanes), d_top.store(ds), tied.store(ties);
    int64_t holders = 0;
    float d = std::numeric_limits<float>::quiet_NaN();
    for (int64_t i = 0; i < W; ++i) {
      if (lanes[i] == m) {
        ++holders;
        d = ds[i];
        if (ties[i] != 0.f) ++holders;  // any bit set: the lane saw another entry at m
      }
    }
    return holders == 1 && std::isfinite(m) ? d : std::numeric_limits<float>::quiet_NaN();
  }
};

// All bases of one row in at most three sweeps, whichever bases the loss needs: (1) n, the sum of d and
// every softmax's maximum, with where it lies (ModeLanes); (2) only where a softmax's mode is tied, the
// centres, d at each softmax's mode averaged over its ties (only with second moments); (3) the moments
// of every base. Given centres (`given`, one a base in slot order: a second pass over rows whose moments
// cancelled around the first pass's) replace those of (1) and (2). Each sweep loads s and t once for all
// bases (a separate sweep per base cost "ts" about a third more). When the cross-entropy's softmax has
// S's scale and maximum (temperature 1 and a finite teacher at the student's top entry), both take their
// weights from one exponential.
template <typename XS, typename XT>
void one_row(const Row<XS, XT>& row, const Plan& plan, const float* given, float* out) {
  const bool hs = plan.has[S], ht = plan.has[T], hu = plan.has[U], hce = plan.has[CE];
  const bool modes = plan.second && given == nullptr;
  const Vec inf(NEG_INF), one(1.f);
  ModeLanes lane_s, lane_t;
  Vec top_ce(NEG_INF);
  const auto nd = row.template sums<2>([&](const Vec& s, const Vec& t, std::array<Vec, 2>& acc) {
    const Vec ok = entries(s, t), d = s - t;
    acc[0] = acc[0] + (one & ok);
    acc[1] = acc[1] + (d & ok);
    if (hs) {
      const Vec x = Vec::blendv(inf, s, ok);
      if (modes) lane_s.add(x, d); else lane_s.top = at::vec::maximum(lane_s.top, x);
    }
    if (ht) {
      const Vec x = Vec::blendv(inf, t, ok);
      if (modes) lane_t.add(x, d); else lane_t.top = at::vec::maximum(lane_t.top, x);
    }
    if (hce) top_ce = at::vec::maximum(top_ce, Vec::blendv(inf, s, s != inf));
  });
  const float count = static_cast<float>(nd[0]);
  const float mean_d = static_cast<float>(nd[1] / std::max(nd[0], 1.0));
  float m[4] = {hmax(lane_s.top), hmax(lane_t.top), 0.f, hmax(top_ce)};
  float centre[4] = {mean_d, mean_d, mean_d, mean_d};
  if (modes && (hs || ht)) {
    if (hs) centre[S] = lane_s.centre(m[S]);
    if (ht) centre[T] = lane_t.centre(m[T]);
    const bool tie_s = hs && std::isnan(centre[S]), tie_t = ht && std::isnan(centre[T]);
    if (tie_s || tie_t) {  // d at the mode, averaged over ties
      const Vec mode_s(m[S]), mode_t(m[T]);
      const auto h = row.template sums<4>([&](const Vec& s, const Vec& t, std::array<Vec, 4>& acc) {
        const Vec ok = entries(s, t), d = s - t;
        if (tie_s) {
          const Vec hit = ok & (s == mode_s);
          acc[0] = acc[0] + (d & hit);
          acc[1] = acc[1] + (one & hit);
        }
        if (tie_t) {
          const Vec hit = ok & (t == mode_t);
          acc[2] = acc[2] + (d & hit);
          acc[3] = acc[3] + (one & hit);
        }
      });
      if (tie_s) centre[S] = static_cast<float>(h[0] / std::max(h[1], 1.0));
      if (tie_t) centre[T] = static_cast<float>(h[2] / std::max(h[3], 1.0));
    }
  }
  if (given != nullptr) {
    for (int b : {S, T, U}) centre[b] = plan.has[b] ? given[plan.slot[b]] : centre[b];
  }
  // A base without entries has m = -inf: its exponentials are masked to 0, around a shift of 0.
  auto shift = [&](int b) { return Vec((m[b] == NEG_INF ? 0.f : m[b]) * plan.scale[b]); };
  const Vec shift_s = shift(S), shift_t = shift(T), shift_ce = shift(CE);
  const Vec step_s(plan.scale[S]), step_t(plan.scale[T]), step_ce(plan.scale[CE]);
  const Vec c_s(centre[S]), c_t(centre[T]), c_u(centre[U]);
  const bool shared = hs && hce && plan.scale[S] == plan.scale[CE] && m[S] == m[CE];
  const bool second = plan.second;
  const auto mo = row.template sums<ACCS>([&](const Vec& s, const Vec& t, std::array<Vec, ACCS>& acc) {
    // d is masked once for all bases: outside the entries p = 0 and e = -c_B is finite, so p e adds 0
    const Vec ok = entries(s, t), d = (s - t) & ok;
    Vec q(0.f);  // the cross-entropy's weights, every finite s
    if (hce) q = exp2_fast(at::vec::fmsub(s, shared ? step_s : step_ce, shared ? shift_s : shift_ce)) & (s != inf);
    if (hce) acc[ZCE] = acc[ZCE] + q;
    if (hs) {
      const Vec p = shared ? (q & ok) : (exp2_fast(at::vec::fmsub(s, step_s, shift_s)) & ok);
      const Vec e = d - c_s, pe = p * e;
      acc[ZS] = acc[ZS] + p;
      acc[S1S] = acc[S1S] + pe;
      if (second) acc[S2S] = at::vec::fmadd(pe, e, acc[S2S]);
    }
    if (ht) {
      const Vec p = exp2_fast(at::vec::fmsub(t, step_t, shift_t)) & ok;
      const Vec e = d - c_t, pe = p * e;
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
          const Plan& plan, const float* given, float* out) {
  at::parallel_for(0, n_rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      one_row(Row<XS, XT>{s + r * stride_s, t + r * stride_t, V}, plan,
              given == nullptr ? nullptr : given + r * plan.n_bases, out + r * plan.n_bases * COLUMNS);
    }
  });
}

// f(typed data pointer) for a tensor of logits or of the gradient: float32, bfloat16 or float16.
template <typename F>
void with_data(const torch::Tensor& x, const char* what, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat: f(x.data_ptr<float>()); break;
    case at::kBFloat16: f(x.data_ptr<at::BFloat16>()); break;
    case at::kHalf: f(x.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "cpu_rows: ", what, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

// The backward: the gradient of whole rows from the forward's row statistics (the columns of stats.py),
// entry by entry as torch_backend.gradient defines it, written in the logits' dtype. One read of s and t
// and one write of the gradient per entry; the weights are recomputed as exp2((x - m) * scale - log2 Z).
enum Stat : int64_t { M_S = 0, LOG2Z_S, M_T, LOG2Z_T, E_W1, E_W2, SHIFT, INV_N, M_1, LOG2Z_1 };
enum Kind : int64_t { CSD = 0, KL_FORWARD = 1, KL_REVERSE = 2 };  // contract.KINDS

struct GradPlan {
  int64_t kind = CSD;
  float w1[3] = {0.f, 0.f, 0.f}, w2[3] = {0.f, 0.f, 0.f};  // mixture coefficients of S, T, U
  float scale_s = 0.f, scale_t = 0.f;                       // log2(e) / temperature of each side
  float temperature = 1.f, csd_weight = 1.f, ce_weight = 0.f;
  bool sharded_labels = false;
};

// sum_B a_B base_B over the bases with a_B > 0, as torch_backend._mix (0 * inf would be NaN)
inline Vec mix(const float* a, const Vec& bs, const Vec& bt, const Vec& bu) {
  Vec total(0.f);
  if (a[S] > 0.f) total = at::vec::fmadd(Vec(a[S]), bs, total);
  if (a[T] > 0.f) total = at::vec::fmadd(Vec(a[T]), bt, total);
  if (a[U] > 0.f) total = at::vec::fmadd(Vec(a[U]), bu, total);
  return total;
}

template <typename X>
inline void store_vec(X* p, const Vec& v, int64_t count) {
  if constexpr (std::is_same_v<X, float>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<X>(v, v).store(p, count);  // the first W entries are v's
  }
}

template <typename XS, typename XT, typename XG>
void gradient_rows(const XS* s_ptr, const XT* t_ptr, XG* g_ptr, const float* stats, const bool* active,
                   const int64_t* labels, const float* grad_rows, int64_t n_rows, int64_t V, int64_t stride_s,
                   int64_t stride_t, int64_t stride_g, int64_t stride_stats, const GradPlan& plan) {
  const bool need_s = plan.w1[S] > 0.f || plan.w2[S] > 0.f, need_t = plan.w1[T] > 0.f || plan.w2[T] > 0.f;
  const bool has_ce = labels != nullptr;
  at::parallel_for(0, n_rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      XG* g_row = g_ptr + r * stride_g;
      if (!active[r]) {  // an ignored row: 0, whatever its statistics hold
        for (int64_t j = 0; j < V; j += W) store_vec(g_row + j, Vec(0.f), std::min(W, V - j));
        continue;
      }
      const Row<XS, XT> row{s_ptr + r * stride_s, t_ptr + r * stride_t, V};
      const float* st = stats + r * stride_stats;
      const Vec m_s(st[M_S]), lz_s(st[LOG2Z_S]), m_t(st[M_T]), lz_t(st[LOG2Z_T]), e1(st[E_W1]), e2(st[E_W2]);
      const Vec shift(st[SHIFT]), inv_n(st[INV_N]), m_1(st[M_1]), lz_1(st[LOG2Z_1]);
      const Vec step_s(plan.scale_s), step_t(plan.scale_t), log2e(static_cast<float>(M_LOG2E));
      // The row's constant factors in one scalar each: the upstream gradient, the loss weights, CSD's 1/2
      // and the KL divergences' 1/tau or 1/tau^2 (multiplied once a row rather than once an entry).
      const float own = plan.kind == CSD ? 0.5f
                        : plan.kind == KL_FORWARD ? 1.f / plan.temperature
                                                  : 1.f / (plan.temperature * plan.temperature);
      const Vec zero(0.f), scale_loss(grad_rows[r] * plan.csd_weight * own), scale_ce(grad_rows[r] * plan.ce_weight);
      const int64_t label = has_ce ? labels[r] : -1;
      // A label outside [0, V) makes the row NaN (no host check), unless it belongs to another shard.
      const bool bad_label = has_ce && !plan.sharded_labels && (label < 0 || label >= V);
      int64_t j = 0;
      row.sweep(0, V, [&](const Vec& s, const Vec& t) {
        const Vec dd = (s - t) - shift;
        const Vec bs = need_s ? exp2_fast(at::vec::fmsub(s - m_s, step_s, lz_s)) : zero;
        const Vec bt = need_t ? exp2_fast(at::vec::fmsub(t - m_t, step_t, lz_t)) : zero;
        Vec g;
        if (plan.kind == CSD) {
          g = mix(plan.w2, bs, bt, inv_n) * (dd - e1) + mix(plan.w1, bs, bt, inv_n) * (dd - e2);
        } else if (plan.kind == KL_FORWARD) {
          g = bs - bt;
        } else {
          g = bs * (dd - e1);
        }
        g = scale_loss * Vec::blendv(zero, g, entries(s, t));
        if (has_ce) {  // softmax(s) - onehot(label)
          Vec ce = exp2_fast(at::vec::fmsub(s - m_1, log2e, lz_1));
          if (label >= j && label < j + W) {
            alignas(64) float hot[W] = {};
            hot[label - j] = 1.f;
            ce = ce - Vec::loadu(hot);
          }
          if (bad_label) ce = Vec(std::numeric_limits<float>::quiet_NaN());
          g = at::vec::fmadd(scale_ce, ce, g);
        }
        store_vec(g_row + j, g, std::min(W, V - j));
        j += W;
      });
    }
  });
}

}  // namespace

// (N, V) student and teacher logits with unit stride along V -> (N, len(bases), 6) float32; centres, where
// given, (N, len(bases)) float32 (the CE's column unused).
torch::Tensor row_passes(torch::Tensor student, torch::Tensor teacher, std::vector<int64_t> bases,
                         std::vector<double> scales, bool second, c10::optional<torch::Tensor> centres) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), "cpu_rows: (N, V) logits of one shape");
  TORCH_CHECK(student.stride(1) == 1 && teacher.stride(1) == 1, "cpu_rows: unit stride along V");
  TORCH_CHECK(bases.size() == scales.size(), "cpu_rows: one scale per base");
  TORCH_CHECK(!centres || (centres->scalar_type() == at::kFloat && centres->is_contiguous() &&
                           centres->dim() == 2 && centres->size(0) == student.size(0) &&
                           centres->size(1) == static_cast<int64_t>(bases.size())),
              "cpu_rows: (N, len(bases)) float32 centres");
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
  with_data(student, "student logits", [&](auto* s) {
    with_data(teacher, "teacher logits", [&](auto* t) {
      rows(s, t, student.size(0), student.size(1), student.stride(0), teacher.stride(0), plan,
           centres ? centres->data_ptr<float>() : nullptr, out.data_ptr<float>());
    });
  });
  return out;
}

// The gradient of (N, V) rows into `out` (N, V, unit stride along V): stats (N, NUM_STATS) float32, active
// (N,) bool, labels (N,) int64 with a cross-entropy, grad_rows (N,) float32; w1, w2 the mixtures over
// (S, T, U); kind as contract.KINDS.
void row_gradient(torch::Tensor student, torch::Tensor teacher, torch::Tensor stats, torch::Tensor active,
                  c10::optional<torch::Tensor> labels, torch::Tensor grad_rows, torch::Tensor out, int64_t kind,
                  std::vector<double> w1, std::vector<double> w2, double temperature, double teacher_temperature,
                  double csd_weight, double ce_weight, bool sharded_labels) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes() && out.sizes() == student.sizes(),
              "cpu_rows: (N, V) logits and gradient of one shape");
  TORCH_CHECK(student.stride(1) == 1 && teacher.stride(1) == 1 && out.stride(1) == 1, "cpu_rows: unit stride along V");
  const int64_t n = student.size(0);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == n && stats.size(1) > LOG2Z_1 &&
              stats.stride(1) == 1, "cpu_rows: (N, NUM_STATS) float32 statistics");
  TORCH_CHECK(active.scalar_type() == at::kBool && active.is_contiguous() && active.numel() == n, "cpu_rows: (N,) bool active");
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat && grad_rows.is_contiguous() && grad_rows.numel() == n,
              "cpu_rows: (N,) float32 grad_rows");
  TORCH_CHECK(!labels || (labels->scalar_type() == at::kLong && labels->is_contiguous() && labels->numel() == n),
              "cpu_rows: (N,) int64 labels");
  TORCH_CHECK(w1.size() == 3 && w2.size() == 3 && kind >= CSD && kind <= KL_REVERSE, "cpu_rows: mixtures over (S, T, U)");
  GradPlan plan;
  plan.kind = kind;
  for (int b = 0; b < 3; ++b) plan.w1[b] = static_cast<float>(w1[b]), plan.w2[b] = static_cast<float>(w2[b]);
  plan.scale_s = static_cast<float>(M_LOG2E / temperature), plan.scale_t = static_cast<float>(M_LOG2E / teacher_temperature);
  plan.temperature = static_cast<float>(temperature), plan.csd_weight = static_cast<float>(csd_weight);
  plan.ce_weight = static_cast<float>(ce_weight), plan.sharded_labels = sharded_labels;
  with_data(student, "student logits", [&](auto* s) {
    with_data(teacher, "teacher logits", [&](auto* t) {
      with_data(out, "the gradient", [&](auto* g) {
        gradient_rows(s, t, g, stats.data_ptr<float>(), active.data_ptr<bool>(),
                      labels ? labels->data_ptr<int64_t>() : nullptr, grad_rows.data_ptr<float>(), n,
                      student.size(1), student.stride(0), teacher.stride(0), out.stride(0), stats.stride(0), plan);
      });
    });
  });
}

// An uninitialised tensor whose memory is mapped for transparent huge pages: the backward's gradient.
//
// Why: the gradient is the one N x V buffer the backward creates, and glibc maps a buffer this large
// afresh for every call, so every call pays a page fault per 4 KB page on first touch. Measured on 2
// cores (THP mode "madvise", so torch's own buffers get 4 KB pages unless THP_MEM_ALLOC_ENABLE=1):
// filling a new 262 MB tensor took 77 ms, against 18 ms where its pages are 2 MB; the backward itself
// (N = 2048, V = 32000 fp32, "ss") takes 33 ms into memory already touched. So the mapping is rounded
// to whole 2 MB pages, aligned to one, and advised MADV_HUGEPAGE (which the kernel may decline: the
// buffer then simply has 4 KB pages). When the tensor's storage is freed, its mapping is kept for the
// next backward (GradientCache: one mapping, the last freed), whose gradient then finds its pages
// already there: a training step frees its logits' gradient and the next step asks for the same size
// (on this project's KVM hosts a fresh huge page is often one the host must fault in again, up to a
// second of system time at 1.2 GB). It is memory the process holds like any other (RSS counts it, the
// kept mapping too, until `release_cached_gradient` or a request it cannot serve); unlike torch's
// allocator, torch's memory profiler does not see it, and its storage cannot be resized.
class GradientCache {
 public:
  // A mapping of at least `length` bytes: the kept one if it is large enough but not more than twice
  // that (a small gradient does not hold a large mapping), else a new one.
  std::pair<void*, size_t> take(size_t length) {
    std::lock_guard<std::mutex> guard(lock_);
    if (data_ != nullptr && kept_ >= length && kept_ <= 2 * length) {
      return {std::exchange(data_, nullptr), std::exchange(kept_, 0)};
    }
    return {nullptr, 0};
  }

  // Keep a freed mapping, unmapping the one kept before (none: just that).
  void give(void* data, size_t length) {
    std::lock_guard<std::mutex> guard(lock_);
    if (data_ != nullptr) munmap(data_, kept_);
    data_ = data, kept_ = length;
  }

  void release() { give(nullptr, 0); }

  size_t kept() {
    std::lock_guard<std::mutex> guard(lock_);
    return kept_;
  }

 private:
  std::mutex lock_;
  void* data_ = nullptr;
  size_t kept_ = 0;
};

GradientCache& gradient_cache() {
  static GradientCache* cache = new GradientCache();  // never destroyed: tensors may outlive static teardown
  return *cache;
}

torch::Tensor huge_page_empty(std::vector<int64_t> sizes, at::ScalarType dtype) {
  constexpr size_t PAGE = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t size : sizes) {
    TORCH_CHECK(size >= 0, "cpu_rows: sizes are non-negative");
    numel *= size;
  }
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const size_t needed = (bytes + PAGE - 1) / PAGE * PAGE;
  if (needed == 0) return torch::empty(sizes, at::TensorOptions().dtype(dtype));
  auto [data, length] = gradient_cache().take(needed);
  if (data == nullptr) {
    gradient_cache().release();  // the kept mapping cannot serve this size: no second one beside it
    length = needed;
    // Map one page more than needed, then unmap the unaligned head and the tail beyond `length`.
    void* mapped = mmap(nullptr, length + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(mapped != MAP_FAILED, "cpu_rows: could not map ", length, " bytes for the gradient");
    const uintptr_t start = reinterpret_cast<uintptr_t>(mapped);
    const uintptr_t aligned = (start + PAGE - 1) / PAGE * PAGE;
    if (aligned > start) munmap(mapped, aligned - start);
    munmap(reinterpret_cast<void*>(aligned + length), start + PAGE - aligned);  // never empty: aligned < start + PAGE
    data = reinterpret_cast<void*>(aligned);
    madvise(data, length, MADV_HUGEPAGE);  // advice only: its failure leaves ordinary pages
  }
  const size_t kept = length;
  return torch::from_blob(data, sizes, [kept](void* p) { gradient_cache().give(p, kept); },
                          at::TensorOptions().dtype(dtype));
}

// Unmap the gradient mapping kept for reuse, if any.
void release_cached_gradient() { gradient_cache().release(); }

// Bytes of the gradient mapping kept for reuse (0 if none).
int64_t cached_gradient_bytes() { return static_cast<int64_t>(gradient_cache().kept()); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_passes", &row_passes, "the forward row passes of csd_kernels' compiled CPU backend");
  m.def("row_gradient", &row_gradient, "the backward of csd_kernels' compiled CPU backend");
  m.def("huge_page_empty", &huge_page_empty, "an uninitialised tensor on transparent huge pages");
  m.def("release_cached_gradient", &release_cached_gradient, "unmap the gradient mapping kept for reuse");
  m.def("cached_gradient_bytes", &cached_gradient_bytes, "bytes of the gradient mapping kept for reuse");
}
