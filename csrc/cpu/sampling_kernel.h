// csrc/cpu/sampling_kernel.h -- fused temperature / top-k / top-p / min-p sampling, per row.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// Semantics are those of minigpt/kernels/reference/sampling.py (Hugging Face's
// warper order); this file finds the same kept set without sorting the row:
//
//   pass 1  max m of the row (and whether it holds NaN / +inf)
//   pass 2  S = sum exp(z), z = (x - m) / temperature, plus a "ladder": for a
//           dozen cut-offs z >= -d (d in nats below the max) the count and the
//           mass of the tokens above it. Only vectors with a lane above the
//           lowest rung do the ladder work, so peaked rows cost one exp per lane.
//   pass 3  the smallest rung that surely holds the kept set (>= k tokens, or
//           >= top_p of the mass) is the cut: compact the tokens above it into a
//           small (index, z, exp z) buffer, in vocabulary order.
//   select  on the buffer only: top-k and top-p thresholds by a weighted
//           quickselect (expected linear time), min-p is exp(z) >= min_p.
//   draw    inverse CDF with the caller's uniform u: walk the kept tokens in
//           vocabulary order until the running mass exceeds u * (kept mass).
//
// Without any filter the draw walks the row itself (pass 3, stopping early).
// Everything is float32 except the running sums of the draw (double).

// ---- per-ISA lane masks (Vec has no mask type) ------------------------------
#if defined(MG_ISA_AVX512)
inline uint32_t lanes_ge(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.r, b.r, _CMP_GE_OQ); }
// NaN or +inf: "not less than +inf", unordered compares true for NaN
inline uint32_t lanes_bad(Vec x) {
  return _mm512_cmp_ps_mask(x.r, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
}
inline uint32_t lanes_eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.r, b.r, _CMP_EQ_OQ); }
#elif defined(MG_ISA_AVX2)
inline uint32_t lanes_ge(Vec a, Vec b) {
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a.r, b.r, _CMP_GE_OQ)));
}
inline uint32_t lanes_bad(Vec x) {
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(x.r, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ)));
}
inline uint32_t lanes_eq(Vec a, Vec b) {
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a.r, b.r, _CMP_EQ_OQ)));
}
#else
inline uint32_t lanes_ge(Vec a, Vec b) { return a.r >= b.r ? 1u : 0u; }
inline uint32_t lanes_bad(Vec x) { return !(x.r < INFINITY) ? 1u : 0u; }
inline uint32_t lanes_eq(Vec a, Vec b) { return a.r == b.r ? 1u : 0u; }
#endif

// The last (partial) vector of a row, with lanes past the end set to `fill`.
template <typename T>
inline Vec load_tail(const T* p, int n, float fill) {
  float buf[Vec::N];
  for (int i = 0; i < Vec::N; ++i) buf[i] = i < n ? to_f32(p[i]) : fill;
  return Vec::load(buf);
}

// Rungs of the ladder, in nats below the row max (z = -d). The last one is the
// guard: tokens below it carry < 1.2e-7 of the max token's mass each.
constexpr int kRungs = 12;
constexpr float kRungDepth[kRungs] = {0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 5.f, 6.f, 8.f, 10.f, 12.f, 16.f};

enum RowStatus : int32_t { kOk = 0, kBadValue = 1, kNoFinite = 2 };

struct RowParams {
  float temperature;  // 0 = greedy
  int64_t top_k;      // 0 = off
  float top_p;        // 1 = off
  float min_p;        // 0 = off
};

// One candidate token of the compacted buffer.
struct Cand {
  int32_t idx;
  float z;  // (x - m) / temperature, <= 0
  float e;  // exp(z)
};

// Reusable per-thread memory.
struct Scratch {
  std::vector<Cand> cands;
  std::vector<float> vals, wts;
};

// What the analysis of one row found: the kept set is every buffer entry (or,
// when `whole_row`, every token) with z >= thresh and e >= min_p.
struct RowPlan {
  int32_t status = kOk;
  float m = 0.f, inv_t = 1.f;
  double sum_all = 0.0;   // sum exp(z) over the row
  double sum_raw = 0.0;   // sum exp(x - m), for temperature-1 log-probs
  double kept_mass = 0.0; // sum exp(z) over the kept set
  float thresh = -INFINITY;
  float min_p = 0.f;
  bool whole_row = false; // no filter: the kept set is the whole row
};

