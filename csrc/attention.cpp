// attention forward on CPU, fp32: softmax(q kᵀ · scale, key padding, causal) v at any qk / v widths,
// fused per (batch, head, block of queries). Each task multiplies its query rows, read where the
// projection left them (the heads of a (B, N, H, D) output need no copy), by the head's keys
// (transposed and scaled into a small per-task buffer), takes the softmax of those scores in place
// while they are in cache (a vectorised exp of our own, cloned per instruction set) and multiplies
// them by the head's values, read in place too, straight into the (B, N, H, Dv) output, so that
// the caller's reshape to (B, N, H·Dv) is a view. Nothing of size N·M leaves the task; no q / k /
// v / output copies as on the chunked torch route. Keys after a batch row's last kept one (the
// padding of a right-padded batch) are left out of both products and the softmax, so a row costs
// what its own length does, not the batch's. Masked keys never reach the output, inf / NaN
// included (their scores become -inf; values at masked keys before a row's end are zeroed in a
// copy when any is not finite), so callers need not check it. The products run on torch's
// batch-reduce GEMM (at::native::cpublas::brgemm: oneDNN's JIT microkernels where torch's build
// and the CPU allow them, as on this AVX-512 machine, else torch's own GEMM); with a torch too old
// to have its fp32 form, on the BLAS torch links (its exported Fortran sgemm_), and where torch
// exports neither the op reports itself unavailable and the torch route runs. The backward stays on the torch route (spp_kernels.ext_ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(CPUBLAS_BRGEMM_F32F32F32)
#define SPP_ATTENTION_BRGEMM 1
#else
#define SPP_ATTENTION_BRGEMM 0
#endif

