// What the converters' tests share: reading a file whole, a fresh directory per test, shell quoting.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace memento::test {

// The file's bytes ("" when it cannot be read).
inline std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// An empty directory for the running test: $MEMENTO_TEST_TMP (or gtest's) /<suite>.<test>.
inline std::string TestRoot() {
  const char* tmp = std::getenv("MEMENTO_TEST_TMP");
  std::string base = tmp != nullptr ? tmp : ::testing::TempDir();
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string root = base + "/" + info->test_suite_name() + "." + info->name();
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  return root;
}

// `s` single-quoted for sh.
inline std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace memento::test
