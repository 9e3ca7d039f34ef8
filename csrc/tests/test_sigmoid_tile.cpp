// Unit tests of csrc/sigmoid/sigmoid_tile.h, common/tile_math.h's log1p_unit and the torch-free
// CPU driver of the sigmoid (SigLIP) loss against a naive double-precision implementation.
// Built by CMakeLists.txt, run by ctest (`make cpp-test`).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "sigmoid/sigmoid_cpu.h"
#include "sigmoid/sigmoid_tile.h"
#include "tests/naive_tiles.h"

using namespace msclip;
using namespace msclip::sigmoid;

static int g_failures = 0;
#define CHECK(cond, ...)                                           \
  do {                                                             \
    if (!(cond)) {                                                 \
      ++g_failures;                                                \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                    \
      std::printf("\n");                                           \
    }                                                              \
  } while (0)

// Floors at 1e-30: fp32 flushes terms below e^-87 (exp_nonpos), so a loss or gradient of 1e-44
// (one pair, |s·x + b| = 100) comes out 0.
static double rel(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-30); }

static double softplus_d(double q) { return std::max(q, 0.0) + std::log1p(std::exp(-std::fabs(q))); }
static double sigma_d(double q) { return 1.0 / (1.0 + std::exp(-q)); }

static void test_scalar_math() {
  double worst = 0;
  for (int k = 0; k <= 100000; ++k) {  // e from 1e-38 to 1 (log-spaced), tiny e included
    const float e = static_cast<float>(std::pow(10.0, -38.0 + 38.0 * k / 100000.0));
    worst = std::max(worst, rel(log1p_unit(e), std::log1p(static_cast<double>(e))));
  }
  CHECK(worst < 1e-6, "log1p_unit worst relative error %.3g", worst);
  CHECK(log1p_unit(0.0f) == 0.0f, "log1p(0) = %g", log1p_unit(0.0f));
  // below q = -87 exp_nonpos flushes to 0 (softplus and σ < 2e-38 there): relative error on
  // [-87, 100] only
  double wsp87 = 0, wsg87 = 0;
  for (int k = 0; k <= 200000; ++k) {
    const float q = -87.0f + 187.0f * k / 200000.0f;
    wsp87 = std::max(wsp87, rel(softplus(q), softplus_d(q)));
    wsg87 = std::max(wsg87, rel(sigma(q), sigma_d(q)));
  }
  CHECK(wsp87 < 2e-6, "softplus worst relative error on [-87, 100]: %.3g", wsp87);
  CHECK(wsg87 < 2e-6, "sigma worst relative error on [-87, 100]: %.3g", wsg87);
  CHECK(std::isfinite(softplus(1e30f)) && softplus(1e30f) == 1e30f, "softplus(huge) = huge");
  CHECK(softplus(-1e30f) == 0.0f && sigma(-1e30f) == 0.0f && sigma(1e30f) == 1.0f, "saturation");
  CHECK(std::isnan(softplus(NAN)) && std::isnan(sigma(NAN)) && std::isnan(exp_nonpos(NAN)),
        "NaN propagates (a NaN logit must give a NaN loss)");
}

// Naive double loss and gradients (materializes N_I x N_T).
struct Ref {
  double loss = 0, ds = 0, db = 0;
  std::vector<double> dI, dT;
};

static Ref reference(const std::vector<float>& I, const std::vector<float>& T, int64_t ni,
                     int64_t nt, int64_t d, double s, double b, bool neg_only, double g) {
  Ref r;
  r.dI.assign(ni * d, 0.0);
  r.dT.assign(nt * d, 0.0);
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t j = 0; j < nt; ++j) {
      double raw = 0;
      for (int64_t k = 0; k < d; ++k) raw += double(I[i * d + k]) * T[j * d + k];
      const double z = (!neg_only && i == j) ? 1.0 : -1.0;
      const double y = s * raw + b;
      r.loss += softplus_d(-z * y) / ni;
      const double G = g * (-z) * sigma_d(-z * y) / ni;
      r.ds += G * raw;
      r.db += G;
      for (int64_t k = 0; k < d; ++k) {
        r.dI[i * d + k] += s * G * T[j * d + k];
        r.dT[j * d + k] += s * G * I[i * d + k];
      }
    }
  return r;
}

static double rel_norm(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

static std::vector<float> features(int64_t n, int64_t d, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n * d);
  for (int64_t i = 0; i < n; ++i) {
    double nrm = 0;
    for (int64_t k = 0; k < d; ++k) nrm += std::pow(v[i * d + k] = nd(rng), 2);
    for (int64_t k = 0; k < d; ++k) v[i * d + k] /= std::sqrt(nrm);  // L2-normalized rows
  }
  return v;
}

