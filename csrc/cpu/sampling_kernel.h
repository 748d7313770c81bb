// csrc/cpu/sampling_kernel.h -- fused temperature / top-k / top-p / min-p sampling, per row.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// Semantics are those of minigpt/kernels/reference/sampling.py (Hugging Face's
// warper order); this file finds the same kept set without sorting the row.
// z = (x - max) / temperature; every filter keeps {z >= threshold}.
//
//   pass 1  max m of the row (and whether it holds NaN / +inf). With top-k, also
//           the maxima of S segments per lane: the k-th largest of those S*N
//           distinct tokens is reached by >= k tokens, a safe top-k cut.
//   top-k   pass 2 compacts the tokens above the cut (few) into an
//           (index, z, exp z) buffer in vocabulary order; top-k and then top-p
//           thresholds by weighted quickselect on it; min-p is exp(z) >= min_p.
//   top-p   pass 2: S = sum exp(z) and a "ladder" of masses above a dozen depths
//   alone   (only for vectors reaching the lowest rung). The threshold lies in
//           one shell between rungs: compact it, narrow it by vectorized
//           16-rung ladders, finish with the exact quickselect.
//   draw    inverse CDF with the caller's uniform u: walk the kept tokens in
//           vocabulary order until the running mass exceeds u * (kept mass).
//
// Without a top-k cut the draw walks the row itself, skipping groups of vectors
// by their sum. Everything is float32 except running sums (double).

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

// acc + (z >= r ? v : 0), lane-wise.
#if defined(MG_ISA_AVX512)
inline Vec add_if_ge(Vec acc, Vec z, Vec r, Vec v) {
  return _mm512_mask_add_ps(acc.r, _mm512_cmp_ps_mask(z.r, r.r, _CMP_GE_OQ), acc.r, v.r);
}
// Store the lanes of a and b selected by msk contiguously at pa / pb (may write
// up to N floats: callers leave N slots of slack).
inline void compress_store2(float* pa, float* pb, Vec a, Vec b, uint32_t msk) {
  _mm512_storeu_ps(pa, _mm512_maskz_compress_ps(__mmask16(msk), a.r));
  _mm512_storeu_ps(pb, _mm512_maskz_compress_ps(__mmask16(msk), b.r));
}
#elif defined(MG_ISA_AVX2)
inline Vec add_if_ge(Vec acc, Vec z, Vec r, Vec v) {
  return _mm256_add_ps(acc.r, _mm256_and_ps(_mm256_cmp_ps(z.r, r.r, _CMP_GE_OQ), v.r));
}
#else
inline Vec add_if_ge(Vec acc, Vec z, Vec r, Vec v) { return z.r >= r.r ? acc.r + v.r : acc.r; }
#endif
#if !defined(MG_ISA_AVX512)
inline void compress_store2(float* pa, float* pb, Vec a, Vec b, uint32_t msk) {
  float ab[Vec::N], bb[Vec::N];
  a.store(ab);
  b.store(bb);
  while (msk) {
    const int l = __builtin_ctz(msk);
    msk &= msk - 1;
    *pa++ = ab[l];
    *pb++ = bb[l];
  }
}
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
  std::vector<float> vals, wts, shell_z, shell_e, cz, ce;
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

// sum exp(x - m) over the row (the temperature-1 normalizer), in float lanes
// flushed to double every 4096 elements for accuracy.
template <typename T>
double raw_mass(const T* x, int64_t V, float m) {
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  const Vec vm = Vec::set1(m);
  double total = 0.0;
  int64_t i = 0;
  while (i < nv) {
    const int64_t end = std::min(nv, i + 256 * Vec::N);
    Vec sum = Vec::zero();
    for (; i < end; i += Vec::N) sum = sum + vexp(Vec::load(x + i) - vm);
    total += sum.reduce_add();
  }
  if (tail) total += vexp(load_tail(x + i, tail, -INFINITY) - vm).reduce_add();
  return total;
}

