// syncbn's native CPU kernels (issue 26): the kernel interface of syncbn/kernels/ as torch
// operators (namespace syncbn_native), one pass over memory each.
//
// Layouts. Every input is read as one of two dense forms:
//   planar      (N, C, S) contiguous: each (sample, channel) is a run of S contiguous values;
//   interleaved (R, C) rows, R = N * S: channels_last, channels_last_3d, (N, C), and any input
//               whose channel dim is innermost and dense (also contiguous input with S == 1).
// Anything else is copied to torch's suggested memory format first; outputs take
// empty_like(x)'s layout.
//
// Precision. fp32/fp16/bf16 input is computed in fp32 (as torch's BatchNorm does), with every
// long sum in fp64: fp32 partials of at most kFlush vectors are added to fp64 lanes, so a sum is
// good to a few fp32 ulps of its terms, however long. The statistics are two-pass per block of
// values that stays in cache (the second pass reads L1/L2, not memory): pass 1 sums every value
// in fp64 (the mean is fp64-accurate), pass 2 sums the squares about the block's mean rounded
// to fp32; blocks merge by Chan's formula in fp64, the mean carried as hi + lo so that merging
// adds no rounding. fp64 input is computed in fp64 with compensated sums. The elementwise passes
// take x - mean before scaling (x - hi is exact for x near the mean; lo folds into the shift).
//
// Work split. Blocks are grouped into tasks whose number depends on the shape alone, never on
// the thread count (at::parallel_for, torch's own threads): results are the same, bitwise, at any
// torch.get_num_threads().
//
// Build. Two parts, compiled at once when SYNCBN_NATIVE_PART is 1 and 2 (syncbn/kernels/native.py
// does) and linked together, or in one compilation without it: the kernels, which need only
// at::parallel_for, and the operators, whose torch headers cost as much to compile as all the
// kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

// The interface between the two parts: plain memory, no tensors.
namespace syncbn_native {

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };

// A dense input: planar (N, C, S) contiguous, or interleaved (R, C) rows (n = R, s = 1).
struct Shape {
  int64_t n = 0;  // samples (planar) or rows (interleaved)
  int64_t c = 0;  // channels
  int64_t s = 1;  // run length (planar); 1 (interleaved)
  bool interleaved = false;
  int64_t count() const { return n * s; }  // values per channel
  int64_t numel() const { return n * c * s; }
};

// Per channel: the mean as hi + lo and M2 = sum (x - mean)^2 (count() > 0, c > 0).
void local_moments(DType dtype, const void* x, const Shape& shape, double* hi, double* lo, double* m2);

// Per channel: sum dy and sum dy * (x - mean), the mean rounded to the accumulation dtype first.
void gradient_sums(DType dtype, const void* dy, const void* x, const Shape& shape, const double* mean,
                   double* sum_dy, double* sum_dyx);

// out = [gain * dy +] (x - mean) * scale + shift per channel (gain, dy: both or neither), in the
// accumulation dtype, rounded once to x's; round_mean: the mean rounded to the accumulation dtype.
void affine(DType dtype, const void* x, const void* dy, void* out, const Shape& shape, const double* mean,
            const double* scale, const double* shift, const double* gain, bool round_mean);

// In-place activated BatchNorm (syncbn.activated). activation: 0 identity, 1 leaky_relu
// (parameter: its slope), 2 elu (parameter: alpha); y may be x (each value is read, then written).
// y = act((x - mean) * scale + shift) per channel, one pass.
void normalize_activate(DType dtype, const void* x, void* y, const Shape& shape, const double* mean,
                        const double* scale, const double* shift, int activation, double parameter);

// Per channel, from the output y and dy (z = act^-1(y), dz = dy * act'(z), xhat = (z - bias) /
// weight, or z without weight): sum dz and sum dz * xhat, one pass.
void activated_sums(DType dtype, const void* dy, const void* y, const Shape& shape, const double* weight,
                    const double* bias, int activation, double parameter, double* sum_dz, double* sum_dz_xhat);

// dx = gain * (dz - mean_dz - xhat * mean_dz_xhat) per channel, from y and dy, one pass.
void activated_input_grad(DType dtype, const void* dy, const void* y, void* dx, const Shape& shape,
                          const double* weight, const double* bias, const double* gain, const double* mean_dz,
                          const double* mean_dz_xhat, int activation, double parameter);

}  // namespace syncbn_native

#if !defined(SYNCBN_NATIVE_PART) || SYNCBN_NATIVE_PART == 1
// ===== Part 1: the kernels (plain memory; the only torch header is at::parallel_for's) =====
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using syncbn_native::Shape;

// Values per two-pass block (16 KiB of fp32: the second pass reads L1).
constexpr int64_t kBlock = 4096;
// Rows per block in the interleaved layout, at least (wide rows: the block's per-channel
// bookkeeping is amortized over this many values per channel; the block then lives in L2).
constexpr int64_t kMinBlockRows = 64;
// Interleaved input with fewer rows than this and at least two chunks of kChunkChannels channels
// (whole vectors) is split among tasks by channels, not by rows (see interleaved_moments).
constexpr int64_t kChannelSplitRows = 1024;
// Rows of interleaved input a reduction takes together per channel vector: the gradient sums'
// fp64 sums are written once per kRowGroup * kFlush rows, the moments' first pass's once per
// kRowGroup rows.
constexpr int64_t kRowGroup = 4;
// Values per task at least, and tasks at most: enough tasks to balance many threads, few
// enough partial results to keep their merge negligible.
constexpr int64_t kTaskValues = 16384;
constexpr int64_t kMaxTasks = 256;
// Below this many values per parallel_for, one thread does it all (a fork costs microseconds).
constexpr int64_t kParallelValues = 32768;

// --- element access: load as the accumulation type, store rounded to the element type -------

// fp32 and fp64 are their own storage and accumulation types; fp16 and bf16 below.
template <typename T>
struct Elem {
  using raw = T;
  using acc = T;
  static inline T load(raw v) { return v; }
  static inline raw store(T v) { return v; }
};

template <>
struct Elem<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static inline float load(raw v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  // Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rounding.
  static inline raw store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return f != f ? static_cast<raw>(0x7fc0) : static_cast<raw>(rounded);
  }
};

#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
// The compiler's own half type: its conversions are the hardware's (F16C / AVX512-FP16 / NEON).
template <>
struct Elem<c10::Half> {
  using raw = _Float16;
  using acc = float;
  static inline float load(raw v) { return static_cast<float>(v); }
  static inline raw store(float v) { return static_cast<raw>(v); }
};
#else
template <>
struct Elem<c10::Half> {
  using raw = c10::Half;
  using acc = float;
  static inline float load(raw v) { return static_cast<float>(v); }
  static inline raw store(float v) { return static_cast<raw>(v); }
};
#endif

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs f(begin, end) over [0, tasks), in parallel when there is enough work.
template <typename F>
void for_tasks(int64_t tasks, int64_t values_per_task, const F& f) {
  if (tasks <= 0) return;
  int64_t grain = std::max<int64_t>(1, kParallelValues / std::max<int64_t>(1, values_per_task));
  if (tasks <= grain) {
    f(0, tasks);
  } else {
    at::parallel_for(0, tasks, grain, f);
  }
}

// Tasks for `values` values in `units` indivisible units: by the shape only.
int64_t task_count(int64_t values, int64_t units) {
  return std::max<int64_t>(1, std::min({units, kMaxTasks, values / kTaskValues}));
}

// Memory a kernel needs for one call, kept by the thread for its next call when it is at most
// kKeptScratchBytes: the kernels run on the same shapes step after step, and a fresh allocation
// of this size would be a fresh mapping, page faults included, every time. Not zeroed. kSlot
// tells apart the buffers one thread holds at once.
constexpr size_t kKeptScratchBytes = size_t(16) << 20;

template <typename T, int kSlot>
class Scratch {
 public:
  explicit Scratch(size_t n) {
    thread_local std::vector<T> kept;
    std::vector<T>& buffer = n * sizeof(T) <= kKeptScratchBytes ? kept : own_;
    if (buffer.size() < n) buffer.resize(n);
    data_ = buffer.data();
  }
  T* data() const { return data_; }

 private:
  std::vector<T> own_;
  T* data_;
};

// --- lanes: kLanes values at once, in GCC/Clang vector extensions (any target) ------------------

// One native fp32 vector (16 lanes with AVX-512, else 8), accumulated into fp64 in two halves
// of one native fp64 vector each (wider generic vectors would be split through the stack).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// Vectors summed into an fp32 lane before it is added to its fp64 lane: each fp32 partial sums
// at most kFlush terms, so it is accurate to a few ulps of fp32 (and cannot overflow where the
// terms do not).
constexpr int kFlush = 4;
// Channels per task, about, where interleaved input is split by channels: whole vectors, a few
// hundred bytes of each row.
constexpr int64_t kChunkChannels = 8 * kLanes;

typedef float f32v __attribute__((vector_size(kLanes * sizeof(float))));
typedef float f32h __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef double f64h __attribute__((vector_size(kLanes / 2 * sizeof(double))));
typedef uint16_t u16v __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t u32v __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// kLanes fp64 lanes, as two native vectors.
struct f64v {
  f64h lo = {}, hi = {};
};

inline f32v load_f32(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32v load_f32(const uint16_t* p) {  // bf16: its bits are the top half of an fp32's
#if defined(__AVX512F__)
  // One widening load (the generic form below compiles to two half-width ones).
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<f32v>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#else
  u16v h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<f32v>(__builtin_convertvector(h, u32v) << 16);
#endif
}

template <typename R>
inline f32v load_f32(const R* p) {  // fp16
#if defined(__AVX512F__)
  return reinterpret_cast<f32v>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__) && defined(__AVX__)
  return reinterpret_cast<f32v>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  f32v v;
  for (int j = 0; j < kLanes; ++j) v[j] = static_cast<float>(p[j]);
  return v;
#endif
}

inline void store_f32(float* p, f32v v) { std::memcpy(p, &v, sizeof v); }

inline void store_f32(uint16_t* p, f32v v) {  // bf16, rounded as Elem<c10::BFloat16>::store
  const u32v bits = reinterpret_cast<u32v>(v);
  const u32v rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const u32v nan = reinterpret_cast<u32v>(v != v);  // all ones where v is NaN
  const u16v h = __builtin_convertvector((rounded & ~nan) | (0x7fc0u & nan), u16v);
  std::memcpy(p, &h, sizeof h);
}

template <typename R>
inline void store_f32(R* p, f32v v) {  // fp16, rounded to nearest even
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && defined(__AVX__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int j = 0; j < kLanes; ++j) p[j] = static_cast<R>(v[j]);
#endif
}

inline f64v widen(f32v v) {
#if defined(__AVX512F__)
  // One full-width conversion per half (the generic form compiles to four quarter-width ones).
  const __m512 w = reinterpret_cast<__m512>(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1));
  return {reinterpret_cast<f64h>(_mm512_cvtps_pd(_mm512_castps512_ps256(w))),
          reinterpret_cast<f64h>(_mm512_cvtps_pd(hi))};
#elif defined(__AVX__)
  const __m256 w = reinterpret_cast<__m256>(v);
  return {reinterpret_cast<f64h>(_mm256_cvtps_pd(_mm256_castps256_ps128(w))),
          reinterpret_cast<f64h>(_mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)))};
#else
  f32h lo = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  f32h hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return {__builtin_convertvector(lo, f64h), __builtin_convertvector(hi, f64h)};
#endif
}
inline f64v widen(f64v v) { return v; }