extern "C" {
// Fortran BLAS, 32-bit integers (LP64): what torch's own CPU GEMMs call; used where torch has no
// fp32 brgemm. Weak: absent in a torch built without a BLAS, which the op then reports
// (attention_cpu_available).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// one copy of each loop per x86-64 level, chosen when the library loads (AVX-512, AVX2 or SSE2)
#define SPP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPP_CLONES
#endif

namespace spp_ext {
namespace {

// Always inlined: a vf16 passed to or returned from a call is in one register in an AVX-512 clone
// and in memory in the default build of the callee, so an out-of-line helper would garble it.
#define SPP_INLINE inline __attribute__((always_inline))

// 16 floats as one value: GCC / Clang lower its arithmetic to one AVX-512 register, two AVX2 or
// four SSE ones, whichever the clone below was compiled for
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

SPP_INLINE vf16 load(const float* p) {
  vf16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
SPP_INLINE void store(float* p, vf16 x) { std::memcpy(p, &x, sizeof x); }
SPP_INLINE vf16 splat(float a) { return vf16{} + a; }
constexpr vi16 kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// the largest lane (NaN lanes lose every comparison) and the sum of the lanes, pairwise
SPP_INLINE float hmax(vf16 v) {
  vf16 w = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = w > v ? w : v;
  w = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = w > v ? w : v;
  w = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = w > v ? w : v;
  w = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  v = w > v ? w : v;
  return v[0];
}
SPP_INLINE float hsum(vf16 v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// The project builds with -ffp-contract=off (kernels that must match their references exactly);
// the softmax below may fuse its multiply-adds: a third fewer vector operations in the exp, which
// bounds the kernel at small widths, and results that are as accurate (tested against torch).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// exp(x) by range reduction x = n·ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to r^7
// (truncation below 1e-8 relative) and 2^n through the exponent bits; x below -87.3 (masked keys:
// -inf) gives 0, NaN stays NaN
SPP_INLINE vf16 vexp(vf16 x) {
  const vf16 lo = splat(-87.3f);
  const vf16 t = x * 1.44269504088896341f;
  const vf16 n = (t + 12582912.0f) - 12582912.0f;  // + 1.5·2^23 and back: rounded to an integer
  vf16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf16 p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vf16 nn = x < lo ? splat(0.0f) : n;  // keeps the exponent in range (and NaN out of the integer)
  const vi16 e = (__builtin_convertvector(nn, vi16) + 127) << 23;
  const vf16 y = p * reinterpret_cast<const vf16&>(e);
  return x < lo ? splat(0.0f) : y;
}

// The keys row i of a query block may see: j < kend, and with causal j < lim0 + i (lim0 = the
// block's first row + M - N + 1: the bottom-right aligned diagonal)
SPP_INLINE int64_t row_limit(bool causal, int64_t lim0, int64_t i, int64_t kend) {
  return causal ? std::clamp<int64_t>(lim0 + i, 0, kend) : kend;
}

// The softmax of the r rows of a query block's scores S (row stride ld, a multiple of kLanes at
// least kend rounded up to it), in place: row i's kept keys are j < lim_i (kend, or with causal
// min(kend, lim0 + i) clamped at 0). Row i of add (row stride add_ld, add_len long; an additive
// score bias, when given) is added, then -inf set where kbias (the batch row's key padding as
// 0 / -inf, when given, padded with -inf to whole vectors) is -inf — whatever s[j] was, so that
// inf / NaN in a padded key never reaches the row; s[j] <- exp(s[j] - max) for j < lim_i and 0 for
// the rest of the row up to kend, then each row divided by its sum. Rows whose limit does not pass
// the first kept key (none to attend) get all 0, and the function returns whether there were any.
// One call per block: the row loop, the bias, the max and the exp all stay in registers and in
// this one clone (per-row calls through the clones' indirection cost as much as the exp at
// MiniLM's key counts), and the lanes past lim_i in the last vector are set to -inf, so neither
// the max nor the exp needs a scalar tail.
SPP_CLONES bool softmax_rows(float* S, int64_t ld, int64_t r, int64_t kend, bool causal, int64_t lim0,
                             int64_t first, const float* add, int64_t add_ld, int64_t add_len,
                             const float* kbias) {
  const float ninf = -std::numeric_limits<float>::infinity();
  bool without = false;
  for (int64_t i = 0; i < r; ++i) {
    float* s = S + i * ld;
    const int64_t lim = row_limit(causal, lim0, i, kend);
    if (lim <= first) {
      std::fill(s, s + kend, 0.0f);
      without = true;
      continue;
    }
    const float* a = add != nullptr ? add + i * add_ld : nullptr;
    const int64_t whole = lim / kLanes * kLanes;
    vf16 acc = splat(ninf);
    for (int64_t j = 0; j < whole; j += kLanes) {
      vf16 x = load(s + j);
      if (a != nullptr) x = x + load(a + j);
      if (kbias != nullptr) {
        const vf16 bj = load(kbias + j);
        x = bj < 0.0f ? bj : x;
      }
      if (a != nullptr || kbias != nullptr) store(s + j, x);
      acc = x > acc ? x : acc;
    }
    if (whole < lim) {  // the last vector, lanes past lim -inf (kbias is padded; add ends at add_len)
      vf16 x = load(s + whole);
      if (a != nullptr) {
        if (whole + kLanes <= add_len) {
          x = x + load(a + whole);
        } else {
          float tail[kLanes] = {};
          std::copy(a + whole, a + add_len, tail);
          x = x + load(tail);
        }
      }
      if (kbias != nullptr) {
        const vf16 bj = load(kbias + whole);
        x = bj < 0.0f ? bj : x;
      }
      x = kIota + static_cast<int32_t>(whole) < static_cast<int32_t>(lim) ? x : splat(ninf);
      store(s + whole, x);
      acc = x > acc ? x : acc;
    }
    const float mx = hmax(acc);
    const int64_t span = whole < lim ? whole + kLanes : whole;
    vf16 sum = {};
    for (int64_t j = 0; j < span; j += kLanes) {
      const vf16 y = vexp(load(s + j) - mx);
      store(s + j, y);
      sum += y;
    }
    const float f = 1.0f / hsum(sum);
    for (int64_t j = 0; j < span; j += kLanes) store(s + j, load(s + j) * f);
    if (span < kend) std::fill(s + span, s + kend, 0.0f);  // (causal rows short of the block's keys)
  }
  return without;
}

#pragma GCC pop_options

// C (m, n) = A (m, k) B (k, n), all row-major with leading dimensions lda, ldb, ldc; C is written,
// not read. brgemm where torch has it, except for a single output column (P·V at Dv = 1), where
// brgemm ran ~2.5x slower than the BLAS's matrix-vector path (its narrow tiles cost as much as 16
// columns); the BLAS elsewhere.
void mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
        int64_t ldc) {
#if SPP_ATTENTION_BRGEMM
  if (n > 1 || sgemm_ == nullptr) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c, /*is_vnni=*/false);
    return;
  }
#endif
  // column-major BLAS: Cᵀ (n, m) = Bᵀ (n, k) Aᵀ (k, m)
  const char no = 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&no, &no, &mi, &ni, &ki, &one, b, &la, a, &lb, &zero, c, &lc);
}

// A (rows, width) view of a 4-D tensor whose last dim is dense and whose rows do not overlap:
// what a GEMM reads through a leading dimension. Others are copied once.
at::Tensor gemm_ready(const at::Tensor& t) {
  const int64_t w = t.size(3);
  if (t.stride(3) == 1 && t.stride(2) >= std::max<int64_t>(w, 1)) return t;
  return t.contiguous();
}

}  // namespace