// Threshold T (kept = {v >= T}, as weighted_select) over n values with weights,
// `above` = weight known to be above all of them. Large inputs are first
// narrowed by vectorized 16-rung ladders between their min and max, each
// keeping only the bracket that holds the threshold.
inline float refine_select(float* v, float* w, int64_t n, double target, double above) {
  constexpr int R = 16;
  while (n > 256) {
    Vec lo = Vec::set1(INFINITY), hi = Vec::set1(-INFINITY);
    const int64_t nv = n - n % Vec::N;
    for (int64_t i = 0; i < nv; i += Vec::N) {
      Vec a = Vec::load(v + i);
      lo = vmin(lo, a);
      hi = vmax(hi, a);
    }
    float vlo = INFINITY, vhi = -INFINITY;
    {
      float lb[Vec::N], hb[Vec::N];
      lo.store(lb);
      hi.store(hb);
      for (int l = 0; l < Vec::N; ++l) {
        vlo = std::min(vlo, lb[l]);
        vhi = std::max(vhi, hb[l]);
      }
      for (int64_t i = nv; i < n; ++i) {
        vlo = std::min(vlo, v[i]);
        vhi = std::max(vhi, v[i]);
      }
    }
    if (!(vlo < vhi)) break;  // all equal: the exact select handles it
    // rungs r[1..R] from just below vhi down to vlo (r[R] = vlo: everything)
    float r[R + 1];
    r[0] = INFINITY;
    for (int j = 1; j <= R; ++j) r[j] = vhi - (vhi - vlo) * (float(j) / R);
    r[R] = vlo;
    Vec acc[R];
    Vec rv[R];
    for (int j = 0; j < R; ++j) {
      acc[j] = Vec::zero();
      rv[j] = Vec::set1(r[j + 1]);
    }
    for (int64_t i = 0; i < nv; i += Vec::N) {
      Vec a = Vec::load(v + i), b = Vec::load(w + i);
      for (int j = 0; j < R; ++j) acc[j] = add_if_ge(acc[j], a, rv[j], b);
    }
    double m[R + 1];
    m[0] = 0.0;
    for (int j = 0; j < R; ++j) {
      double t = acc[j].reduce_add();
      for (int64_t i = nv; i < n; ++i)
        if (v[i] >= r[j + 1]) t += w[i];
      m[j + 1] = t;
    }
    int j = 1;
    while (j < R && above + m[j] < target) ++j;
    // the threshold lies in [r[j], r[j-1]): keep that bracket, the rest above
    const float blo = r[j], bhi = r[j - 1];
    int64_t out = 0;
    for (int64_t i = 0; i < n; ++i)
      if (v[i] >= blo && v[i] < bhi) {
        v[out] = v[i];
        w[out] = w[i];
        ++out;
      }
    above += m[j - 1];
    if (out == n) break;  // no progress (should not happen): exact select
    n = out;
    if (n == 0) return bhi;
  }
  return weighted_select(v, w, n, target, above);
}

// Top-p alone: compact the shell (cut <= z < top) into s.vals/s.wts and find
// the nucleus threshold there; `above` is the mass with z >= top. Returns -inf
// if the sums disagree (rounding) and the general path should decide.
template <typename T>
float shell_threshold(const T* x, int64_t V, const RowPlan& plan, float cut, float top,
                      double above, double target, Scratch& s, double& kept_mass) {
  if (above >= target) return -INFINITY;
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  const Vec vm = Vec::set1(plan.m), vit = Vec::set1(plan.inv_t);
  const Vec vlo = Vec::set1(cut), vhi = Vec::set1(top);
  if (s.cz.size() < size_t(V + Vec::N)) {  // grown once, never shrunk: no re-zeroing
    s.cz.resize(V + Vec::N);
    s.ce.resize(V + Vec::N);
  }
  float* pz = s.cz.data();
  float* pe = s.ce.data();
  int64_t n = 0;
  auto take = [&](Vec v) {
    Vec z = (v - vm) * vit;
    uint32_t msk = lanes_ge(z, vlo) & ~lanes_ge(z, vhi);
    if (!msk) return;
    compress_store2(pz + n, pe + n, z, vexp(z), msk);
    n += __builtin_popcount(msk);
  };
  int64_t i = 0;
  for (; i < nv; i += Vec::N) take(Vec::load(x + i));
  if (tail) take(load_tail(x + i, tail, -INFINITY));
  double shell = 0.0;
  for (int64_t j = 0; j < n; ++j) shell += pe[j];
  if (above + shell < target) return -INFINITY;
  if (n == 0) return top;
  // the selection reorders its input: keep the shell to sum the kept mass after
  s.shell_z.assign(pz, pz + n);
  s.shell_e.assign(pe, pe + n);
  const float tp = refine_select(pz, pe, n, target, above);
  double kept = above;
  for (int64_t j = 0; j < n; ++j)
    if (s.shell_z[j] >= tp) kept += s.shell_e[j];
  kept_mass = kept;
  return tp;
}