inline f64v& operator+=(f64v& a, const f64v& b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
inline f64v operator+(f64v a, const f64v& b) { return a += b; }
inline f64v operator-(f64v a, const f64v& b) {
  a.lo -= b.lo;
  a.hi -= b.hi;
  return a;
}
inline f64v operator-(f64v a, double b) {
  a.lo -= b;
  a.hi -= b;
  return a;
}
inline f64v operator*(f64v a, const f64v& b) {
  a.lo *= b.lo;
  a.hi *= b.hi;
  return a;
}

// The lanes' sum, pairwise (a fixed order: results do not depend on timing).
inline double lane_sum(f64v v) {
  f64h s = v.lo + v.hi;
  double lanes[kLanes / 2];
  std::memcpy(lanes, &s, sizeof lanes);
  for (int width = kLanes / 4; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// fp64 lane sums; kCompensated: each carries its own rounding error (TwoSum per addition), so
// the long sums of fp64 input (M2, the residuals) stay good to a few ulps however many terms
// they take. fp32 partials need no more than plain fp64 sums (their own error dominates).
template <bool kCompensated>
struct Sum64v {
  f64v sum, err;
  void add(const f64v& v) {
    if constexpr (kCompensated) {
      const f64v s = sum + v, bb = s - sum;
      err += (sum - (s - bb)) + (v - bb);
      sum = s;
    } else {
      sum += v;
    }
  }
  f64v value() const { return sum + err; }
  double total() const { return lane_sum(sum) + lane_sum(err); }
};

struct Sum64 {
  double sum = 0, err = 0;
  void add(double v) {
    const double s = sum + v, bb = s - sum;
    err += (sum - (s - bb)) + (v - bb);
    sum = s;
  }
  double total() const { return sum + err; }
};

inline f64v load_f64(const double* p) {
  f64v v;
  std::memcpy(&v.lo, p, sizeof v.lo);
  std::memcpy(&v.hi, p + kLanes / 2, sizeof v.hi);
  return v;
}

template <typename R>
inline f64v load_f64(const R* p) {
  return widen(load_f32(p));
}

// P: the dtype partial sums are kept in (float for fp32/fp16/bf16 input, double as the fallback
// and for fp64 input).
template <typename P>
struct Lanes;

template <>
struct Lanes<float> {
  using vec = f32v;
  template <typename R>
  static vec load(const R* p) { return load_f32(p); }
};

template <>
struct Lanes<double> {
  using vec = f64v;
  template <typename R>
  static vec load(const R* p) { return load_f64(p); }
};

inline void store_f64(double* p, const f64v& v) {
  std::memcpy(p, &v.lo, sizeof v.lo);
  std::memcpy(p + kLanes / 2, &v.hi, sizeof v.hi);
}

// p[0:kLanes] += v (fp64 accumulators in memory).
inline void add_to(double* p, const f64v& v) { store_f64(p, load_f64(p) + v); }

// Runs f.template operator()<P>() with P = float for fp32/fp16/bf16 input, and again with
// P = double if that reports a non-finite result (fp32 partials can overflow where fp64 ones
// do not: bf16 values beyond 1e19 have squares beyond fp32's range); fp64 input: P = double.
template <typename T, typename F>
void with_partials(const F& f) {
  if constexpr (std::is_same_v<T, double>) {
    f.template operator()<double>();
  } else {
    if (!f.template operator()<float>()) f.template operator()<double>();
  }
}

// --- moments: (count, mean = hi + lo, M2), merged by Chan's formula ---------------------------

struct Moments {
  double n = 0, hi = 0, lo = 0, m2 = 0;
};

// a + b = s + e exactly (Knuth's TwoSum).
inline void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

// Merges nb values of mean base + delta (delta small against base) and M2 m2b into `acc`.
inline void merge_into(Moments& acc, double nb, double base, double delta, double m2b) {
  if (nb == 0) return;
  if (acc.n == 0) {
    two_sum(base, delta, acc.hi, acc.lo);
    acc.n = nb;
    acc.m2 = m2b;
    return;
  }
  const double n = acc.n + nb, f = nb / n;
  const double d = ((base - acc.hi) - acc.lo) + delta;  // base - hi is exact near the mean
  double s, e;
  two_sum(acc.hi, d * f, s, e);
  acc.hi = s;
  acc.lo += e;
  acc.m2 += m2b + d * d * (acc.n * f);
  acc.n = n;
}

// merge_into for C channels at once, na values each in (hi, lo, m2), nb each from the source:
// source(c, base, delta, m2b) gives channel c's mean base + delta and M2 m2b.
template <typename Source>
inline void merge_channels(int64_t C, double na, double* hi, double* lo, double* m2, double nb,
                           const Source& source) {
  if (nb == 0) return;
  if (na == 0) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      double base, delta, m2b;
      source(c, base, delta, m2b);
      const double s = base + delta, bb = s - base;
      hi[c] = s;
      lo[c] = (base - (s - bb)) + (delta - bb);
      m2[c] = m2b;
    }
    return;
  }
  const double f = nb / (na + nb), g = na * f;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    double base, delta, m2b;
    source(c, base, delta, m2b);
    const double d = ((base - hi[c]) - lo[c]) + delta;
    const double a = hi[c], b = d * f, s = a + b, bb = s - a;
    hi[c] = s;
    lo[c] += (a - (s - bb)) + (b - bb);
    m2[c] += m2b + d * d * g;
  }
}

// Two-pass moments of the values p[run * stride + i], run in [0, runs), i in [0, len), merged
// into acc; false (acc untouched) if a partial sum in P was not finite.
//
// Pass 1 sums every value in fp64 (an fp32 value, and a sum of a block of them, is exact there
// but for the final roundings): the block's mean is that sum / n, fp64-accurate. Pass 2 sums the
// squares about a pivot, the mean rounded to P, in P partials (x - pivot is exact for x near the
// mean); M2 = sum (x - pivot)^2 - n (mean - pivot)^2 with n (mean - pivot) = sum - n pivot taken
// in fp64. fp64 data (P = double) also sums x - pivot in pass 2: that corrects the rounding of
// its pass-1 sum, which no wider type absorbs.
template <typename T, typename P>
bool block_moments(const typename Elem<T>::raw* p, int64_t runs, int64_t stride, int64_t len, Moments& acc) {
  using L = Lanes<P>;
  using V = typename L::vec;
  constexpr bool kResidualPass = std::is_same_v<P, double>;
  f64v wide = {};
  double tail = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const auto* q = p + r * stride;
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) wide += load_f64(q + i);
    for (; i < len; ++i) tail += static_cast<double>(Elem<T>::load(q[i]));
  }
  const double nb = static_cast<double>(runs * len);
  const double sum = lane_sum(wide) + tail;
  const P pivot = static_cast<P>(sum / nb);
  Sum64v<kResidualPass> wide_res, wide_sq;
  Sum64 tail_res, tail_sq;
  for (int64_t r = 0; r < runs; ++r) {
    const auto* q = p + r * stride;
    int64_t i = 0;
    while (i + kLanes <= len) {
      V res = {}, sq = {};
      for (int k = 0; k < kFlush && i + kLanes <= len; ++k, i += kLanes) {
        const V d = L::load(q + i) - pivot;
        if constexpr (kResidualPass) res += d;
        sq += d * d;
      }
      if constexpr (kResidualPass) wide_res.add(widen(res));
      wide_sq.add(widen(sq));
    }
    for (; i < len; ++i) {
      const double d = static_cast<double>(Elem<T>::load(q[i])) - static_cast<double>(pivot);
      tail_res.add(d);
      tail_sq.add(d * d);
    }
  }
  const double res = kResidualPass ? wide_res.total() + tail_res.total() : sum - nb * static_cast<double>(pivot);
  const double sq = wide_sq.total() + tail_sq.total();
  const double delta = res / nb, m2 = sq - res * delta;
  if (std::is_same_v<P, float> && !std::isfinite(m2)) return false;
  merge_into(acc, nb, static_cast<double>(pivot), delta, std::max(m2, 0.0));
  return true;
}

// Per-channel moments of planar input: channel c's values are blocks of whole runs (or pieces
// of one run when a run is longer than a block); tasks own consecutive blocks of one channel.
template <typename T>
void planar_moments(const typename Elem<T>::raw* base, const Shape& sh, double* out_hi, double* out_lo,
                    double* out_m2) {
  const int64_t C = sh.c, N = sh.n, S = sh.s;
  const int64_t pieces = ceil_div(S, kBlock);  // blocks per run (long runs)
  const int64_t runs_per_block = pieces > 1 ? 1 : std::max<int64_t>(1, kBlock / S);
  const int64_t piece_len = ceil_div(S, pieces);
  const int64_t blocks = pieces > 1 ? N * pieces : ceil_div(N, runs_per_block);
  const int64_t per_channel = std::min(blocks, ceil_div(task_count(sh.numel(), C * blocks), C));
  Scratch<Moments, 0> scratch(C * per_channel);
  Moments* parts = scratch.data();
  for_tasks(C * per_channel, sh.count() / per_channel, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / per_channel, part = task % per_channel;
      const int64_t b0 = blocks * part / per_channel, b1 = blocks * (part + 1) / per_channel;
      Moments acc;
      for (int64_t b = b0; b < b1; ++b) {
        with_partials<T>([&]<typename P>() {
          if (pieces > 1) {
            const int64_t n = b / pieces, s0 = (b % pieces) * piece_len;
            const int64_t len = std::min(S, s0 + piece_len) - s0;
            return block_moments<T, P>(base + (n * C + c) * S + s0, 1, 0, len, acc);
          }
          const int64_t n0 = b * runs_per_block, n1 = std::min(N, n0 + runs_per_block);
          return block_moments<T, P>(base + (n0 * C + c) * S, n1 - n0, C * S, S, acc);
        });
      }
      parts[task] = acc;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments out;
    for (int64_t p = 0; p < per_channel; ++p) {
      const Moments& m = parts[c * per_channel + p];
      merge_into(out, m.n, m.hi, m.lo, m.m2);
    }
    out_hi[c] = out.hi;
    out_lo[c] = out.lo;
    out_m2[c] = out.m2;
  }
}

// Scratch of one interleaved task: per channel, in fp64 and in P.
template <typename P>
struct RowScratch {
  Scratch<double, 1> f64;
  Scratch<P, 2> narrow;
  double *sum, *res, *sq;
  P* pivot;
  explicit RowScratch(int64_t C) : f64(3 * C), narrow(C) {
    sum = f64.data();
    res = sum + C;
    sq = res + C;
    pivot = narrow.data();
  }
};

// Two-pass moments of rows [r0, r1) of C channels of interleaved input (a row every `stride`
// values from x), merged into (hi, lo, m2) that hold `na` values per channel; false if a partial
// sum in P was not finite. As block_moments, kLanes channels at a time (pass 1 reads the rows
// from memory, pass 2 from cache), kFlush rows per P partial; channels beyond the last whole
// vector in fp64.
template <typename T, typename P>
bool row_block_moments(const typename Elem<T>::raw* x, int64_t stride, int64_t C, int64_t r0, int64_t r1,
                       RowScratch<P>& w, double na, double* hi, double* lo, double* m2) {
  using L = Lanes<P>;
  using V = typename L::vec;
  constexpr bool kResidualPass = std::is_same_v<P, double>;
  const int64_t whole = C - C % kLanes;
  double *sum = w.sum, *res = w.res, *sq = w.sq;
  P* pivot = w.pivot;
  std::fill(sum, sum + C, 0.0);
  // Pass 1 reads the rows from memory, in order, kRowGroup at a time: the sums stay in L1, read
  // and written once per group.
  for (int64_t r = r0; r < r1; r += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, r1 - r);
    const auto* q = x + r * stride;
    if (rows == kRowGroup) {
      const auto *q1 = q + stride, *q2 = q1 + stride, *q3 = q2 + stride;
      for (int64_t c = 0; c < whole; c += kLanes) {
        add_to(sum + c, (load_f64(q + c) + load_f64(q1 + c)) + (load_f64(q2 + c) + load_f64(q3 + c)));
      }
    } else {
      for (int64_t c = 0; c < whole; c += kLanes) {
        f64v part = load_f64(q + c);
        for (int64_t k = 1; k < rows; ++k) part += load_f64(q + k * stride + c);
        add_to(sum + c, part);
      }
    }
    for (int64_t c = whole; c < C; ++c) {
      double part = 0;
      for (int64_t k = 0; k < rows; ++k) part += static_cast<double>(Elem<T>::load(q[k * stride + c]));
      sum[c] += part;
    }
  }
  const double nb = static_cast<double>(r1 - r0), inverse_nb = 1.0 / nb;
  // Any pivot near the mean serves: a product, not a division per channel.
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) pivot[c] = static_cast<P>(sum[c] * inverse_nb);
  for (int64_t c = 0; c < whole; c += kLanes) {
    const V pv = L::load(pivot + c);
    Sum64v<kResidualPass> wide_res, wide_sq;
    for (int64_t f0 = r0; f0 < r1; f0 += kFlush) {
      V pr = {}, pq = {};
      for (int64_t r = f0; r < std::min(r1, f0 + kFlush); ++r) {
        const V d = L::load(x + r * stride + c) - pv;
        if constexpr (kResidualPass) pr += d;
        pq += d * d;
      }
      if constexpr (kResidualPass) wide_res.add(widen(pr));
      wide_sq.add(widen(pq));
    }
    store_f64(res + c, wide_res.value());
    store_f64(sq + c, wide_sq.value());
  }
  for (int64_t c = whole; c < C; ++c) {
    Sum64 tr, tq;
    for (int64_t r = r0; r < r1; ++r) {
      const double d = static_cast<double>(Elem<T>::load(x[r * stride + c])) - static_cast<double>(pivot[c]);
      tr.add(d);
      tq.add(d * d);
    }
    res[c] = tr.total();
    sq[c] = tq.total();
  }
  if constexpr (std::is_same_v<P, float>) {
    double probe = 0;  // NaN if any sum is not finite (inf * 0)
#pragma omp simd reduction(+ : probe)
    for (int64_t c = 0; c < C; ++c) probe += sq[c] * 0.0;
    if (probe != 0.0) return false;
  }
  // The block's mean is pivot + res / nb (res: sum - nb * pivot, in fp64 from the exact sum, for
  // P partials' whole vectors), its M2 sq - res^2 / nb.
  merge_channels(C, na, hi, lo, m2, nb, [&](int64_t c, double& base, double& delta, double& m2b) {
    base = static_cast<double>(pivot[c]);
    const double r = !kResidualPass && c < whole ? sum[c] - nb * base : res[c];
    delta = r * inverse_nb;
    m2b = std::max(sq[c] - r * delta, 0.0);
  });
  return true;
}

