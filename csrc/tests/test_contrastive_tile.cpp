// Unit tests of csrc/contrastive/contrastive_tile.h and the torch-free CPU driver against a naive
// double-precision implementation. Built by CMakeLists.txt, run by ctest (`make cpp-test`).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "contrastive/contrastive_cpu.h"
#include "contrastive/contrastive_tile.h"
#include "tests/naive_tiles.h"

using namespace msclip;
using namespace msclip::contrastive;

static int g_failures = 0;
#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      ++g_failures;                                             \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                 \
      std::printf("\n");                                        \
    }                                                           \
  } while (0)

static double rel(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-30); }

static double logsumexp(const std::vector<double>& v) {
  double m = -INFINITY;
  for (double x : v) m = std::max(m, x);
  double s = 0;
  for (double x : v) s += std::exp(x - m);
  return m + std::log(s);
}

static void test_exp() {
  double worst = 0;
  for (int k = 0; k <= 200000; ++k) {
    float x = -87.0f + 87.5f * k / 200000.0f;  // [-87, 0.5]: a rounding overshoot stays accurate
    double e = std::exp(static_cast<double>(x));
    worst = std::max(worst, rel(exp_nonpos(x), e));
  }
  CHECK(worst < 5e-7, "exp_nonpos worst relative error %.3g", worst);
  CHECK(exp_nonpos(-88.0f) == 0.0f && exp_nonpos(-1e30f) == 0.0f, "underflow to 0");
  CHECK(exp_nonpos(neg_inf()) == 0.0f, "exp(-inf) = 0");
  CHECK(exp_nonpos(0.0f) == 1.0f, "exp(0) = %.9g", exp_nonpos(0.0f));
}

static void test_lse_merge() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-100.f, 100.f);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial % 37;
    std::vector<float> xs(n);
    std::vector<double> xd(n);
    for (int i = 0; i < n; ++i) xd[i] = xs[i] = u(rng);
    // split at an arbitrary point, accumulate each half, merge (also with empties)
    const int cut = trial % (n + 1);
    Lse a = lse_empty(), b = lse_empty();
    for (int i = 0; i < cut; ++i) a = lse_add(a, xs[i]);
    for (int i = cut; i < n; ++i) b = lse_add(b, xs[i]);
    Lse m = lse_merge(lse_merge(a, lse_empty()), b);
    const double ref = logsumexp(xd);
    CHECK(std::fabs(lse_value(m) - ref) < 1e-5 * std::max(1.0, std::fabs(ref)), "merge %g vs %g",
          lse_value(m), ref);
  }
  CHECK(lse_value(lse_empty()) == neg_inf(), "empty is -inf");
  CHECK(lse_value(lse_merge(lse_empty(), lse_empty())) == neg_inf(), "empty+empty");
}

static void test_row_col_tile() {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  for (float scale : {1.0f, 30.0f, 100.0f}) {
    const int rows = 13, cols = 29;
    std::vector<float> raw(rows * cols);
    for (auto& v : raw) v = std::tanh(nd(rng));  // |raw| < 1 like cosine similarities
    // rows
    for (int i = 0; i < rows; ++i) {
      std::vector<double> xs(cols);
      for (int j = 0; j < cols; ++j) xs[j] = double(scale) * raw[i * cols + j];
      CHECK(std::fabs(lse_value(row_lse(&raw[i * cols], cols, scale)) - logsumexp(xs)) < 1e-4,
            "row %d scale %g", i, scale);
    }
    // columns, fed in chunks of 5 rows
    std::vector<float> cm(cols, neg_inf()), cs(cols, 0.0f);
    for (int c = 0; c < rows; c += 5)
      col_lse_update(&raw[c * cols], std::min(5, rows - c), cols, cols, scale, cm.data(), cs.data());
    for (int j = 0; j < cols; ++j) {
      std::vector<double> xs(rows);
      for (int i = 0; i < rows; ++i) xs[i] = double(scale) * raw[i * cols + j];
      CHECK(std::fabs(lse_value(Lse{cm[j], cs[j]}) - logsumexp(xs)) < 1e-4, "col %d scale %g", j,
            scale);
    }
  }
}

