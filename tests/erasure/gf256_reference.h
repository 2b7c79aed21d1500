// A plain GF(2^8) for tests, independent of ISA-L: log/exp tables over the polynomial ISA-L uses,
// x^8 + x^4 + x^3 + x^2 + 1 (0x11d), with generator 2; the Cauchy generator matrix as ISA-L
// documents it; and a byte-at-a-time encode.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace memento::gf256 {

struct Tables {
  std::array<uint8_t, 512> exp{};
  std::array<int, 256> log{};
  Tables() {
    int x = 1;
    for (int i = 0; i < 255; ++i) {
      exp[i] = exp[i + 255] = static_cast<uint8_t>(x);
      log[x] = i;
      x <<= 1;
      if (x & 0x100) x ^= 0x11d;
    }
  }
};

inline const Tables& T() {
  static const Tables tables;
  return tables;
}

inline uint8_t Mul(uint8_t a, uint8_t b) {
  if (a == 0 || b == 0) return 0;
  return T().exp[T().log[a] + T().log[b]];
}

// a != 0.
inline uint8_t Inv(uint8_t a) { return T().exp[255 - T().log[a]]; }

// (k + m) x k, row-major: the identity, then row i (k <= i < k + m), column j = 1 / (i xor j).
inline std::vector<uint8_t> CauchyMatrix(int k, int m) {
  std::vector<uint8_t> g(static_cast<size_t>(k + m) * k, 0);
  for (int i = 0; i < k; ++i) g[static_cast<size_t>(i) * k + i] = 1;
  for (int i = k; i < k + m; ++i) {
    for (int j = 0; j < k; ++j) g[static_cast<size_t>(i) * k + j] = Inv(static_cast<uint8_t>(i ^ j));
  }
  return g;
}

// (k + m) x k: the identity, then m rows of ones (xor: m = 1; replicate: k = 1).
inline std::vector<uint8_t> OnesMatrix(int k, int m) {
  std::vector<uint8_t> g(static_cast<size_t>(k + m) * k, 1);
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) g[static_cast<size_t>(i) * k + j] = i == j ? 1 : 0;
  }
  return g;
}

// parity[j][b] = sum over i of g[k + j][i] * data[i][b].
inline std::vector<std::vector<uint8_t>> Encode(const std::vector<uint8_t>& g, int k, int m,
                                                const std::vector<std::vector<uint8_t>>& data) {
  const size_t len = data[0].size();
  std::vector<std::vector<uint8_t>> parity(m, std::vector<uint8_t>(len, 0));
  for (int j = 0; j < m; ++j) {
    for (int i = 0; i < k; ++i) {
      const uint8_t c = g[static_cast<size_t>(k + j) * k + i];
      for (size_t b = 0; b < len; ++b) parity[j][b] ^= Mul(c, data[i][b]);
    }
  }
  return parity;
}

}  // namespace memento::gf256