// Per-channel moments of interleaved input, in blocks of at least `rows_per_block` rows (at least
// kMinBlockRows; a task's rows split evenly, fewer than twice that each), each block two-pass over
// its channels. Tasks own consecutive rows, and their results are merged for every channel; or,
// for few rows of many channels (a small batch of a wide layer), tasks own chunks of whole
// channel vectors over all the rows, written straight to the output. Either way the tasks follow
// from the shape alone.
template <typename T>
void interleaved_moments(const typename Elem<T>::raw* base, const Shape& sh, double* out_hi, double* out_lo,
                         double* out_m2) {
  const int64_t C = sh.c, R = sh.n;
  const int64_t rows_per_block = std::max<int64_t>(kMinBlockRows, kBlock / std::max<int64_t>(C, 1));
  // Moments of channels [c0, c0 + channels) over rows [r0, r1) into (h, l, m) (C apart per row).
  auto rows_moments = [&](int64_t c0, int64_t channels, int64_t r0, int64_t r1, double* h, double* l, double* m) {
    RowScratch<float> narrow(std::is_same_v<T, double> ? 0 : channels);
    RowScratch<double> wide(channels);
    const int64_t blocks = std::max<int64_t>(1, (r1 - r0) / rows_per_block);
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t b0 = r0 + (r1 - r0) * block / blocks, b1 = r0 + (r1 - r0) * (block + 1) / blocks;
      const double na = static_cast<double>(b0 - r0);
      with_partials<T>([&]<typename P>() {
        if constexpr (std::is_same_v<P, float>) {
          return row_block_moments<T, P>(base + c0, C, channels, b0, b1, narrow, na, h, l, m);
        } else {
          return row_block_moments<T, P>(base + c0, C, channels, b0, b1, wide, na, h, l, m);
        }
      });
    }
  };
  if (R < kChannelSplitRows && C >= 2 * kChunkChannels) {
    const int64_t vectors = C / kLanes;
    const int64_t chunks = task_count(sh.numel(), C / kChunkChannels);
    auto start = [&](int64_t chunk) { return chunk == chunks ? C : kLanes * (vectors * chunk / chunks); };
    for_tasks(chunks, sh.numel() / chunks, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t c0 = start(chunk), channels = start(chunk + 1) - c0;
        rows_moments(c0, channels, 0, R, out_hi + c0, out_lo + c0, out_m2 + c0);
      }
    });
    return;
  }
  const int64_t tasks = task_count(sh.numel(), ceil_div(R, rows_per_block));
  Scratch<double, 3> partials(3 * tasks * C);
  double *hi = partials.data(), *lo = hi + tasks * C, *m2 = lo + tasks * C;
  for_tasks(tasks, sh.numel() / tasks, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      rows_moments(0, C, R * task / tasks, R * (task + 1) / tasks, hi + task * C, lo + task * C, m2 + task * C);
    }
  });
  // Tasks in order, all channels at once: task t holds R * (t + 1) / tasks - R * t / tasks rows.
  double n = 0;
  for (int64_t task = 0; task < tasks; ++task) {
    const double rows = static_cast<double>(R * (task + 1) / tasks - R * task / tasks);
    const double *h = hi + task * C, *l = lo + task * C, *m = m2 + task * C;
    merge_channels(C, n, out_hi, out_lo, out_m2, rows, [&](int64_t c, double& base, double& delta, double& m2b) {
      base = h[c];
      delta = l[c];
      m2b = m[c];
    });
    n += rows;
  }
}

// Per channel, in the accumulation dtype A, the coefficients of
// out = [gain * dy +] (x - hi) * scale + shift: hi is the fp64 mean rounded to A (x - hi is exact
// for x near the mean), and the rest of the mean, lo, is folded into the shift as - lo * scale.
template <typename A>
struct Affine {
  std::unique_ptr<A[]> storage;  // every channel is set before use: not value-initialized
  A *hi, *scale, *shift, *gain;
  explicit Affine(int64_t C)
      : storage(new A[4 * C]), hi(storage.get()), scale(hi + C), shift(scale + C), gain(shift + C) {}
  // out = gain * dy + (x - mean) * scale + shift, coefficients given in fp64; round_mean: the
  // mean rounded to A first (lo = 0).
  void set(int64_t c, double mean, bool round_mean, double scale_c, double shift_c, double gain_c = 0.0) {
    hi[c] = static_cast<A>(mean);
    const double lo = round_mean ? 0.0 : mean - static_cast<double>(hi[c]);
    scale[c] = static_cast<A>(scale_c);
    shift[c] = static_cast<A>(shift_c - lo * scale_c);
    gain[c] = static_cast<A>(gain_c);
  }
};

// One elementwise pass: out = [gain * dy +] (x - hi) * scale + shift in the accumulation dtype,
// rounded once to x's. Planar: per run of one channel; interleaved: per group of rows.
template <typename T, bool kGrad>
void affine_pass(const typename Elem<T>::raw* xp, const typename Elem<T>::raw* dp, typename Elem<T>::raw* op,
                 const Shape& sh, const Affine<typename Elem<T>::acc>& k) {
  using A = typename Elem<T>::acc;
  const A *hi = k.hi, *sc = k.scale, *sf = k.shift, *ga = k.gain;
  auto one = [&](int64_t i, int64_t c) {
    A r = (Elem<T>::load(xp[i]) - hi[c]) * sc[c] + sf[c];
    if constexpr (kGrad) r = ga[c] * Elem<T>::load(dp[i]) + r;
    op[i] = Elem<T>::store(r);
  };
  const int64_t C = sh.c;
  if (sh.interleaved) {
    const int64_t whole = std::is_same_v<A, float> ? C - C % kLanes : 0;
    // Row by row, in memory order: each output row is written whole, front to back, the
    // coefficients read from L1. (Taking a few rows per channel vector instead makes several
    // write streams of partial cache lines: as fast alone, up to 1.8x slower inside a training
    // step, where the output is fresh memory.)
    for_tasks(sh.n, C, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if constexpr (std::is_same_v<A, float>) {
          for (int64_t c = 0; c < whole; c += kLanes) {
            f32v v = (load_f32(xp + r * C + c) - load_f32(hi + c)) * load_f32(sc + c) + load_f32(sf + c);
            if constexpr (kGrad) v = load_f32(ga + c) * load_f32(dp + r * C + c) + v;
            store_f32(op + r * C + c, v);
          }
        }
#pragma omp simd
        for (int64_t c = whole; c < C; ++c) one(r * C + c, c);
      }
    });
    return;
  }
  const int64_t S = sh.s;
  for_tasks(sh.n * C, S, [&](int64_t begin, int64_t end) {
    for (int64_t run = begin; run < end; ++run) {
      const int64_t c = run % C, off = run * S;
      int64_t i = 0;
      if constexpr (std::is_same_v<A, float>) {
        const float h = hi[c], s = sc[c], b = sf[c], g = ga[c];
        for (; i + kLanes <= S; i += kLanes) {
          f32v v = (load_f32(xp + off + i) - h) * s + b;
          if constexpr (kGrad) v = g * load_f32(dp + off + i) + v;
          store_f32(op + off + i, v);
        }
      }
#pragma omp simd
      for (int64_t j = i; j < S; ++j) one(off + j, c);
    }
  });
}

// The backward takes x - mean about the mean rounded to the accumulation dtype, as the
// reference does: dx is then the exact gradient at the layer's own statistics (the mean its
// running_mean holds), and x - mean is exact for x near it.
template <typename T>
std::vector<double> round_to_accumulation(const double* mean, int64_t channels) {
  using A = typename Elem<T>::acc;
  std::vector<double> rounded(channels);
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) rounded[c] = static_cast<double>(static_cast<A>(mean[c]));
  return rounded;
}

// [sum dy, sum dy * (x - mean)] over a planar block of runs, added to (sum_dy, sum_dyx); false
// (nothing added) if a partial sum in P was not finite.
template <typename T, typename P>
bool planar_grad_sums(const typename Elem<T>::raw* dy, const typename Elem<T>::raw* x, int64_t runs,
                      int64_t stride, int64_t len, double mean, double& sum_dy, double& sum_dyx) {
  using L = Lanes<P>;
  using V = typename L::vec;
  const P m = static_cast<P>(mean);  // exact: the mean is rounded to the accumulation dtype
  f64v wide_a = {}, wide_b = {};
  double tail_a = 0, tail_b = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const auto* dq = dy + r * stride;
    const auto* xq = x + r * stride;
    int64_t i = 0;
    while (i + kLanes <= len) {
      V a = {}, b = {};
      for (int k = 0; k < kFlush && i + kLanes <= len; ++k, i += kLanes) {
        const V g = L::load(dq + i);
        a += g;
        b += g * (L::load(xq + i) - m);
      }
      wide_a += widen(a);
      wide_b += widen(b);
    }
    for (; i < len; ++i) {
      const double g = static_cast<double>(Elem<T>::load(dq[i]));
      tail_a += g;
      tail_b += g * (static_cast<double>(Elem<T>::load(xq[i])) - mean);
    }
  }
  const double a = lane_sum(wide_a) + tail_a, b = lane_sum(wide_b) + tail_b;
  if (std::is_same_v<P, float> && !(std::isfinite(a) && std::isfinite(b))) return false;
  sum_dy += a;
  sum_dyx += b;
  return true;
}

// The same over rows [r0, r1) of interleaved input, all channels at once, into (a, b) (C each):
// kLanes channels at a time, kFlush rows per fp32 partial, the last channels in fp64.
template <typename T, typename P>
bool row_grad_sums(const typename Elem<T>::raw* dy, const typename Elem<T>::raw* x, int64_t C, int64_t r0,
                   int64_t r1, const double* mean, P* m, double* a, double* b) {
  using L = Lanes<P>;
  using V = typename L::vec;
  const int64_t whole = C - C % kLanes;
  for (int64_t c = 0; c < C; ++c) m[c] = static_cast<P>(mean[c]);  // exact, as above
  std::fill(a, a + C, 0.0);
  std::fill(b, b + C, 0.0);
  for (int64_t g0 = r0; g0 < r1; g0 += kRowGroup * kFlush) {
    const int64_t g1 = std::min(r1, g0 + kRowGroup * kFlush);
    for (int64_t c = 0; c < whole; c += kLanes) {
      const V mv = L::load(m + c);
      f64v wide_a, wide_b;
      for (int64_t f0 = g0; f0 < g1; f0 += kFlush) {
        V pa = {}, pb = {};
        for (int64_t r = f0; r < std::min(g1, f0 + kFlush); ++r) {
          const V g = L::load(dy + r * C + c);
          pa += g;
          pb += g * (L::load(x + r * C + c) - mv);
        }
        wide_a += widen(pa);
        wide_b += widen(pb);
      }
      add_to(a + c, wide_a);
      add_to(b + c, wide_b);
    }
    for (int64_t c = whole; c < C; ++c) {
      for (int64_t r = g0; r < g1; ++r) {
        const double g = static_cast<double>(Elem<T>::load(dy[r * C + c]));
        a[c] += g;
        b[c] += g * (static_cast<double>(Elem<T>::load(x[r * C + c])) - mean[c]);
      }
    }
  }
  double probe = 0;
#pragma omp simd reduction(+ : probe)
  for (int64_t c = 0; c < C; ++c) probe += (a[c] + b[c]) * 0.0;
  return !(std::is_same_v<P, float> && probe != 0.0);
}