// Threshold T such that kept = {i : weight of values strictly greater than v_i
// < target} = {v >= T}. In-place three-way quickselect on (v, w); expected
// linear time, exact with ties (equal values are kept or dropped together).
// `above` is the weight of values known to be greater than all of v (kept).
inline float weighted_select(float* v, float* w, int64_t n, double target, double above = 0.0) {
  float T = INFINITY;
  while (n > 0) {
    if (n <= 16) {  // small: insertion sort descending, then scan value groups
      for (int64_t i = 1; i < n; ++i) {
        float vi = v[i], wi = w[i];
        int64_t j = i;
        for (; j > 0 && v[j - 1] < vi; --j) {
          v[j] = v[j - 1];
          w[j] = w[j - 1];
        }
        v[j] = vi;
        w[j] = wi;
      }
      for (int64_t i = 0; i < n;) {
        if (!(above < target)) break;
        const float val = v[i];
        double g = 0.0;
        for (; i < n && v[i] == val; ++i) g += w[i];
        T = val;
        above += g;
      }
      return T;
    }
    // median-of-three pivot, then partition into [> p][== p][< p]
    float a = v[0], b = v[n / 2], c = v[n - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    int64_t lt = 0, i = 0, gt = n;  // [0,lt) > p, [lt,i) == p, [gt,n) < p
    double m_gt = 0.0, m_eq = 0.0;
    while (i < gt) {
      const float x = v[i];
      if (x > pivot) {
        m_gt += w[i];
        std::swap(v[i], v[lt]);
        std::swap(w[i], w[lt]);
        ++lt;
        ++i;
      } else if (x < pivot) {
        --gt;
        std::swap(v[i], v[gt]);
        std::swap(w[i], w[gt]);
      } else {
        m_eq += w[i];
        ++i;
      }
    }
    if (above + m_gt >= target) {
      n = lt;  // the threshold lies among the larger values
    } else {
      T = pivot;  // every value >= pivot is kept
      above += m_gt + m_eq;
      if (above >= target) return T;
      v += gt;
      w += gt;
      n -= gt;
    }
  }
  return T;
}

// Passes 1-3 and the threshold selection for one row (see the file comment).
template <typename T>
RowPlan plan_row(const T* x, int64_t V, const RowParams& prm, bool want_raw, Scratch& s) {
  RowPlan plan;
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  // ---- pass 1: max, bad values
  {
    Vec vm = Vec::set1(-INFINITY);
    uint32_t bad = 0;
    int64_t i = 0;
    for (; i < nv; i += Vec::N) {
      Vec v = Vec::load(x + i);
      bad |= lanes_bad(v);
      vm = vmax(vm, v);
    }
    if (tail) {
      Vec v = load_tail(x + i, tail, -INFINITY);
      bad |= lanes_bad(v);
      vm = vmax(vm, v);
    }
    plan.m = vm.reduce_max();
    if (bad) {
      plan.status = kBadValue;
      return plan;
    }
    if (plan.m == -INFINITY) {
      plan.status = kNoFinite;
      return plan;
    }
  }
  if (prm.temperature == 0.f) return plan;  // greedy: the caller only needs m
  const float inv_t = 1.0f / prm.temperature;
  plan.inv_t = inv_t;
  const Vec vmx = Vec::set1(plan.m), vit = Vec::set1(inv_t);
  const int64_t k = (prm.top_k > 0 && prm.top_k < V) ? prm.top_k : 0;
  const bool use_p = prm.top_p < 1.0f;
  const bool want_raw_sum = want_raw && inv_t != 1.0f;
  plan.min_p = prm.min_p;

  // ---- pass 2: total mass (+ raw mass) and the ladder
  const bool ladder = k > 0 || use_p;
  Vec cnt[kRungs], mass[kRungs], rung[kRungs];
  for (int j = 0; j < kRungs; ++j) {
    cnt[j] = Vec::zero();
    mass[j] = Vec::zero();
    rung[j] = Vec::set1(-kRungDepth[j]);
  }
  const Vec one = Vec::set1(1.0f), zero = Vec::zero(), guard = rung[kRungs - 1];
  Vec sum = Vec::zero(), sum_raw = Vec::zero();
  auto pass2 = [&](Vec v) {
    Vec d = v - vmx;
    Vec z = d * vit;
    Vec e = vexp(z);
    sum = sum + e;
    if (want_raw_sum) sum_raw = sum_raw + vexp(d);
    if (ladder && lanes_ge(z, guard)) {
      for (int j = 0; j < kRungs; ++j) {
        cnt[j] = cnt[j] + select_lt(z, rung[j], zero, one);
        mass[j] = mass[j] + select_lt(z, rung[j], zero, e);
      }
    }
  };
  {
    // float lanes summed in blocks, blocks summed in double: the total must be
    // accurate to ~1e-7 because the draw and the top-p target are shares of it
    double total = 0.0, total_raw = 0.0;
    constexpr int64_t kBlock = 256 * Vec::N;
    int64_t i = 0;
    while (i < nv) {
      const int64_t end = std::min(nv, i + kBlock);
      for (; i < end; i += Vec::N) pass2(Vec::load(x + i));
      total += sum.reduce_add();
      total_raw += sum_raw.reduce_add();
      sum = sum_raw = Vec::zero();
    }
    if (tail) pass2(load_tail(x + i, tail, -INFINITY));
    plan.sum_all = total + sum.reduce_add();
    plan.sum_raw = want_raw_sum ? total_raw + sum_raw.reduce_add() : plan.sum_all;
  }
  if (!ladder && prm.min_p <= 0.f) {  // plain temperature sampling
    plan.whole_row = true;
    plan.kept_mass = plan.sum_all;
    return plan;
  }

  // ---- choose the cut: the smallest rung that surely holds the kept set
  float cut = -INFINITY;  // -inf: every finite token is a candidate
  float shell_top = INFINITY;
  if (k > 0) {
    for (int j = 0; j < kRungs; ++j)
      if (cnt[j].reduce_add() >= float(k)) {
        cut = -kRungDepth[j];
        break;
      }
  } else if (use_p) {
    const double target = double(prm.top_p) * plan.sum_all;
    for (int j = 0; j < kRungs; ++j)
      if (double(mass[j].reduce_add()) >= target) {
        cut = -kRungDepth[j];
        // tokens above the previous rung are surely in the nucleus: only the
        // shell between the two rungs needs the selection
        if (j > 0) shell_top = -kRungDepth[j - 1];
        break;
      }
  }
  // min-p keeps exp(z) >= min_p, i.e. z >= log(min_p): cut there if higher
  // (with a margin: the exact test on exp(z) comes later)
  const float ladder_cut = cut;
  if (prm.min_p > 0.f) cut = std::max(cut, std::log(prm.min_p) - 1e-3f);

  // ---- pass 3: compact the candidates (vocabulary order)
  auto& c = s.cands;
  auto compact = [&](float cut) {
    c.clear();
    const Vec vcut = Vec::set1(cut);
    float zb[Vec::N], eb[Vec::N];
    auto take = [&](Vec v, int64_t base) {
      Vec z = (v - vmx) * vit;
      uint32_t msk = lanes_ge(z, vcut);
      if (!msk) return;
      Vec e = vexp(z);
      z.store(zb);
      e.store(eb);
      while (msk) {
        const int l = __builtin_ctz(msk);
        msk &= msk - 1;
        c.push_back(Cand{int32_t(base + l), zb[l], eb[l]});
      }
    };
    int64_t i = 0;
    for (; i < nv; i += Vec::N) take(Vec::load(x + i), i);
    if (tail) take(load_tail(x + i, tail, -INFINITY), i);
  };
  compact(cut);
  // Top-p renormalizes over the whole top-k set, so with top-p that set must be
  // among the candidates: if a min-p cut left fewer than k, cut at the ladder
  // rung instead; if even that is short (never expected), take every finite token.
  if (k > 0 && use_p && int64_t(c.size()) < k && cut > -INFINITY) {
    cut = ladder_cut;
    compact(cut);
    if (int64_t(c.size()) < k && cut > -INFINITY) compact(cut = -INFINITY);
  }
  // The ladder's float masses may be a hair off: if the cut holds less than the
  // nucleus mass, take every finite token (with min-p the nucleus may end below
  // the cut: min-p then decides, see the select below).
  if (k == 0 && use_p && prm.min_p <= 0.f && cut > -INFINITY) {
    double cm = 0.0;
    for (const Cand& q : c) cm += q.e;
    if (cm < double(prm.top_p) * plan.sum_all) compact(cut = -INFINITY);
  }
  const int64_t n = int64_t(c.size());  // >= 1: the max token has z = 0

  // ---- select: top-k, then top-p on the renormalized top-k set
  float tk = -INFINITY;
  if (k > 0 && k < n) {
    s.vals.resize(n);
    s.wts.assign(n, 1.0f);
    for (int64_t i = 0; i < n; ++i) s.vals[i] = c[i].z;
    tk = weighted_select(s.vals.data(), s.wts.data(), n, double(k));
  }
  float tp = -INFINITY;
  if (use_p) {
    if (k > 0) shell_top = INFINITY;
    for (int attempt = 0; attempt < 2; ++attempt) {
      s.vals.clear();
      s.wts.clear();
      double sum_k = 0.0, above = 0.0;
      for (const Cand& q : c)
        if (q.z >= shell_top) {
          above += q.e;
        } else if (q.z >= tk) {
          s.vals.push_back(q.z);
          s.wts.push_back(q.e);
        }
      for (float w : s.wts) sum_k += w;
      sum_k += above;
      // without top-k the nucleus is a share of the whole row's mass
      const double target = double(prm.top_p) * (k > 0 ? sum_k : plan.sum_all);
      if (above >= target) {  // float ladder vs double sums disagree: no shell
        shell_top = INFINITY;
        continue;
      }
      tp = s.vals.empty() ? shell_top
                          : weighted_select(s.vals.data(), s.wts.data(), int64_t(s.vals.size()),
                                            target, above);
      if (k == 0 && sum_k < target) tp = -INFINITY;  // rounding: keep every candidate
      break;
    }
  }
  // kept tokens are candidates (z >= cut) passing both thresholds
  plan.thresh = std::max(std::max(tk, tp), cut);
  double kept = 0.0;
  for (const Cand& q : c)
    if (q.z >= plan.thresh && q.e >= plan.min_p) kept += q.e;
  plan.kept_mass = kept;
  return plan;
}

// First index of the row equal to m (the argmax, first on ties).
template <typename T>
int64_t first_index_of(const T* x, int64_t V, float m) {
  const int64_t nv = V - V % Vec::N;
  const Vec vm = Vec::set1(m);
  int64_t i = 0;
  for (; i < nv; i += Vec::N) {
    uint32_t msk = lanes_eq(Vec::load(x + i), vm);
    if (msk) return i + __builtin_ctz(msk);
  }
  for (; i < V; ++i)
    if (to_f32(x[i]) == m) return i;
  return 0;
}

// sum exp(x - m) over the row (the temperature-1 normalizer).
template <typename T>
double raw_mass(const T* x, int64_t V, float m) {
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  const Vec vm = Vec::set1(m);
  Vec sum = Vec::zero();
  int64_t i = 0;
  for (; i < nv; i += Vec::N) sum = sum + vexp(Vec::load(x + i) - vm);
  if (tail) sum = sum + vexp(load_tail(x + i, tail, -INFINITY) - vm);
  return sum.reduce_add();
}

// Inverse-CDF draw over the whole row (no filter): first index whose running
// mass exceeds target. Whole vectors are skipped by their lane sum.
template <typename T>
int64_t draw_whole_row(const T* x, int64_t V, const RowPlan& plan, double target) {
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  const Vec vm = Vec::set1(plan.m), vit = Vec::set1(plan.inv_t);
  double cum = 0.0;
  int64_t last_pos = 0;
  float eb[Vec::N];
  auto scan = [&](Vec v, int64_t base, int lanes) -> int64_t {
    Vec e = vexp((v - vm) * vit);
    const double bs = e.reduce_add();
    if (bs > 0.0) {
      e.store(eb);
      for (int l = lanes - 1; l >= 0; --l)
        if (eb[l] > 0.f) {
          last_pos = base + l;
          break;
        }
    }
    if (cum + bs <= target) {
      cum += bs;
      return -1;
    }
    for (int l = 0; l < lanes; ++l) {
      cum += eb[l];
      if (eb[l] > 0.f && cum > target) return base + l;
    }
    return -1;
  };
  int64_t i = 0;
  for (; i < nv; i += Vec::N)
    if (int64_t r = scan(Vec::load(x + i), i, Vec::N); r >= 0) return r;
  if (tail)
    if (int64_t r = scan(load_tail(x + i, tail, -INFINITY), i, tail); r >= 0) return r;
  return last_pos;  // rounding put the target past the end
}

// Sample one token for each of `rows` rows. Outputs: ids, log-probs (filtered and
// raw, when want_lp) and a status per row (RowStatus); rows with a bad status
// get id 0 and the caller raises.
template <typename T>
void sample_rows(const T* logits, int64_t rows, int64_t V, const float* temperature,
                 const int64_t* top_k, const float* top_p, const float* min_p,
                 const double* uniforms, bool want_lp, int64_t* ids, float* lp, float* raw_lp,
                 int32_t* status) {
  Scratch s;
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * V;
    const RowParams prm{temperature[r], top_k[r], top_p[r], min_p[r]};
    RowPlan plan = plan_row(x, V, prm, want_lp, s);
    status[r] = plan.status;
    ids[r] = 0;
    lp[r] = raw_lp[r] = 0.f;
    if (plan.status != kOk) continue;
    int64_t id;
    float z_id = 0.f;
    if (prm.temperature == 0.f) {
      id = first_index_of(x, V, plan.m);
      if (want_lp) plan.sum_raw = raw_mass(x, V, plan.m);
    } else if (plan.whole_row) {
      id = draw_whole_row(x, V, plan, uniforms[r] * plan.kept_mass);
      z_id = (to_f32(x[id]) - plan.m) * plan.inv_t;
    } else {
      const double target = uniforms[r] * plan.kept_mass;
      double cum = 0.0;
      const Cand* pick = nullptr;
      for (const Cand& q : s.cands) {
        if (q.z < plan.thresh || q.e < plan.min_p || q.e <= 0.f) continue;
        pick = &q;  // the last kept token, if rounding runs past the end
        cum += q.e;
        if (cum > target) break;
      }
      id = pick->idx;
      z_id = pick->z;
    }
    ids[r] = id;
    if (want_lp) {
      lp[r] = prm.temperature == 0.f ? 0.f : float(double(z_id) - std::log(plan.kept_mass));
      raw_lp[r] = float(double(to_f32(x[id]) - plan.m) - std::log(plan.sum_raw));
    }
  }
}