// Naive double loss and gradients (materializes N x N).
static void reference(const std::vector<float>& I, const std::vector<float>& T, int64_t n,
                      int64_t d, double s, double g, double* loss, std::vector<double>& dI,
                      std::vector<double>& dT, double* ds) {
  std::vector<double> raw(n * n), lr(n), lc(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += double(I[i * d + k]) * T[j * d + k];
      raw[i * n + j] = acc;
    }
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> r(n), c(n);
    for (int64_t j = 0; j < n; ++j) r[j] = s * raw[i * n + j], c[j] = s * raw[j * n + i];
    lr[i] = logsumexp(r);
    lc[i] = logsumexp(c);
  }
  *loss = 0;
  for (int64_t i = 0; i < n; ++i) *loss += (lr[i] + lc[i] - 2 * s * raw[i * n + i]) / (2.0 * n);
  dI.assign(n * d, 0.0);
  dT.assign(n * d, 0.0);
  *ds = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double x = s * raw[i * n + j];
      const double G = g * (std::exp(x - lr[i]) + std::exp(x - lc[j]) - 2.0 * (i == j)) / (2.0 * n);
      *ds += G * raw[i * n + j];
      for (int64_t k = 0; k < d; ++k) {
        dI[i * d + k] += s * G * T[j * d + k];
        dT[j * d + k] += s * G * I[i * d + k];
      }
    }
}

static double rel_norm(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

static void test_driver(int64_t n, int64_t d, float scale, int64_t tr, int64_t tc, bool dup,
                        int threads) {
  std::mt19937 rng(static_cast<unsigned>(n * 131 + d));
  std::normal_distribution<float> nd;
  std::vector<float> I(n * d), T(n * d);
  for (auto* v : {&I, &T})
    for (int64_t i = 0; i < n; ++i) {
      double nrm = 0;
      for (int64_t k = 0; k < d; ++k) nrm += std::pow((*v)[i * d + k] = nd(rng), 2);
      for (int64_t k = 0; k < d; ++k) (*v)[i * d + k] /= std::sqrt(nrm);  // L2-normalized rows
    }
  if (dup)  // second half repeats the first half: duplicated pairs
    for (int64_t i = n / 2; i < n; ++i)
      for (int64_t k = 0; k < d; ++k)
        I[i * d + k] = I[(i - n / 2) * d + k], T[i * d + k] = T[(i - n / 2) * d + k];

  CpuOptions opt;
  opt.tile_rows = tr;
  opt.tile_cols = tc;
  opt.num_threads = threads;
  Naive tp(I, T, n, n, d);
  std::vector<float> lr(n), lc(n);
  const float g = 0.75f;
  const double loss = forward_cpu(tp, n, scale, lr.data(), lc.data(), opt);
  const double ds = backward_cpu(tp, n, scale, lr.data(), lc.data(), g, opt);

  double rloss, rds;
  std::vector<double> rdI, rdT;
  reference(I, T, n, d, scale, g, &rloss, rdI, rdT, &rds);
  const double tol = 1e-5;
  CHECK(std::fabs(loss - rloss) <= tol * std::max(1.0, std::fabs(rloss)),
        "loss n=%lld d=%lld s=%g: %.9g vs %.9g", (long long)n, (long long)d, scale, loss, rloss);
  if (n == 1) {
    CHECK(rel_norm(tp.dI, rdI) <= tol || std::sqrt([&] { double a = 0; for (double v : tp.dI) a += v * v; return a; }()) < 1e-7,
          "n=1 grad must vanish");
    return;
  }
  CHECK(rel_norm(tp.dI, rdI) <= tol * 10, "dI n=%lld d=%lld s=%g tile %lldx%lld: rel %.3g",
        (long long)n, (long long)d, scale, (long long)tr, (long long)tc, rel_norm(tp.dI, rdI));
  CHECK(rel_norm(tp.dT, rdT) <= tol * 10, "dT n=%lld d=%lld s=%g: rel %.3g", (long long)n,
        (long long)d, scale, rel_norm(tp.dT, rdT));
  CHECK(std::fabs(ds - rds) <= 1e-4 * std::max(1e-3, std::fabs(rds)), "ds n=%lld s=%g: %.9g vs %.9g",
        (long long)n, scale, ds, rds);
}

int main() {
  test_exp();
  test_lse_merge();
  test_row_col_tile();
  // tile shapes: square, non-square (diagonal crosses tile borders), 1-row tiles, whole matrix
  const int64_t tiles[][2] = {{8, 8}, {5, 3}, {1, 7}, {1024, 1024}};
  for (int64_t n : {1, 2, 3, 7, 64, 131})
    for (int64_t d : {1, 7, 33})
      for (float s : {1.0f, 14.3f, 100.0f})
        for (auto& t : tiles) test_driver(n, d, s, t[0], t[1], false, 2);
  test_driver(64, 16, 100.0f, 8, 16, true, 2);  // duplicated pairs
  test_driver(77, 16, 50.0f, 16, 8, true, 1);
  test_driver(77, 16, 50.0f, 16, 8, true, 3);  // more threads than the machine has
  if (g_failures) std::printf("%d check(s) failed\n", g_failures);
  else std::printf("all contrastive tile tests passed\n");
  return g_failures ? 1 : 0;
}