// Two per-channel sums over the rows of interleaved input, added to (sum_a, sum_b): the rows are
// split into tasks by the shape alone (the result is the same, bitwise, at any thread count),
// task_sums(r0, r1, a, b) writes the sums of rows [r0, r1) to a task's own a and b (C each, not
// zeroed), and the tasks' sums are added in task order.
template <typename TaskSums>
void interleaved_sums(const Shape& sh, double* sum_a, double* sum_b, const TaskSums& task_sums) {
  const int64_t C = sh.c, R = sh.n;
  // At least kMinBlockRows rows a task: its set-up and its partial sums cost O(C).
  const int64_t tasks = task_count(sh.numel(), ceil_div(R, kMinBlockRows));
  Scratch<double, 4> scratch(tasks * 2 * C);
  double* parts = scratch.data();
  for_tasks(tasks, sh.numel() / tasks, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      double* a = parts + task * 2 * C;
      task_sums(R * task / tasks, R * (task + 1) / tasks, a, a + C);
    }
  });
  for (int64_t task = 0; task < tasks; ++task) {
    const double* part = parts + task * 2 * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum_a[c] += part[c];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum_b[c] += part[C + c];
  }
}

template <typename T>
void grad_sums(const typename Elem<T>::raw* dp, const typename Elem<T>::raw* xp, const Shape& sh,
               const std::vector<double>& mean, double* sum_dy, double* sum_dyx) {
  const int64_t C = sh.c;
  if (sh.interleaved) {
    interleaved_sums(sh, sum_dy, sum_dyx, [&](int64_t r0, int64_t r1, double* a, double* b) {
      with_partials<T>([&]<typename P>() {
        Scratch<P, 5> mean_in_p(C);  // the thread's own buffer, kept from task to task
        return row_grad_sums<T, P>(dp, xp, C, r0, r1, mean.data(), mean_in_p.data(), a, b);
      });
    });
    return;
  }
  const int64_t N = sh.n, S = sh.s;
  const int64_t per_channel = std::min(N, ceil_div(task_count(sh.numel(), C * N), C));
  Scratch<double, 7> scratch(C * per_channel * 2);
  double* parts = scratch.data();
  std::fill(parts, parts + C * per_channel * 2, 0.0);
  for_tasks(C * per_channel, sh.count() / per_channel, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / per_channel, part = task % per_channel;
      const int64_t n0 = N * part / per_channel, n1 = N * (part + 1) / per_channel;
      const int64_t off = (n0 * C + c) * S;
      with_partials<T>([&]<typename P>() {
        return planar_grad_sums<T, P>(dp + off, xp + off, n1 - n0, C * S, S, mean[c], parts[2 * task],
                                      parts[2 * task + 1]);
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t p = 0; p < per_channel; ++p) {
      sum_dy[c] += parts[2 * (c * per_channel + p)];
      sum_dyx[c] += parts[2 * (c * per_channel + p) + 1];
    }
  }
}

}  // namespace

namespace syncbn_native {

template <typename F>
void by_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat: f(float{}); break;
    case DType::kDouble: f(double{}); break;
    case DType::kHalf: f(c10::Half{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
  }
}

template <typename T>
const typename Elem<T>::raw* raw(const void* p) {
  return static_cast<const typename Elem<T>::raw*>(p);
}

void local_moments(DType dtype, const void* x, const Shape& shape, double* hi, double* lo, double* m2) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (shape.interleaved) {
      interleaved_moments<T>(raw<T>(x), shape, hi, lo, m2);
    } else {
      planar_moments<T>(raw<T>(x), shape, hi, lo, m2);
    }
  });
}

void gradient_sums(DType dtype, const void* dy, const void* x, const Shape& shape, const double* mean,
                   double* sum_dy, double* sum_dyx) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    grad_sums<T>(raw<T>(dy), raw<T>(x), shape, round_to_accumulation<T>(mean, shape.c), sum_dy, sum_dyx);
  });
}

void affine(DType dtype, const void* x, const void* dy, void* out, const Shape& shape, const double* mean,
            const double* scale, const double* shift, const double* gain, bool round_mean) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Elem<T>::acc;
    Affine<A> k(shape.c);
#pragma omp simd
    for (int64_t c = 0; c < shape.c; ++c) k.set(c, mean[c], round_mean, scale[c], shift[c], gain ? gain[c] : 0.0);
    auto* o = static_cast<typename Elem<T>::raw*>(out);
    if (gain) {
      affine_pass<T, true>(raw<T>(x), raw<T>(dy), o, shape, k);
    } else {
      affine_pass<T, false>(raw<T>(x), nullptr, o, shape, k);
    }
  });
}

}  // namespace syncbn_native

// ===== In-place activated BatchNorm: the activation, its inverse, and three passes =====
// Elementwise in the accumulation dtype A (fp32 for fp32/fp16/bf16, fp64 for fp64), as the
// reference computes them; sums of A partials of at most kActFlush terms per lane, added to fp64.

namespace {

// Values (planar) or rows (interleaved) summed in A before the partial is added to fp64.
constexpr int64_t kActFlush = 256;
constexpr int64_t kActRowFlush = 16;

template <typename A, int kAct>
inline A activate(A z, A p) {
  if constexpr (kAct == 1) {
    return z > A(0) ? z : z * p;
  } else if constexpr (kAct == 2) {
    return z > A(0) ? z : p * std::expm1(z);
  } else {
    return z;
  }
}

// (z, dz) from (y, dy): the activation inverted, and its derivative written in y. At y = 0 the
// derivative is the negative side's, as torch's backward of LeakyReLU and ELU takes it.
// leaky_relu: p is the slope, inverse_p 1 / slope rounded to A (the reference's multiplier).
template <typename A, int kAct>
inline void preactivation(A y, A dy, A p, A inverse_p, A& z, A& dz) {
  if constexpr (kAct == 1) {
    const bool positive = y > A(0);
    z = positive ? y : y * inverse_p;
    dz = positive ? dy : dy * p;
  } else if constexpr (kAct == 2) {
    // y > -alpha in exact arithmetic; the floor keeps log finite where y rounded onto -alpha.
    const bool positive = y > A(0);
    const A ratio = std::max(y / p, A(-1) + std::numeric_limits<A>::epsilon());
    z = positive ? y : std::log1p(ratio);
    dz = positive ? dy : dy * (y + p);
  } else {
    z = y;
    dz = dy;
  }
}

// Per channel, in A: xhat = (z - bias) * reciprocal, the reciprocal of the weight taken in fp64
// (1, bias 0 without affine), and for the input gradient dx = gain * dz + xhat * slope + offset.
template <typename A>
struct Inverse {
  std::vector<A> bias, reciprocal, gain, slope, offset;
  A parameter, inverse_parameter;
  Inverse(int64_t C, double p, const double* w, const double* b, const double* g = nullptr,
          const double* mean_dz = nullptr, const double* mean_dz_xhat = nullptr)
      : bias(C), reciprocal(C), gain(C), slope(C), offset(C), parameter(static_cast<A>(p)),
        inverse_parameter(static_cast<A>(1.0 / p)) {
    for (int64_t c = 0; c < C; ++c) {
      bias[c] = static_cast<A>(w ? b[c] : 0.0);
      reciprocal[c] = static_cast<A>(w ? 1.0 / w[c] : 1.0);
      if (g) {
        gain[c] = static_cast<A>(g[c]);
        slope[c] = static_cast<A>(-g[c] * mean_dz_xhat[c]);
        offset[c] = static_cast<A>(-g[c] * mean_dz[c]);
      }
    }
  }
};

// Runs f(index, channel) over every value: planar per run of one channel, interleaved per row,
// in tasks that depend on the shape only.
template <typename F>
void each_value(const Shape& sh, const F& f) {
  const int64_t C = sh.c;
  if (sh.interleaved) {
    for_tasks(sh.n, C, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) f(off + c, c);
      }
    });
    return;
  }
  const int64_t S = sh.s;
  for_tasks(sh.n * C, S, [&](int64_t begin, int64_t end) {
    for (int64_t run = begin; run < end; ++run) {
      const int64_t c = run % C, off = run * S;
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) f(off + j, c);
    }
  });
}

template <typename T, int kAct>
void normalize_activate_pass(const typename Elem<T>::raw* xp, typename Elem<T>::raw* yp, const Shape& sh,
                             const Affine<typename Elem<T>::acc>& k, double parameter) {
  using A = typename Elem<T>::acc;
  const A *hi = k.hi, *sc = k.scale, *sf = k.shift;
  const A p = static_cast<A>(parameter);
  each_value(sh, [&](int64_t i, int64_t c) {
    yp[i] = Elem<T>::store(activate<A, kAct>((Elem<T>::load(xp[i]) - hi[c]) * sc[c] + sf[c], p));
  });
}

template <typename T, int kAct>
void activated_input_grad_pass(const typename Elem<T>::raw* dp, const typename Elem<T>::raw* yp,
                               typename Elem<T>::raw* op, const Shape& sh, const Inverse<typename Elem<T>::acc>& k) {
  using A = typename Elem<T>::acc;
  const A *bi = k.bias.data(), *re = k.reciprocal.data(), *ga = k.gain.data(), *sl = k.slope.data(),
          *of = k.offset.data();
  const A p = k.parameter, ip = k.inverse_parameter;
  each_value(sh, [&](int64_t i, int64_t c) {
    A z, dz;
    preactivation<A, kAct>(Elem<T>::load(yp[i]), Elem<T>::load(dp[i]), p, ip, z, dz);
    const A xhat = (z - bi[c]) * re[c];
    op[i] = Elem<T>::store(ga[c] * dz + (xhat * sl[c] + of[c]));
  });
}

// sum dz and sum dz * xhat: planar, one partial per run (sample, channel), summed per channel
// in order; interleaved, one partial per task of rows. Partials in A over at most kActFlush
// values (kActRowFlush rows) per lane, added to fp64.
template <typename T, int kAct>
void activated_sums_pass(const typename Elem<T>::raw* dp, const typename Elem<T>::raw* yp, const Shape& sh,
                         const Inverse<typename Elem<T>::acc>& k, double* sum_dz, double* sum_dz_xhat) {
  using A = typename Elem<T>::acc;
  const A *bi = k.bias.data(), *re = k.reciprocal.data();
  const A p = k.parameter, ip = k.inverse_parameter;
  const int64_t C = sh.c;
  if (sh.interleaved) {
    interleaved_sums(sh, sum_dz, sum_dz_xhat, [&](int64_t r0, int64_t r1, double* a, double* b) {
      Scratch<A, 9> narrow(2 * C);  // the thread's own buffer, kept from task to task
      A* pa = narrow.data();
      A* pb = pa + C;
      std::fill(a, a + C, 0.0);
      std::fill(b, b + C, 0.0);
      for (int64_t g0 = r0; g0 < r1; g0 += kActRowFlush) {
        std::fill(pa, pa + 2 * C, A(0));
        for (int64_t r = g0; r < std::min(r1, g0 + kActRowFlush); ++r) {
          const auto* dq = dp + r * C;
          const auto* yq = yp + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            A z, dz;
            preactivation<A, kAct>(Elem<T>::load(yq[c]), Elem<T>::load(dq[c]), p, ip, z, dz);
            pa[c] += dz;
            pb[c] += dz * ((z - bi[c]) * re[c]);
          }
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          a[c] += static_cast<double>(pa[c]);
          b[c] += static_cast<double>(pb[c]);
        }
      }
    });
    return;
  }
  const int64_t N = sh.n, S = sh.s;
  Scratch<double, 10> scratch(N * C * 2);
  double* parts = scratch.data();
  for_tasks(N * C, S, [&](int64_t begin, int64_t end) {
    for (int64_t run = begin; run < end; ++run) {
      const int64_t c = run % C, off = run * S;
      const A bias = bi[c], reciprocal = re[c];
      double a = 0, b = 0;
      for (int64_t j0 = 0; j0 < S; j0 += kActFlush) {
        const int64_t j1 = std::min(S, j0 + kActFlush);
        A sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
        for (int64_t j = j0; j < j1; ++j) {
          A z, dz;
          preactivation<A, kAct>(Elem<T>::load(yp[off + j]), Elem<T>::load(dp[off + j]), p, ip, z, dz);
          sa += dz;
          sb += dz * ((z - bias) * reciprocal);
        }
        a += static_cast<double>(sa);
        b += static_cast<double>(sb);
      }
      parts[2 * run] = a;
      parts[2 * run + 1] = b;
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dz[c] += parts[2 * (n * C + c)];
      sum_dz_xhat[c] += parts[2 * (n * C + c) + 1];
    }
  }
}