// Pass 2 over full vectors [from, to) (plus `tail` lanes at `to`): adds sum
// exp(z) (and sum exp(x - m) if Raw) to total(_raw) and the ladder (Mode 1:
// counts, 2: masses, 0: none) to lad. Accumulators are locals of this small
// function so they stay in registers.
template <int Mode, bool Raw, typename T>
void pass2_block(const T* x, int64_t from, int64_t to, int tail, Vec vmx, Vec vit,
                 double& total, double& total_raw, double* lad) {
  Vec acc[kRungs];
  for (int j = 0; j < kRungs; ++j) acc[j] = Vec::zero();
  Vec sum = Vec::zero(), sum_raw = Vec::zero();
  const Vec guard = Vec::set1(-kRungDepth[kRungs - 1]);
  auto step = [&](Vec v) __attribute__((always_inline)) {
    Vec d = v - vmx;
    Vec z = d * vit;
    Vec e = vexp(z);
    sum = sum + e;
    if constexpr (Raw) sum_raw = sum_raw + vexp(d);
    if constexpr (Mode != 0) {
      if (lanes_ge(z, guard)) {
        const Vec w = Mode == 1 ? Vec::set1(1.0f) : e;
        for (int j = 0; j < kRungs; ++j)
          acc[j] = add_if_ge(acc[j], z, Vec::set1(-kRungDepth[j]), w);
      }
    }
  };
  for (int64_t i = from; i < to; i += Vec::N) step(Vec::load(x + i));
  if (tail) step(load_tail(x + to, tail, -INFINITY));
  total += sum.reduce_add();
  if constexpr (Raw) total_raw += sum_raw.reduce_add();
  if constexpr (Mode != 0)
    for (int j = 0; j < kRungs; ++j) lad[j] += acc[j].reduce_add();
}