static void test_driver(int64_t ni, int64_t nt, int64_t d, float s, float b, bool neg_only,
                        int64_t tr, int64_t tc, int threads) {
  std::mt19937 rng(static_cast<unsigned>(ni * 131 + nt * 7 + d));
  const std::vector<float> I = features(ni, d, rng), T = features(nt, d, rng);
  CpuOptions opt;
  opt.tile_rows = tr;
  opt.tile_cols = tc;
  opt.num_threads = threads;
  const float g = 0.75f;
  Naive fwd(I, T, ni, nt, d);
  const double loss = forward_cpu(fwd, ni, nt, s, b, neg_only, opt);
  Naive tp(I, T, ni, nt, d);
  const Sums r = forward_backward_cpu(tp, ni, nt, s, b, neg_only, g, opt);
  const Ref ref = reference(I, T, ni, nt, d, s, b, neg_only, g);
  const double tol = 1e-5;
  CHECK(rel(loss, ref.loss) <= tol, "loss ni=%lld nt=%lld d=%lld s=%g b=%g neg=%d: %.9g vs %.9g",
        (long long)ni, (long long)nt, (long long)d, s, b, neg_only, loss, ref.loss);
  CHECK(loss == r.loss, "forward and forward_backward give one loss: %.17g vs %.17g", loss, r.loss);
  CHECK(rel_norm(tp.dI, ref.dI) <= 10 * tol, "dI ni=%lld s=%g b=%g tile %lldx%lld: rel %.3g",
        (long long)ni, s, b, (long long)tr, (long long)tc, rel_norm(tp.dI, ref.dI));
  CHECK(rel_norm(tp.dT, ref.dT) <= 10 * tol, "dT ni=%lld nt=%lld s=%g b=%g: rel %.3g", (long long)ni,
        (long long)nt, s, b, rel_norm(tp.dT, ref.dT));
  const double gscale = std::fabs(ref.ds) + std::fabs(ref.db) + 1e-6;
  CHECK(std::fabs(r.d_scale - ref.ds) <= 1e-4 * gscale, "ds ni=%lld s=%g b=%g: %.9g vs %.9g",
        (long long)ni, s, b, r.d_scale, ref.ds);
  CHECK(std::fabs(r.d_bias - ref.db) <= 1e-4 * gscale, "db ni=%lld s=%g b=%g: %.9g vs %.9g",
        (long long)ni, s, b, r.d_bias, ref.db);
}

// The chunked sums do not depend on the thread count: bitwise equal results.
static void test_deterministic() {
  std::mt19937 rng(5);
  const int64_t n = 77, d = 16;
  const std::vector<float> I = features(n, d, rng), T = features(n, d, rng);
  Sums out[2];
  std::vector<double> dI[2];
  for (int k = 0; k < 2; ++k) {
    CpuOptions opt;
    opt.tile_rows = 40;
    opt.tile_cols = 24;
    opt.num_threads = k == 0 ? 1 : 3;
    Naive tp(I, T, n, n, d);
    out[k] = forward_backward_cpu(tp, n, n, 10.0f, -10.0f, false, 1.0f, opt);
    dI[k] = tp.dI;
  }
  CHECK(out[0].loss == out[1].loss && out[0].d_scale == out[1].d_scale &&
            out[0].d_bias == out[1].d_bias && dI[0] == dI[1],
        "1 vs 3 threads differ: loss %.17g vs %.17g", out[0].loss, out[1].loss);
}

int main() {
  test_scalar_math();
  test_deterministic();
  // tile shapes: square, non-square (the diagonal crosses tile borders), 1-row tiles, whole matrix
  const int64_t tiles[][2] = {{8, 8}, {5, 3}, {1, 7}, {1024, 1024}};
  for (int64_t n : {1, 2, 7, 64, 131})
    for (int64_t d : {1, 13})
      for (float s : {1.0f, 10.0f, 100.0f})
        for (float b : {-10.0f, 0.0f, 10.0f})
          for (auto& t : tiles) test_driver(n, n, d, s, b, false, t[0], t[1], 2);
  for (auto& t : tiles) {
    test_driver(7, 13, 5, 10.0f, -10.0f, true, t[0], t[1], 2);  // more texts than images
    test_driver(37, 2, 5, 30.0f, 3.0f, true, t[0], t[1], 2);    // fewer
    test_driver(1, 1, 1, 100.0f, 10.0f, true, t[0], t[1], 2);
  }
  test_driver(130, 130, 33, 100.0f, -10.0f, false, 16, 8, 3);  // more threads than the machine has
  if (g_failures) std::printf("%d check(s) failed\n", g_failures);
  else std::printf("all sigmoid tile tests passed\n");
  return g_failures ? 1 : 0;
}