// Planar input with short runs (3x3 positions and fewer) is walked as interleaved rows, one per
// sample, of C * S values, each channel's coefficients repeated S times: per run of a channel the
// set-up would cost more than its few values.
constexpr int64_t kShortRun = 16;
constexpr int64_t kMaxRowValues = int64_t(1) << 18;

bool short_runs(const Shape& sh) { return !sh.interleaved && sh.s > 1 && sh.s < kShortRun && sh.c * sh.s <= kMaxRowValues; }

Shape sample_rows(const Shape& sh) {
  Shape rows;
  rows.n = sh.n;
  rows.c = sh.c * sh.s;
  rows.interleaved = true;
  return rows;
}

// Per channel values, each repeated `times` times (empty for none).
std::vector<double> repeated(const double* values, int64_t channels, int64_t times) {
  std::vector<double> out;
  if (!values) return out;
  out.reserve(channels * times);
  for (int64_t c = 0; c < channels; ++c) out.insert(out.end(), times, values[c]);
  return out;
}

const double* data_or_null(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

// f.template operator()<kAct>() for the activation's code.
template <typename F>
void by_activation(int activation, const F& f) {
  switch (activation) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<0>(); break;
  }
}

}  // namespace

namespace syncbn_native {

void normalize_activate(DType dtype, const void* x, void* y, const Shape& shape, const double* mean,
                        const double* scale, const double* shift, int activation, double parameter) {
  if (short_runs(shape)) {
    const int64_t C = shape.c, S = shape.s;
    normalize_activate(dtype, x, y, sample_rows(shape), repeated(mean, C, S).data(), repeated(scale, C, S).data(),
                       repeated(shift, C, S).data(), activation, parameter);
    return;
  }
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    Affine<typename Elem<T>::acc> k(shape.c);
    for (int64_t c = 0; c < shape.c; ++c) k.set(c, mean[c], false, scale[c], shift[c]);
    auto* out = static_cast<typename Elem<T>::raw*>(y);
    by_activation(activation, [&]<int kAct>() { normalize_activate_pass<T, kAct>(raw<T>(x), out, shape, k, parameter); });
  });
}

void activated_sums(DType dtype, const void* dy, const void* y, const Shape& shape, const double* weight,
                    const double* bias, int activation, double parameter, double* sum_dz, double* sum_dz_xhat) {
  if (short_runs(shape)) {
    const int64_t C = shape.c, S = shape.s;
    std::vector<double> a(C * S, 0.0), b(C * S, 0.0);
    activated_sums(dtype, dy, y, sample_rows(shape), data_or_null(repeated(weight, C, S)),
                   data_or_null(repeated(bias, C, S)), activation, parameter, a.data(), b.data());
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < S; ++j) {
        sum_dz[c] += a[c * S + j];
        sum_dz_xhat[c] += b[c * S + j];
      }
    }
    return;
  }
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Inverse<typename Elem<T>::acc> k(shape.c, parameter, weight, bias);
    by_activation(activation, [&]<int kAct>() {
      activated_sums_pass<T, kAct>(raw<T>(dy), raw<T>(y), shape, k, sum_dz, sum_dz_xhat);
    });
  });
}

void activated_input_grad(DType dtype, const void* dy, const void* y, void* dx, const Shape& shape,
                          const double* weight, const double* bias, const double* gain, const double* mean_dz,
                          const double* mean_dz_xhat, int activation, double parameter) {
  if (short_runs(shape)) {
    const int64_t C = shape.c, S = shape.s;
    activated_input_grad(dtype, dy, y, dx, sample_rows(shape), data_or_null(repeated(weight, C, S)),
                         data_or_null(repeated(bias, C, S)), repeated(gain, C, S).data(),
                         repeated(mean_dz, C, S).data(), repeated(mean_dz_xhat, C, S).data(), activation, parameter);
    return;
  }
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const Inverse<typename Elem<T>::acc> k(shape.c, parameter, weight, bias, gain, mean_dz, mean_dz_xhat);
    auto* out = static_cast<typename Elem<T>::raw*>(dx);
    by_activation(activation, [&]<int kAct>() {
      activated_input_grad_pass<T, kAct>(raw<T>(dy), raw<T>(y), out, shape, k);
    });
  });
}

}  // namespace syncbn_native
#endif  // part 1

#if !defined(SYNCBN_NATIVE_PART) || SYNCBN_NATIVE_PART == 2
// ===== Part 2: the operators (tensors in, tensors out) =====
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using c10::optional;
using syncbn_native::DType;
using syncbn_native::Shape;

DType dtype_of(const Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "syncbn_native::", op, ": unsupported dtype ", x.scalar_type());
  }
}

// Whether x's channels are innermost and the rest dense around them: (N, *, C) contiguous, as
// x.movedim(1, -1).is_contiguous() says (size-1 dims take any stride), without making the view.
bool channels_innermost(const Tensor& x) {
  int64_t expected = 1;
  auto dense_dim = [&](int64_t d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!dense_dim(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (!dense_dim(d)) return false;
  }
  return dense_dim(0);
}

// Whether t and the dense x share a memory layout (size-1 dims may differ in stride).
bool same_layout(const Tensor& t, const Tensor& xc) {
  return (t.is_contiguous() && xc.is_contiguous()) || (channels_innermost(t) && channels_innermost(xc));
}

// x in one of the two dense forms (a copy only if it is in neither) and its shape.
std::pair<Tensor, Shape> dense(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, "syncbn_native::", op, ": expected (N, C, *) input, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "syncbn_native::", op, ": expected a CPU tensor");
  Shape shape;
  shape.c = x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) shape.s *= x.size(d);
  Tensor xc = x;
  if (!x.is_contiguous() && !channels_innermost(x)) xc = x.contiguous(x.suggest_memory_format());
  if (shape.s == 1 || !xc.is_contiguous()) {  // channels innermost: rows of C values
    shape.interleaved = true;
    shape.n = x.size(0) * shape.s;
    shape.s = 1;
  } else {
    shape.n = x.size(0);
  }
  return {xc, shape};
}

// t (e.g. dy) in the layout of the dense x, copied only if it has another.
Tensor like(const Tensor& t, const Tensor& xc, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == xc.sizes(), "syncbn_native::", op, ": ", name, " has shape ", t.sizes(),
              ", x has ", xc.sizes());
  TORCH_CHECK(t.scalar_type() == xc.scalar_type(), "syncbn_native::", op, ": ", name, " is ",
              t.scalar_type(), ", x is ", xc.scalar_type());
  if (same_layout(t, xc)) return t;
  Tensor copy = at::empty_like(xc);
  copy.copy_(t);
  return copy;
}

// Output in empty_like(x)'s layout; written through `work` (the dense form) when x has none.
struct Output {
  Tensor result, work;
};

Output output_like(const Tensor& x, const Tensor& xc) {
  Tensor result = at::empty_like(x);
  if (same_layout(result, xc)) return {result, result};
  return {result, at::empty_like(xc)};
}

Tensor finish(Output& out) {
  if (!out.work.is_same(out.result)) out.result.copy_(out.work);
  return out.result;
}

// The value of a one-element tensor (a count) without a dispatch when it is a CPU double.
double scalar_of(const Tensor& t) {
  if (t.device().is_cpu() && t.scalar_type() == at::kDouble && t.numel() == 1) return *t.const_data_ptr<double>();
  return t.item<double>();
}

// Values as fp64, for reading: a contiguous fp64 CPU tensor's own memory (the statistics, the
// reduced sums: no copy per call), else a converted copy. Read it while the tensor lives.
class Doubles {
 public:
  Doubles() : data_(nullptr), size_(0) {}
  explicit Doubles(std::vector<double> own) : own_(std::move(own)), data_(own_.data()), size_(own_.size()) {}
  Doubles(const double* data, size_t size) : data_(data), size_(size) {}
  Doubles(Doubles&& other) noexcept { *this = std::move(other); }
  Doubles& operator=(Doubles&& other) noexcept {
    const bool owned = other.data_ == other.own_.data();
    own_ = std::move(other.own_);
    data_ = owned ? own_.data() : other.data_;
    size_ = other.size_;
    return *this;
  }
  const double* data() const { return data_; }
  size_t size() const { return size_; }
  double operator[](size_t i) const { return data_[i]; }

 private:
  std::vector<double> own_;
  const double* data_;
  size_t size_;
};

// A tensor's values as fp64 (any float dtype, any layout).
Doubles doubles(const Tensor& t) {
  const int64_t n = t.numel();
  if (t.device().is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kDouble) return Doubles(t.const_data_ptr<double>(), n);
    if (t.scalar_type() == at::kFloat) {
      return Doubles(std::vector<double>(t.const_data_ptr<float>(), t.const_data_ptr<float>() + n));
    }
  }
  const Tensor d = t.to(at::kCPU, at::kDouble).contiguous();
  return Doubles(std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + n));
}

// n fp64 zeros on `options`' device (CPU): at::zeros without its dispatch to a fill kernel, whose
// setup costs a small layer's step more than the fill.
Tensor zeroed_doubles(int64_t n, const at::TensorOptions& options) {
  Tensor out = at::empty({n}, options.dtype(at::kDouble));
  std::fill_n(out.mutable_data_ptr<double>(), n, 0.0);
  return out;
}

// A (C,) per-channel vector as fp64, or `fill` where there is none.
Doubles channel_values(const optional<Tensor>& t, int64_t channels, double fill, const char* op,
                       const char* name) {
  if (!t.has_value() || !t->defined()) return Doubles(std::vector<double>(channels, fill));
  TORCH_CHECK(t->numel() == channels, "syncbn_native::", op, ": ", name, " has ", t->numel(),
              " values, expected ", channels);
  return doubles(*t);
}

// --- forward_payload ---------------------------------------------------------------------------

Tensor forward_payload(const Tensor& x_in, const optional<Tensor>& shift) {
  auto [x, sh] = dense(x_in, "forward_payload");
  const int64_t C = sh.c;
  const Doubles k = channel_values(shift, C, 0.0, "forward_payload", "shift");
  const DType dtype = dtype_of(x, "forward_payload");
  const bool any = sh.count() > 0 && C > 0;
  // hi, lo, m2: written whole by local_moments (not value-initialized: a pass each, at C in the
  // thousands); zeros for an empty batch.
  const std::unique_ptr<double[]> moments(new double[3 * C]);
  double *hi = moments.get(), *lo = hi + C, *m2 = lo + C;
  if (any) {
    syncbn_native::local_moments(dtype, x.const_data_ptr(), sh, hi, lo, m2);
  } else {
    std::fill(hi, hi + 3 * C, 0.0);
  }
  Tensor payload = at::empty({4 * C + 3}, x.options().dtype(at::kDouble));
  double* p = payload.mutable_data_ptr<double>();
  const double n = static_cast<double>(sh.count());
  p[0] = n;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    // mean - K taken as (hi - K) + lo: no rounding of the mean to one double in between.
    const double offset = any ? (hi[c] - k[c]) + lo[c] : 0.0;
    p[1 + c] = n * offset;
    p[1 + C + c] = m2[c] + n * offset * offset;
    p[1 + 2 * C + c] = k[c];
    p[1 + 3 * C + c] = k[c] * k[c];
  }
  p[4 * C + 1] = 0.0;
  p[4 * C + 2] = x.scalar_type() == at::kDouble ? 1.0 : 0.0;
  return payload;
}

// --- finalize ----------------------------------------------------------------------------------

// The host's per-channel arithmetic on the reduced payload is numpy's and torch's: fp64 operations
// in their order, none fused (a multiply-add rounds once, they round twice).
#if defined(__clang__)
#define SYNCBN_NO_FMA _Pragma("clang fp contract(off)")
#define SYNCBN_NO_FMA_ATTRIBUTE
#else
#define SYNCBN_NO_FMA
#define SYNCBN_NO_FMA_ATTRIBUTE __attribute__((optimize("fp-contract=off")))
#endif