// Passes 1-3 and the threshold selection for one row (see the file comment).
template <typename T>
RowPlan plan_row(const T* x, int64_t V, const RowParams& prm, bool want_raw, Scratch& s) {
  RowPlan plan;
  const int64_t nv = V - V % Vec::N;
  const int tail = int(V - nv);
  // ---- pass 1: max, bad values; for top-k also the maxima of S segments per
  // lane. Those are S * N distinct tokens of the row, so the k-th largest of
  // them is a value that at least k tokens reach: a safe cut for top-k, found
  // without a second pass (S * N >= 2k keeps the cut close to the k-th value).
  const int64_t k_req = (prm.temperature > 0.f && prm.top_k > 0 && prm.top_k < V) ? prm.top_k : 0;
  const int64_t nvec = nv / Vec::N;
  int64_t segs = k_req > 0 && k_req <= 1024 ? (2 * k_req + Vec::N - 1) / Vec::N : 0;
  if (segs > nvec / 4) segs = 0;  // short row: every token is a candidate anyway
  float seg_cut_x = -INFINITY;
  {
    Vec vm = Vec::set1(-INFINITY);
    uint32_t bad = 0;
    int64_t i = 0;
    if (segs > 0) {
      s.vals.resize(segs * Vec::N);
      const int64_t seg_len = (nvec / segs) * Vec::N;
      for (int64_t g = 0; g < segs; ++g) {
        const int64_t end = g == segs - 1 ? nv : i + seg_len;
        Vec sm = Vec::set1(-INFINITY);
        for (; i < end; i += Vec::N) {
          Vec v = Vec::load(x + i);
          bad |= lanes_bad(v);
          sm = vmax(sm, v);
        }
        sm.store(s.vals.data() + g * Vec::N);
        vm = vmax(vm, sm);
      }
    } else {
      for (; i < nv; i += Vec::N) {
        Vec v = Vec::load(x + i);
        bad |= lanes_bad(v);
        vm = vmax(vm, v);
      }
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
    if (segs > 0) {
      auto b = s.vals.begin();
      std::nth_element(b, b + (k_req - 1), s.vals.end(), std::greater<float>());
      seg_cut_x = s.vals[k_req - 1];
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

  // ---- pass 2: total mass (+ raw mass) and the ladder (counts for top-k,
  // masses for top-p alone)
  const bool seg_mode = segs > 0;  // top-k cut already known from pass 1
  const bool count_ladder = k > 0 && !seg_mode, mass_ladder = k == 0 && use_p;
  double lad[kRungs] = {};
  if (seg_mode) {
    // top-k needs neither the row's total mass nor a ladder: the masses that
    // matter are those of the top-k set, summed from the candidates
    if (want_raw) plan.sum_raw = raw_mass(x, V, plan.m);
  }
  if (!seg_mode) {
    // float lanes summed in blocks, blocks summed in double: the total must be
    // accurate to ~1e-7 because the draw and the top-p target are shares of it
    double total = 0.0, total_raw = 0.0;
    auto run = [&]<int Mode, bool Raw>() {
      constexpr int64_t kBlock = 256 * Vec::N;
      for (int64_t i = 0; i < nv; i += kBlock)
        pass2_block<Mode, Raw>(x, i, std::min(nv, i + kBlock), 0, vmx, vit, total, total_raw,
                               lad);
      if (tail) pass2_block<Mode, Raw>(x, nv, nv, tail, vmx, vit, total, total_raw, lad);
    };
    const int mode = count_ladder ? 1 : mass_ladder ? 2 : 0;
    if (want_raw_sum) {
      if (mode == 1) run.template operator()<1, true>();
      else if (mode == 2) run.template operator()<2, true>();
      else run.template operator()<0, true>();
    } else {
      if (mode == 1) run.template operator()<1, false>();
      else if (mode == 2) run.template operator()<2, false>();
      else run.template operator()<0, false>();
    }
    plan.sum_all = total;
    plan.sum_raw = want_raw_sum ? total_raw : plan.sum_all;
  }
  if (k == 0 && !use_p && prm.min_p <= 0.f) {  // plain temperature sampling
    plan.whole_row = true;
    plan.kept_mass = plan.sum_all;
    return plan;
  }

  // ---- choose the cut: the smallest rung that surely holds the kept set
  float cut = -INFINITY;  // -inf: every finite token is a candidate
  float shell_top = INFINITY;
  double shell_above = 0.0;
  if (seg_mode) {
    cut = seg_cut_x == -INFINITY ? -INFINITY : (seg_cut_x - plan.m) * inv_t;
  } else if (k > 0) {
    for (int j = 0; j < kRungs; ++j)
      if (lad[j] >= double(k)) {
        cut = -kRungDepth[j];
        break;
      }
  } else if (use_p) {
    const double target = double(prm.top_p) * plan.sum_all;
    for (int j = 0; j < kRungs; ++j)
      if (lad[j] >= target) {
        cut = -kRungDepth[j];
        // tokens above the previous rung are surely in the nucleus: only the
        // shell between the two rungs needs the selection
        if (j > 0) {
          shell_top = -kRungDepth[j - 1];
          shell_above = lad[j - 1];
        }
        break;
      }
    // Top-p alone: find the threshold inside the shell (often thousands of
    // tokens) by refining ladders, and draw by walking the row.
    if (prm.min_p <= 0.f && cut > -INFINITY) {
      const float tp =
          shell_threshold(x, V, plan, cut, shell_top, shell_above, target, s, plan.kept_mass);
      if (tp > -INFINITY) {
        plan.thresh = tp;
        plan.whole_row = true;
        return plan;
      }
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

// Inverse-CDF draw over the whole row (no candidate buffer): first index with
// z >= plan.thresh whose running mass exceeds target. Groups of four vectors
// are skipped by their sum; only the group holding the target is walked lane by
// lane (in double).
template <typename T>
int64_t draw_whole_row(const T* x, int64_t V, const RowPlan& plan, double target) {
  const int64_t nv = V - V % Vec::N;
  const Vec vm = Vec::set1(plan.m), vit = Vec::set1(plan.inv_t);
  const Vec vth = Vec::set1(plan.thresh), zero = Vec::zero();
  auto kept_e = [&](Vec v) {
    Vec z = (v - vm) * vit;
    return select_lt(z, vth, zero, vexp(z));
  };
  auto lanes = [&](int64_t from, int64_t to, double& cum, bool find) -> int64_t {
    // walk [from, to) lane by lane; with !find return the last token with mass
    int64_t last = -1;
    float eb[Vec::N];
    for (int64_t i = from; i < to; i += Vec::N) {
      const int n = int(std::min<int64_t>(Vec::N, to - i));
      (n == Vec::N ? kept_e(Vec::load(x + i)) : kept_e(load_tail(x + i, n, -INFINITY)))
          .store(eb);
      for (int l = 0; l < n; ++l) {
        if (eb[l] <= 0.f) continue;
        cum += eb[l];
        last = i + l;
        if (find && cum > target) return last;
      }
    }
    return find ? -1 : last;
  };
  constexpr int64_t G = 4 * Vec::N;
  double cum = 0.0;
  int64_t last_group = -1;
  int64_t i = 0;
  for (; i + G <= nv; i += G) {
    Vec e = kept_e(Vec::load(x + i)) + kept_e(Vec::load(x + i + Vec::N)) +
            kept_e(Vec::load(x + i + 2 * Vec::N)) + kept_e(Vec::load(x + i + 3 * Vec::N));
    const double gs = e.reduce_add();
    if (gs <= 0.0) continue;
    last_group = i;
    if (cum + gs <= target) {
      cum += gs;
      continue;
    }
    double c = cum;
    if (int64_t r = lanes(i, i + G, c, true); r >= 0) return r;
    cum += gs;  // rounding: the group's lanes fell just short; go on
  }
  if (i < V) {
    double c = cum;
    if (int64_t r = lanes(i, V, c, true); r >= 0) return r;
    double d = 0.0;
    if (int64_t r = lanes(i, V, d, false); r >= 0) return r;
  }
  if (last_group >= 0) {  // rounding put the target past the end
    double d = 0.0;
    return lanes(last_group, last_group + G, d, false);
  }
  return 0;
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