bool attention_cpu_available() { return SPP_ATTENTION_BRGEMM || sgemm_ != nullptr; }

const char* attention_cpu_gemm() { return SPP_ATTENTION_BRGEMM ? "brgemm" : "blas"; }

// q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv) fp32 CPU; keep: (B, M) bool key padding (true =
// attend) or none; causal: query i sees keys j <= i + M - N; bias: an fp32 (Bb, Hb, N, M) score
// bias added after the scale, batch row b adding bias[b % Bb], head h bias[., h % Hb] (Hb 1 or H;
// Swin's relative positions and window masks), or none. Returns (B, N, H, Dv), contiguous (the
// caller's (B, H, N, Dv) is its permuted view). Query rows without keys (all padding, or causal
// with N > M) give 0.
at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                         const std::optional<at::Tensor>& keep_in, bool causal,
                         const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(attention_cpu_available(), "spp_ext.attention: torch exports neither an fp32 brgemm nor sgemm_ here");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "spp_ext.attention: q, k, v must be 4-D");
  for (const auto* t : {&q_in, &k_in, &v_in}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "spp_ext.attention: fp32 CPU tensors only");
  }
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const int64_t M = k_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D, "spp_ext.attention: k must be (B, H, M, D)");
  TORCH_CHECK(v_in.size(0) == B && v_in.size(1) == H && v_in.size(2) == M, "spp_ext.attention: v must be (B, H, M, Dv)");
  TORCH_CHECK(std::max({N, M, D, Dv, H * Dv}) < (int64_t{1} << 31), "spp_ext.attention: sizes beyond 32-bit BLAS");
  at::Tensor keep;
  if (keep_in.has_value()) {
    keep = keep_in->to(at::kBool).contiguous();
    TORCH_CHECK(keep.dim() == 2 && keep.size(0) == B && keep.size(1) == M, "spp_ext.attention: keep must be (B, M)");
  }
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.device().is_cpu(), "spp_ext.attention: bias must be fp32 CPU");
    TORCH_CHECK(bias.dim() == 4 && bias.size(0) > 0 && B % bias.size(0) == 0 &&
                    (bias.size(1) == 1 || bias.size(1) == H) && bias.size(2) == N && bias.size(3) == M,
                "spp_ext.attention: bias must be (Bb, Hb, N, M) with Bb dividing B and Hb in {1, H}");
  }
  at::Tensor out = at::empty({B, N, H, Dv}, q_in.options());
  if (B == 0 || H == 0 || N == 0 || Dv == 0) return out;
  const at::Tensor q = gemm_ready(q_in), k = gemm_ready(k_in);
  at::Tensor v = gemm_ready(v_in);
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const bool* KEEP = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  const float* BIAS = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t Bb = bias.defined() ? bias.size(0) : 1, Hb = bias.defined() ? bias.size(1) : 1;
  float* O = out.data_ptr<float>();
  // per batch row: the key padding as a 0 / -inf score bias, the first kept key (a query row has
  // keys when its causal limit passes it) and the end of the kept keys: the keys after it (a
  // right-padded batch's padding) take no part in the products or the softmax at all
  std::vector<int64_t> first(B, 0), end(B, M);
  const int64_t ldmax = (M + kLanes - 1) / kLanes * kLanes;  // M rounded up to whole vectors
  std::vector<float> kbias;  // (B, ldmax), -inf past M
  if (KEEP != nullptr) {
    kbias.assign(static_cast<size_t>(B * ldmax), -std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b < B; ++b) {
      const bool* kb = KEEP + b * M;
      first[b] = std::find(kb, kb + M, true) - kb;
      int64_t e = M;
      while (e > 0 && !kb[e - 1]) --e;
      end[b] = e;
      for (int64_t j = 0; j < M; ++j) kbias[b * ldmax + j] = kb[j] ? 0.0f : -std::numeric_limits<float>::infinity();
    }
    // A masked key before its row's end (left padding, a mask with gaps) gets weight 0, but 0
    // times an inf / NaN value is NaN: such values are zeroed in a copy of v (made only when
    // there are any), so that no masked key's value reaches the output. (Keys need nothing: their
    // scores are replaced by -inf, whatever they were.)
    // (batch rows scanned in parallel: a left-padded batch has a hole per padded key)
    std::vector<uint8_t> bad(static_cast<size_t>(B * M), 0);
    const float* V0 = v.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t j = 0; j < end[b]; ++j) {
          if (KEEP[b * M + j]) continue;
          bool finite = true;
          for (int64_t h = 0; h < H && finite; ++h) {
            const float* row = V0 + b * v.stride(0) + h * v.stride(1) + j * v.stride(2);
            for (int64_t d = 0; d < Dv; ++d) finite = finite && std::isfinite(row[d]);
          }
          bad[b * M + j] = !finite;
        }
      }
    });
    if (std::find(bad.begin(), bad.end(), 1) != bad.end()) {
      v = v.clone();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < M; ++j) {
          if (bad[b * M + j]) v.select(0, b).select(1, j).zero_();
        }
      }
    }
  }
  const float* V = v.data_ptr<float>();
  // query rows per task: their scores within 256 KiB, at most 64 rows, fewer (down to 16) where
  // that would leave under 4 tasks per thread
  int64_t rows = std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(ldmax, 1), 1, 64);
  while (rows > 16 && B * H * ((N + rows - 1) / rows) < 4 * at::get_num_threads()) rows /= 2;
  const int64_t blocks = (N + rows - 1) / rows;
  const float fscale = static_cast<float>(scale);
  const int64_t ldo = H * Dv;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(static_cast<size_t>(rows * std::max<int64_t>(ldmax, 1)));
    std::vector<float> KT(static_cast<size_t>(D * M));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (H * blocks), h = (t / blocks) % H, i0 = (t % blocks) * rows;
      const int64_t r = std::min(rows, N - i0);
      const float* qp = Q + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
      const float* kp = K + b * k.stride(0) + h * k.stride(1);
      const float* vp = V + b * v.stride(0) + h * v.stride(1);
      float* op = O + (b * N + i0) * ldo + h * Dv;
      const float* bp = BIAS != nullptr ? BIAS + (((b % Bb) * Hb + h % Hb) * N + i0) * M : nullptr;
      // keys any row of the block may see; the scores' rows padded to whole vectors
      const int64_t kend = std::min(causal ? std::clamp<int64_t>(i0 + r + M - N, 0, M) : M, end[b]);
      const int64_t ld = (kend + kLanes - 1) / kLanes * kLanes;
      if (kend == 0) {
        for (int64_t i = 0; i < r; ++i) std::fill(op + i * ldo, op + i * ldo + Dv, 0.0f);
        continue;
      }
      if (D > 0) {  // S (r, kend) = Q (scale · K)ᵀ, the scaled keys transposed into KT (D, kend)
        for (int64_t j = 0; j < kend; ++j) {
          const float* kj = kp + j * k.stride(2);
          for (int64_t d = 0; d < D; ++d) KT[d * kend + j] = kj[d] * fscale;
        }
        mm(r, kend, D, qp, q.stride(2), KT.data(), kend, S.data(), ld);
      } else {
        for (int64_t i = 0; i < r; ++i) std::fill(S.data() + i * ld, S.data() + i * ld + kend, 0.0f);
      }
      const int64_t lim0 = i0 + M - N + 1;
      const bool without = softmax_rows(S.data(), ld, r, kend, causal, lim0, first[b], bp, M, M,
                                        KEEP != nullptr ? kbias.data() + b * ldmax : nullptr);
      mm(r, Dv, kend, S.data(), ld, vp, v.stride(2), op, ldo);  // O (r, Dv) = P V, rows H·Dv apart
      if (without) {  // rows without keys: exactly 0, also where V holds inf / NaN
        for (int64_t i = 0; i < r; ++i) {
          if (row_limit(causal, lim0, i, kend) <= first[b]) std::fill(op + i * ldo, op + i * ldo + Dv, 0.0f);
        }
      }
    }
  });
  return out;
}

}  // namespace spp_ext