// Per channel of the reduced moments [n, S1 (C), S2 (C)]: the mean's offset from the shift,
// S1 / max(n, 1), and the biased variance, max(S2 / max(n, 1) - offset^2, 0), as
// batchnorm_math.global_moments takes them: the checks and the statistics read the same values.
SYNCBN_NO_FMA_ATTRIBUTE void offsets_and_vars(const double* m, int64_t C, double* offset, double* var) {
  SYNCBN_NO_FMA
  const double divisor = std::max(m[0], 1.0);
  const double *s1 = m + 1, *s2 = m + 1 + C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const double o = s1[c] / divisor, v = s2[c] / divisor - o * o;
    offset[c] = o;
    var[c] = v < 0.0 ? 0.0 : v;  // np.maximum and clamp: NaN stays NaN
  }
}

// torch's lerp: self + w (end - self) for |w| < 0.5, else end - (end - self)(1 - w).
template <typename A>
inline A lerp(A self, A end, A w) {
  return std::abs(w) < A(0.5) ? std::fma(w, end - self, self) : end - (end - self) * (A(1) - w);
}

// running = lerp(running, value, factor) in the buffer's dtype; value given in fp64.
template <typename A>
void lerp_into(Tensor& buffer, const double* value, double factor_in) {
  A* b = buffer.mutable_data_ptr<A>();
  const A factor = static_cast<A>(factor_in);
  const int64_t channels = buffer.numel();
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) b[c] = lerp<A>(b[c], static_cast<A>(value[c]), factor);
}

void update_buffer(Tensor& buffer, const double* value, double factor, const char* name, int64_t channels) {
  TORCH_CHECK(buffer.numel() == channels, "syncbn_native::finalize: ", name, " has ", buffer.numel(),
              " values, expected ", channels);
  if (buffer.is_contiguous() && buffer.scalar_type() == at::kFloat) {
    lerp_into<float>(buffer, value, factor);
  } else if (buffer.is_contiguous() && buffer.scalar_type() == at::kDouble) {
    lerp_into<double>(buffer, value, factor);
  } else {  // half buffers and the unusual: torch's own lerp
    const Tensor values = at::from_blob(const_cast<double*>(value), {channels}, at::kDouble);
    buffer.lerp_(values.to(buffer.scalar_type()), factor);
  }
}

// finalize from the reduced moments' total count and their offsets and variances (offsets_and_vars,
// already in `var`, which becomes the statistics' var).
std::tuple<Tensor, Tensor, Tensor> finalize_moments(double total, int64_t C, const double* offset, Tensor var,
                                                    const at::TensorOptions& options,
                                                    const optional<Tensor>& shift,
                                                    const optional<Tensor>& running_mean,
                                                    const optional<Tensor>& running_var,
                                                    const optional<Tensor>& num_batches_tracked,
                                                    optional<double> momentum) {
  const Doubles k = channel_values(shift, C, 0.0, "finalize", "shift");
  Tensor count = at::empty({}, options), mean = at::empty({C}, options);
  count.mutable_data_ptr<double>()[0] = total;
  double* mu = mean.mutable_data_ptr<double>();
  const double* v = var.const_data_ptr<double>();
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) mu[c] = k[c] + offset[c];
  if (running_mean.has_value() && running_mean->defined()) {
    TORCH_CHECK(running_var.has_value() && running_var->defined(),
                "syncbn_native::finalize: running_mean without running_var");
    Tensor rm = *running_mean, rv = *running_var;
    const bool has_values = total > 0;
    double factor;
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
      Tensor nbt = *num_batches_tracked;
      if (has_values && nbt.scalar_type() == at::kLong && nbt.numel() == 1 && nbt.device().is_cpu()) {
        ++*nbt.mutable_data_ptr<int64_t>();
      } else if (has_values) {
        nbt.add_(1);
      }
    }
    if (momentum.has_value()) {
      factor = *momentum;
    } else {
      TORCH_CHECK(num_batches_tracked.has_value() && num_batches_tracked->defined(),
                  "momentum=None (cumulative average) needs num_batches_tracked");
      const Tensor& nbt = *num_batches_tracked;
      const double batches = std::max(
          nbt.scalar_type() == at::kLong && nbt.device().is_cpu() ? static_cast<double>(*nbt.const_data_ptr<int64_t>())
                                                                   : nbt.item<double>(), 1.0);
      // 1 / num_batches_tracked in the buffers' dtype, as batchnorm_math rounds it.
      factor = rm.scalar_type() == at::kDouble ? 1.0 / batches
                                                : static_cast<double>(1.0f / static_cast<float>(batches));
    }
    if (!has_values) factor = 0.0;
    std::vector<double> unbiased(C);
    const double bessel = total / std::max(total - 1.0, 1.0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) unbiased[c] = v[c] * bessel;
    update_buffer(rm, mu, factor, "running_mean", C);
    update_buffer(rv, unbiased.data(), factor, "running_var", C);
  }
  return {count, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> finalize(const Tensor& moments_in, const optional<Tensor>& shift,
                                            const optional<Tensor>& running_mean,
                                            const optional<Tensor>& running_var,
                                            const optional<Tensor>& num_batches_tracked,
                                            optional<double> momentum) {
  TORCH_CHECK(moments_in.dim() == 1 && moments_in.numel() % 2 == 1,
              "syncbn_native::finalize: expected 2C+1 moments, got shape ", moments_in.sizes());
  const Doubles moments = doubles(moments_in);
  const int64_t C = (moments_in.numel() - 1) / 2;
  const auto options = moments_in.options().dtype(at::kDouble);
  const std::unique_ptr<double[]> offset(new double[C]);  // written whole by offsets_and_vars
  Tensor var = at::empty({C}, options);
  offsets_and_vars(moments.data(), C, offset.get(), var.mutable_data_ptr<double>());
  return finalize_moments(moments[0], C, offset.get(), var, options, shift, running_mean, running_var,
                          num_batches_tracked, momentum);
}

// --- 1 / sqrt(var + eps) ------------------------------------------------------------------------

// Per value of var, 1 / sqrt(var + eps) in fp64: what normalize, backward_sums and input_grad
// scale by. Each operator takes it from var; the synchronized layer's node takes it once, in its
// forward, and keeps it for its backward (an fp64 square root and division cost a wide layer
// microseconds a call): the same values, bitwise.
Tensor inverse_std(const Tensor& var, double eps) {
  const Doubles v = doubles(var);
  const int64_t n = var.numel();
  Tensor out = at::empty({n}, var.options().dtype(at::kDouble).device(at::kCPU));
  double* o = out.mutable_data_ptr<double>();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = 1.0 / std::sqrt(v[i] + eps);
  return out;
}

// --- normalize -----------------------------------------------------------------------------------

// invstd: inverse_std(var, eps).
Tensor normalize_scaled(const Tensor& x_in, const Tensor& mean, const Tensor& invstd, const optional<Tensor>& weight,
                        const optional<Tensor>& bias) {
  auto [x, sh] = dense(x_in, "normalize");
  const int64_t C = sh.c;
  const Doubles mu = channel_values(mean, C, 0.0, "normalize", "mean");
  const Doubles is = channel_values(invstd, C, 0.0, "normalize", "var");
  const Doubles w = channel_values(weight, C, 1.0, "normalize", "weight");
  const Doubles b = channel_values(bias, C, 0.0, "normalize", "bias");
  const DType dtype = dtype_of(x, "normalize");
  Output out = output_like(x_in, x);
  const std::unique_ptr<double[]> scale(new double[C]);  // written whole below: not zero-filled
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) scale[c] = w[c] * is[c];
  syncbn_native::affine(dtype, x.const_data_ptr(), nullptr, out.work.mutable_data_ptr(), sh, mu.data(), scale.get(),
                        b.data(), nullptr, false);
  return finish(out);
}

Tensor normalize(const Tensor& x, const Tensor& mean, const Tensor& var, const optional<Tensor>& weight,
                 const optional<Tensor>& bias, double eps) {
  return normalize_scaled(x, mean, inverse_std(var, eps), weight, bias);
}

// --- backward_sums -------------------------------------------------------------------------------

// n fp64 values as a new tensor of `dtype`, rounded as Tensor.to rounds: fp32 and fp64 here (a
// copy_ costs a small layer's step more than the loop), the others by torch.
Tensor converted(const double* values, int64_t n, const at::TensorOptions& options, at::ScalarType dtype) {
  Tensor out = at::empty({n}, options.dtype(dtype));
  if (dtype == at::kFloat) {
    float* o = out.mutable_data_ptr<float>();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(values[i]);
  } else if (dtype == at::kDouble) {
    std::copy(values, values + n, out.mutable_data_ptr<double>());
  } else {
    out.copy_(at::from_blob(const_cast<double*>(values), {n}, options.dtype(at::kDouble)));
  }
  return out;
}

// [sum dy, sum dy * xhat] (2C fp64), and the same sums in the parameters' dtype as (dbias,
// dweight): this rank's own gradients, copied out here (one call, not three) before the sums
// take the backward all-reduce in place; converted as Tensor.to converts.
// invstd: inverse_std(var, eps).
std::tuple<Tensor, Tensor, Tensor> backward_sums_scaled(const Tensor& dy_in, const Tensor& x_in, const Tensor& mean,
                                                        const Tensor& invstd, at::ScalarType parameter_dtype) {
  auto [x, sh] = dense(x_in, "backward_sums");
  Tensor dy = like(dy_in, x, "backward_sums", "dy");
  const int64_t C = sh.c;
  const Doubles mu = channel_values(mean, C, 0.0, "backward_sums", "mean");
  const Doubles is = channel_values(invstd, C, 0.0, "backward_sums", "var");
  Tensor sums = zeroed_doubles(2 * C, x.options());
  double* s = sums.mutable_data_ptr<double>();
  const DType dtype = dtype_of(x, "backward_sums");
  if (sh.count() > 0 && C > 0) {
    syncbn_native::gradient_sums(dtype, dy.const_data_ptr(), x.const_data_ptr(), sh, mu.data(), s, s + C);
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) s[C + c] *= is[c];
  return {sums, converted(s, C, sums.options(), parameter_dtype), converted(s + C, C, sums.options(), parameter_dtype)};
}

std::tuple<Tensor, Tensor, Tensor> backward_sums(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                 const Tensor& var, double eps, at::ScalarType parameter_dtype) {
  return backward_sums_scaled(dy, x, mean, inverse_std(var, eps), parameter_dtype);
}

// --- input_grad ----------------------------------------------------------------------------------

// invstd: inverse_std(var, eps).
Tensor input_grad_scaled(const Tensor& dy_in, const Tensor& x_in, const Tensor& mean, const Tensor& invstd,
                         const optional<Tensor>& weight, const Tensor& group_sums, const Tensor& count) {
  auto [x, sh] = dense(x_in, "input_grad");
  Tensor dy = like(dy_in, x, "input_grad", "dy");
  const int64_t C = sh.c;
  const Doubles mu = channel_values(mean, C, 0.0, "input_grad", "mean");
  const Doubles is = channel_values(invstd, C, 0.0, "input_grad", "var");
  const Doubles w = channel_values(weight, C, 1.0, "input_grad", "weight");
  TORCH_CHECK(group_sums.numel() == 2 * C, "syncbn_native::input_grad: group_sums has ", group_sums.numel(),
              " values, expected ", 2 * C);
  const Doubles sums = doubles(group_sums);
  const double* gs = sums.data();
  // The group means of the sums by a product: fp64 divisions cost a wide layer microseconds, and
  // one more rounding in fp64 is far below the coefficients' own (fp32 for fp32 input).
  const double inverse_total = 1.0 / std::max(scalar_of(count), 1.0);
  const DType dtype = dtype_of(x, "input_grad");
  Output out = output_like(x_in, x);
  // dx = a dy + b (x - mean) + c per channel; x - mean about the mean rounded to the accumulation
  // dtype, as backward_sums took it: dx is the exact gradient at the layer's own statistics.
  const std::unique_ptr<double[]> coefficients(new double[3 * C]);  // written whole below
  double *gain = coefficients.get(), *scale = gain + C, *shift = scale + C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const double a = w[c] * is[c];
    gain[c] = a;
    scale[c] = -a * is[c] * (gs[C + c] * inverse_total);
    shift[c] = -a * (gs[c] * inverse_total);
  }
  syncbn_native::affine(dtype, x.const_data_ptr(), dy.const_data_ptr(), out.work.mutable_data_ptr(), sh, mu.data(),
                        scale, shift, gain, true);
  return finish(out);
}