// The filtered logits: x / temperature where kept, -inf elsewhere (float32 out).
template <typename T>
void filter_rows(const T* logits, int64_t rows, int64_t V, const float* temperature,
                 const int64_t* top_k, const float* top_p, const float* min_p, float* out,
                 int32_t* status) {
  Scratch s;
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * V;
    float* o = out + r * V;
    const RowParams prm{temperature[r], top_k[r], top_p[r], min_p[r]};
    RowPlan plan = plan_row(x, V, prm, false, s);
    status[r] = plan.status;
    if (plan.status != kOk) {
      for (int64_t i = 0; i < V; ++i) o[i] = -INFINITY;
      continue;
    }
    const Vec vm = Vec::set1(plan.m), vit = Vec::set1(plan.inv_t), vt = Vec::set1(prm.temperature);
    const Vec vth = Vec::set1(plan.thresh), vmp = Vec::set1(plan.min_p);
    const Vec ninf = Vec::set1(-INFINITY);
    // same z and exp(z) as plan_row computed, so the same tokens pass
    auto put = [&](Vec v) {
      Vec z = (v - vm) * vit;
      Vec keep = select_lt(z, vth, ninf, v / vt);
      return select_lt(vexp(z), vmp, ninf, keep);
    };
    int64_t i = 0;
    for (; i < nv; i += Vec::N) put(Vec::load(x + i)).store(o + i);
    if (tail) put(load_tail(x + i, tail, -INFINITY)).store_partial(o + i, tail);
  }
}