Tensor input_grad(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& var,
                  const optional<Tensor>& weight, double eps, const Tensor& group_sums, const Tensor& count) {
  return input_grad_scaled(dy, x, mean, inverse_std(var, eps), weight, group_sums, count);
}

// --- group_checks --------------------------------------------------------------------------------

// Per channel, branch-free (so it vectorizes: a layer has thousands of channels): whether its
// shifts differ, and whether its merge is ill-conditioned. K / W is a product by the reciprocal
// where W is a power of two (kByReciprocal): the same value, bitwise, without a division.
template <bool kByReciprocal>
SYNCBN_NO_FMA_ATTRIBUTE void channel_checks(const double* k1, const double* k2, const double* offset,
                                            const double* var, int64_t C, double ranks, double squared_tolerance,
                                            double limit, uint8_t* differs, int& any_differs, int& ill_conditioned) {
  SYNCBN_NO_FMA
  const double inverse_ranks = 1.0 / ranks;
  int any = 0, ill = 0;
#pragma omp simd reduction(| : any, ill)
  for (int64_t c = 0; c < C; ++c) {
    const double square = offset[c] * offset[c];
    const double k_mean = kByReciprocal ? k1[c] * inverse_ranks : k1[c] / ranks;
    const double k2_mean = kByReciprocal ? k2[c] * inverse_ranks : k2[c] / ranks;
    const double spread = k2_mean - k_mean * k_mean;
    differs[c] = spread > squared_tolerance * (k2_mean + var[c]);
    any |= differs[c];
    ill |= square > limit * var[c];
  }
  any_differs = any;
  ill_conditioned = ill;
}

// batchnorm_math.group_totals on a reduced forward payload (4C+3 fp64, on the host), without its
// dozen small numpy calls: [count, invalid ranks, fp64 ranks, finite, ill-conditioned, then the
// indices of the channels whose shifts differ]. Its thresholds come from batchnorm_math; every
// decision is numpy's, bitwise. The channels' offsets and variances are left in `offset` and
// `var` (C each) for finalize.
SYNCBN_NO_FMA_ATTRIBUTE std::vector<double> checks_of(const double* p, int64_t n, int64_t world_size,
                                                      double shift_tolerance, double mixed_dtype_shift_tolerance,
                                                      double fp32_condition_limit, double* offset, double* var) {
  SYNCBN_NO_FMA
  const int64_t C = (n - 3) / 4;
  int finite = 1;
#pragma omp simd reduction(& : finite)
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(p[i]);
  const double count = p[0], ranks = static_cast<double>(world_size);
  const double fp64_ranks = p[n - 1];
  const double tolerance = (fp64_ranks == 0.0 || fp64_ranks == ranks) ? shift_tolerance : mixed_dtype_shift_tolerance;
  const double squared_tolerance = tolerance * tolerance;
  const double limit = fp64_ranks != 0.0 ? 1.0 : fp32_condition_limit / (ranks + 1.0);
  offsets_and_vars(p, C, offset, var);
  std::vector<uint8_t> differs(C);
  int any_differs = 0, ill_conditioned = 0;
  const double *k1 = p + 1 + 2 * C, *k2 = p + 1 + 3 * C;
  if ((world_size & (world_size - 1)) == 0) {
    channel_checks<true>(k1, k2, offset, var, C, ranks, squared_tolerance, limit, differs.data(), any_differs,
                         ill_conditioned);
  } else {
    channel_checks<false>(k1, k2, offset, var, C, ranks, squared_tolerance, limit, differs.data(), any_differs,
                          ill_conditioned);
  }
  std::vector<double> checks = {count, p[n - 2], fp64_ranks, finite ? 1.0 : 0.0, ill_conditioned ? 1.0 : 0.0};
  for (int64_t c = 0; any_differs && c < C; ++c) {
    if (differs[c]) checks.push_back(static_cast<double>(c));
  }
  return checks;
}

// The reduced 4C+3 payload on the host as fp64: itself, where it is one already.
Tensor host_payload(const Tensor& payload_in, int64_t world_size, const char* op) {
  TORCH_CHECK(payload_in.dim() == 1 && payload_in.numel() % 4 == 3 && world_size > 0, "syncbn_native::", op,
              ": expected a 4C+3 payload and a positive world size, got shape ", payload_in.sizes(), " and ",
              world_size);
  return payload_in.to(at::kCPU, at::kDouble).contiguous();
}

Tensor group_checks(const Tensor& payload_in, int64_t world_size, double shift_tolerance,
                    double mixed_dtype_shift_tolerance, double fp32_condition_limit) {
  const Tensor payload = host_payload(payload_in, world_size, "group_checks");
  const int64_t C = (payload.numel() - 3) / 4;
  const std::unique_ptr<double[]> offset_and_var(new double[2 * C]);  // written whole by checks_of
  const std::vector<double> checks = checks_of(payload.const_data_ptr<double>(), payload.numel(), world_size,
                                               shift_tolerance, mixed_dtype_shift_tolerance, fp32_condition_limit,
                                               offset_and_var.get(), offset_and_var.get() + C);
  Tensor result = at::empty({static_cast<int64_t>(checks.size())}, payload_in.options().dtype(at::kDouble));
  std::copy(checks.begin(), checks.end(), result.mutable_data_ptr<double>());
  return result;
}

// --- checked_finalize ----------------------------------------------------------------------------

// group_checks, then finalize where the checks leave nothing to do first (batchnorm_math.
// statistics_ready: no rank's input invalid, no shift differing, more than one value, finite where
// asked, a well-conditioned merge): (ready, checks, count, mean, var). One call instead of two
// for a small layer's every step; when not ready nothing is updated, the checks are returned (the
// caller raises or merges again) and count, mean and var are empty.
std::tuple<bool, Tensor, Tensor, Tensor, Tensor> checked_finalize(
    const Tensor& payload_in, const optional<Tensor>& shift, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, optional<double> momentum,
    int64_t world_size, double shift_tolerance, double mixed_dtype_shift_tolerance, double fp32_condition_limit,
    bool check_finite) {
  const Tensor payload = host_payload(payload_in, world_size, "checked_finalize");
  const double* p = payload.const_data_ptr<double>();
  const int64_t C = (payload.numel() - 3) / 4;
  auto options = payload_in.options().dtype(at::kDouble);
  const std::unique_ptr<double[]> offset(new double[C]);  // written whole by checks_of
  Tensor var = at::empty({C}, options);
  std::vector<double> checks = checks_of(p, payload.numel(), world_size, shift_tolerance,
                                         mixed_dtype_shift_tolerance, fp32_condition_limit, offset.get(),
                                         var.mutable_data_ptr<double>());
  // [count, invalid ranks, fp64 ranks, finite, ill-conditioned, differing channels...]
  const bool ready = checks.size() == 5 && checks[1] == 0.0 && checks[0] != 1.0 &&
                     (!check_finite || checks[3] != 0.0) && checks[4] == 0.0;
  if (!ready) {
    Tensor result = at::empty({static_cast<int64_t>(checks.size())}, options);
    std::copy(checks.begin(), checks.end(), result.mutable_data_ptr<double>());
    Tensor none = at::empty({0}, options);
    return {false, result, none, none, none};
  }
  auto [count, mean, stats_var] = finalize_moments(p[0], C, offset.get(), var, options, shift, running_mean,
                                                   running_var, num_batches_tracked, momentum);
  return {true, at::empty({0}, options), count, mean, stats_var};
}

// --- in-place activated BatchNorm in a group of one: update_stats ------------------------------

// torch.batch_norm_update_stats: the local batch's mean and biased variance (fp64, from the exact
// local moments), and the running statistics moved by `momentum` toward the mean and unbiased var.
std::tuple<Tensor, Tensor> update_stats(const Tensor& x_in, const optional<Tensor>& running_mean,
                                        const optional<Tensor>& running_var, double momentum) {
  auto [x, sh] = dense(x_in, "update_stats");
  const int64_t C = sh.c;
  TORCH_CHECK(sh.count() > 0, "syncbn_native::update_stats: expected a non-empty batch, got shape ", x_in.sizes());
  std::vector<double> hi(C, 0.0), lo(C, 0.0), m2(C, 0.0);
  if (C > 0) syncbn_native::local_moments(dtype_of(x, "update_stats"), x.const_data_ptr(), sh, hi.data(), lo.data(), m2.data());
  auto options = x.options().dtype(at::kDouble);
  Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  double* mu = mean.mutable_data_ptr<double>();
  double* v = var.mutable_data_ptr<double>();
  const double n = static_cast<double>(sh.count()), bessel = n / std::max(n - 1.0, 1.0);
  std::vector<double> unbiased(C);
  for (int64_t c = 0; c < C; ++c) {
    mu[c] = hi[c] + lo[c];
    v[c] = m2[c] / n;
    unbiased[c] = v[c] * bessel;
  }
  if (running_mean.has_value() && running_mean->defined()) {
    TORCH_CHECK(running_var.has_value() && running_var->defined(),
                "syncbn_native::update_stats: running_mean without running_var");
    Tensor rm = *running_mean, rv = *running_var;
    update_buffer(rm, mu, momentum, "running_mean", C);
    update_buffer(rv, unbiased.data(), momentum, "running_var", C);
  }
  return {mean, var};
}

// Whether any channel's |weight| is below floor * max(1, |bias|) (the inversion's floor), computed
// in the weight's dtype as torch computes it (fp32 weights: in fp32), read on the host.
template <typename A>
bool any_below(const Doubles& w, const Doubles& b, double floor) {
  const A f = static_cast<A>(floor);
  bool below = false;
  for (size_t c = 0; c < w.size(); ++c) {
    below |= std::abs(static_cast<A>(w[c])) < std::max(A(1), std::abs(static_cast<A>(b[c]))) * f;
  }
  return below;
}

bool any_below_floor(const Tensor& weight, const optional<Tensor>& bias, double floor) {
  const int64_t C = weight.numel();
  const Doubles w = doubles(weight);
  const Doubles b = channel_values(bias, C, 0.0, "any_below_floor", "bias");
  return weight.scalar_type() == at::kDouble ? any_below<double>(w, b, floor) : any_below<float>(w, b, floor);
}

// --- in-place activated BatchNorm: normalize_activate, activated_backward_payload, activated_input_grad

void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation <= 2, "syncbn_native::", op, ": activation must be 0 (identity), ",
              "1 (leaky_relu) or 2 (elu), got ", activation);
}

// y = act((x - mean) * weight * invstd + bias) into `out` (the dense form of x, or x's own).
void normalize_activate_into(const Tensor& x, const Shape& sh, void* out, const Tensor& mean, const Tensor& var,
                             const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                             int64_t activation, double parameter, const char* op) {
  check_activation(activation, op);
  const int64_t C = sh.c;
  const Doubles mu = channel_values(mean, C, 0.0, op, "mean");
  const Doubles v = channel_values(var, C, 0.0, op, "var");
  const Doubles w = channel_values(weight, C, 1.0, op, "weight");
  const Doubles b = channel_values(bias, C, 0.0, op, "bias");
  std::vector<double> scale(C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) scale[c] = w[c] / std::sqrt(v[c] + eps);
  syncbn_native::normalize_activate(dtype_of(x, op), x.const_data_ptr(), out, sh, mu.data(), scale.data(), b.data(),
                                    static_cast<int>(activation), parameter);
}

Tensor normalize_activate(const Tensor& x_in, const Tensor& mean, const Tensor& var, const optional<Tensor>& weight,
                          const optional<Tensor>& bias, double eps, int64_t activation, double parameter) {
  auto [x, sh] = dense(x_in, "normalize_activate");
  Output out = output_like(x_in, x);
  normalize_activate_into(x, sh, out.work.mutable_data_ptr(), mean, var, weight, bias, eps, activation, parameter,
                          "normalize_activate");
  return finish(out);
}

// The same written over x: each value is read, then its output written in its place.
void normalize_activate_(const Tensor& x_in, const Tensor& mean, const Tensor& var, const optional<Tensor>& weight,
                         const optional<Tensor>& bias, double eps, int64_t activation, double parameter) {
  auto [x, sh] = dense(x_in, "normalize_activate_");
  normalize_activate_into(x, sh, x.mutable_data_ptr(), mean, var, weight, bias, eps, activation, parameter,
                          "normalize_activate_");
  if (!x.is_same(x_in)) x_in.copy_(x);  // x had no dense form: it was computed on a copy
}

// Per channel (weight, bias) as the inversion xhat = (z - bias) / weight reads them: none without
// a weight (xhat = z), else the bias or 0.
struct InverseAffine {
  Doubles weight, bias;
  bool affine;
  InverseAffine(const optional<Tensor>& w, const optional<Tensor>& b, int64_t C, const char* op)
      : affine(w.has_value() && w->defined()) {
    if (affine) {
      weight = channel_values(w, C, 1.0, op, "weight");
      bias = channel_values(b, C, 0.0, op, "bias");
    }
  }
  const double* w() const { return affine ? weight.data() : nullptr; }
  const double* b() const { return affine ? bias.data() : nullptr; }
};

Tensor activated_backward_payload(const Tensor& dy_in, const Tensor& y_in, const optional<Tensor>& weight,
                                  const optional<Tensor>& bias, int64_t activation, double parameter) {
  const char* op = "activated_backward_payload";
  check_activation(activation, op);
  auto [y, sh] = dense(y_in, op);
  Tensor dy = like(dy_in, y, op, "dy");
  const int64_t C = sh.c;
  const InverseAffine inverse(weight, bias, C, op);
  Tensor sums = zeroed_doubles(2 * C, y.options());
  double* s = sums.mutable_data_ptr<double>();
  if (sh.count() > 0 && C > 0) {
    syncbn_native::activated_sums(dtype_of(y, op), dy.const_data_ptr(), y.const_data_ptr(), sh, inverse.w(),
                                  inverse.b(), static_cast<int>(activation), parameter, s, s + C);
  }
  return sums;
}

Tensor activated_input_grad(const Tensor& dy_in, const Tensor& y_in, const Tensor& var, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, double eps, int64_t activation, double parameter,
                            const Tensor& group_sums, const Tensor& count) {
  const char* op = "activated_input_grad";
  check_activation(activation, op);
  auto [y, sh] = dense(y_in, op);
  Tensor dy = like(dy_in, y, op, "dy");
  const int64_t C = sh.c;
  const InverseAffine inverse(weight, bias, C, op);
  const Doubles v = channel_values(var, C, 0.0, op, "var");
  TORCH_CHECK(group_sums.numel() == 2 * C, "syncbn_native::", op, ": group_sums has ", group_sums.numel(),
              " values, expected ", 2 * C);
  const Doubles sums = doubles(group_sums);
  const double total = std::max(scalar_of(count), 1.0);
  // dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)): the weight it inverts with
  // scales it too (a NaN channel stays NaN).
  std::vector<double> gain(C), mean_dz(C), mean_dz_xhat(C);
  for (int64_t c = 0; c < C; ++c) {
    gain[c] = (inverse.affine ? inverse.weight[c] : 1.0) / std::sqrt(v[c] + eps);
    mean_dz[c] = sums[c] / total;
    mean_dz_xhat[c] = sums[C + c] / total;
  }
  Output out = output_like(y_in, y);
  syncbn_native::activated_input_grad(dtype_of(y, op), dy.const_data_ptr(), y.const_data_ptr(),
                                      out.work.mutable_data_ptr(), sh, inverse.w(), inverse.b(), gain.data(),
                                      mean_dz.data(), mean_dz_xhat.data(), static_cast<int>(activation), parameter);
  return finish(out);
}

// --- the synchronized layer as one autograd node ---------------------------------------------------

// A layer step through a Python autograd.Function pays tens of µs on the host (the engine's call
// into Python and back, the context, Function.apply): as much as a small layer's kernels. Here the
// layer's normalize and its backward are one C++ node, and the forward's common case one operator
// call. They reach what only Python has through two operators that syncbn/functional.py defines:
// the all-reduce (the communicator, the debug guard, the errors every rank raises) and, under
// create_graph=True, the differentiable backward.
const auto& all_reduce_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("syncbn::all_reduce_", "")
                             .typed<Tensor(const Tensor&, int64_t, c10::string_view, c10::string_view, int64_t, bool)>();
  return op;
}

// The all-reduce of a payload, in place. The payload is never differentiated (the differentiable
// backward has its own operator): the call goes straight to the kernel, past autograd's fallback
// for an operator without a formula, which checks every argument on each call.
void all_reduce_payload(const Tensor& payload, int64_t comm_key, c10::string_view layer, const char* direction,
                        int64_t channels, bool debug) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  all_reduce_op().call(payload, comm_key, layer, direction, channels, debug);
}

const auto& differentiable_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("syncbn::differentiable_backward", "")
                             .typed<std::vector<Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                        const optional<Tensor>&, const Tensor&, double, int64_t,
                                                        c10::string_view, bool, bool, bool, bool)>();
  return op;
}

optional<Tensor> defined_or_none(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

struct SynchronizedNormalize : public torch::autograd::Function<SynchronizedNormalize> {
  static constexpr size_t kInputs = 10;  // forward's arguments, each given a gradient (most none)

  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const Tensor& mean, const Tensor& var, const Tensor& count,
                        double eps, int64_t comm_key, c10::string_view layer, bool debug) {
    const Tensor invstd = inverse_std(var, eps);  // once a step: the backward scales by it too
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd, count});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["comm_key"] = comm_key;
    ctx->saved_data["layer"] = std::string(layer);
    ctx->saved_data["debug"] = debug;
    return normalize_scaled(x, mean, invstd, weight, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t comm_key = ctx->saved_data["comm_key"].toInt();
    const std::string& layer = ctx->saved_data["layer"].toStringRef();
    const bool debug = ctx->saved_data["debug"].toBool();
    // needs_input_grad counts the tensors given, an absent weight not among them; the gradients
    // returned count every argument.
    const bool wanted[3] = {ctx->needs_input_grad(0), weight.defined() && ctx->needs_input_grad(1),
                            bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1)};
    torch::autograd::variable_list result(kInputs);  // undefined: no gradient
    if (at::GradMode::is_enabled()) {  // create_graph=True: a backward that is itself differentiable
      const std::vector<Tensor> found = differentiable_backward_op().call(
          grads[0], x, defined_or_none(weight), defined_or_none(bias), mean, eps, comm_key, layer, debug, wanted[0],
          wanted[1], wanted[2]);
      for (size_t i = 0, next = 0; i < 3; ++i) {
        if (wanted[i]) result[i] = found[next++];
      }
      return result;
    }
    // What functional._fused_backward does for the other backends, step for step.
    const Tensor dy = like(grads[0], dense(x, "synchronized_normalize").first, "synchronized_normalize", "dy");
    const Tensor& parameter = weight.defined() ? weight : bias;
    auto [sums, own_bias, own_weight] =
        backward_sums_scaled(dy, x, mean, invstd, parameter.defined() ? parameter.scalar_type() : at::kDouble);
    if (wanted[1]) result[1] = own_weight;
    if (wanted[2]) result[2] = own_bias.scalar_type() == bias.scalar_type() ? own_bias : own_bias.to(bias.scalar_type());
    if (wanted[0]) {
      all_reduce_payload(sums, comm_key, layer, "backward", x.size(1), debug);
      result[0] = input_grad_scaled(dy, x, mean, invstd, defined_or_none(weight), sums, saved[5]);
    }
    return result;
  }
};

Tensor synchronized_normalize(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                              const Tensor& mean, const Tensor& var, const Tensor& count, double eps, int64_t comm_key,
                              c10::string_view layer, bool debug) {
  return SynchronizedNormalize::apply(x, weight, bias, mean, var, count, eps, comm_key, layer, debug);
}

// The layer's training forward where nothing needs Python but the all-reduce, in one call: the local
// payload, its all-reduce, the group checks and statistics (checked_finalize; the running statistics
// updated where `update`), then normalize as the node above. Where the checks leave work first (an
// error every rank raises, a merge to redo about the global mean: functional._moments_after_checks)
// y is None and nothing is updated: (y, the reduced payload, whether this rank's own payload was
// finite, read only with check_finite).
std::tuple<optional<Tensor>, Tensor, bool> synchronized_batch_norm(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, bool update, double eps, int64_t comm_key,
    c10::string_view layer, bool debug, int64_t world_size, bool check_finite, double shift_tolerance,
    double mixed_dtype_shift_tolerance, double fp32_condition_limit) {
  Tensor payload = forward_payload(x, running_mean);
  bool finite_here = true;
  if (check_finite) {
    const double* p = payload.const_data_ptr<double>();
    for (int64_t i = 0; i < payload.numel(); ++i) finite_here = finite_here && std::isfinite(p[i]);
  }
  all_reduce_payload(payload, comm_key, layer, "forward", x.size(1), debug);
  const optional<Tensor> none;
  auto [ready, checks, count, mean, var] =
      checked_finalize(payload, running_mean, update ? running_mean : none, update ? running_var : none,
                       update ? num_batches_tracked : none, momentum, world_size, shift_tolerance,
                       mixed_dtype_shift_tolerance, fp32_condition_limit, check_finite);
  if (!ready) return {std::nullopt, payload, finite_here};
  return {synchronized_normalize(x, weight, bias, mean, var, count, eps, comm_key, layer, debug), payload,
          finite_here};
}

}  // namespace

TORCH_LIBRARY(syncbn_native, m) {
  m.def("forward_payload(Tensor x, Tensor? shift) -> Tensor");
  m.def("finalize(Tensor moments, Tensor? shift, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, float? momentum) -> (Tensor, Tensor, Tensor)");
  m.def("normalize(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("backward_sums(Tensor dy, Tensor x, Tensor mean, Tensor var, float eps, ScalarType parameter_dtype) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("input_grad(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, "
        "Tensor group_sums, Tensor count) -> Tensor");
  m.def("group_checks(Tensor payload, int world_size, float shift_tolerance, "
        "float mixed_dtype_shift_tolerance, float fp32_condition_limit) -> Tensor");
  m.def("checked_finalize(Tensor payload, Tensor? shift, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, float? momentum, int world_size, float shift_tolerance, "
        "float mixed_dtype_shift_tolerance, float fp32_condition_limit, bool check_finite) "
        "-> (bool, Tensor, Tensor, Tensor, Tensor)");
  m.def("any_below_floor(Tensor weight, Tensor? bias, float floor) -> bool");
  m.def("update_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) "
        "-> (Tensor, Tensor)");
  m.def("normalize_activate(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
        "int activation, float parameter) -> Tensor");
  m.def("normalize_activate_(Tensor(a!) x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
        "int activation, float parameter) -> ()");
  m.def("activated_backward_payload(Tensor dy, Tensor y, Tensor? weight, Tensor? bias, int activation, "
        "float parameter) -> Tensor");
  m.def("activated_input_grad(Tensor dy, Tensor y, Tensor var, Tensor? weight, Tensor? bias, float eps, "
        "int activation, float parameter, Tensor group_sums, Tensor count) -> Tensor");
  m.def("synchronized_normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, Tensor count, "
        "float eps, int comm_key, str layer, bool debug) -> Tensor");
  m.def("synchronized_batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, bool update, float eps, "
        "int comm_key, str layer, bool debug, int world_size, bool check_finite, float shift_tolerance, "
        "float mixed_dtype_shift_tolerance, float fp32_condition_limit) -> (Tensor?, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(syncbn_native, CPU, m) {
  m.impl("forward_payload", &forward_payload);
  m.impl("finalize", &finalize);
  m.impl("normalize", &normalize);
  m.impl("backward_sums", &backward_sums);
  m.impl("input_grad", &input_grad);
  m.impl("group_checks", &group_checks);
  m.impl("checked_finalize", &checked_finalize);
  m.impl("any_below_floor", &any_below_floor);
  m.impl("update_stats", &update_stats);
  m.impl("normalize_activate", &normalize_activate);
  m.impl("normalize_activate_", &normalize_activate_);
  m.impl("activated_backward_payload", &activated_backward_payload);
  m.impl("activated_input_grad", &activated_input_grad);
}

// Above autograd: the kernel is the node's apply, which records the node where a gradient is wanted.
TORCH_LIBRARY_IMPL(syncbn_native, CompositeImplicitAutograd, m) {
  m.impl("synchronized_normalize", &synchronized_normalize);
  m.impl("synchronized_batch_norm", &synchronized_batch_norm);
}
#endif  // part 2
