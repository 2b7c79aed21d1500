// Scheme: parsing, printing and the errors that name the bad text.
#include "erasure/scheme.h"

#include <gtest/gtest.h>

namespace memento {
namespace {

TEST(SchemeTest, ParsesEveryKindAndPrintsItBack) {
  struct Case {
    const char* text;
    Scheme::Kind kind;
    int m;
  };
  const Case cases[] = {
      {"none", Scheme::Kind::kNone, 0},          {"xor", Scheme::Kind::kXor, 1},
      {"replicate:2", Scheme::Kind::kReplicate, 1}, {"replicate:33", Scheme::Kind::kReplicate, 32},
      {"rs:1", Scheme::Kind::kReedSolomon, 1},   {"rs:2", Scheme::Kind::kReedSolomon, 2},
      {"rs:32", Scheme::Kind::kReedSolomon, 32},
  };
  for (const Case& c : cases) {
    Result<Scheme> s = Scheme::Parse(c.text);
    ASSERT_TRUE(s.ok()) << c.text << ": " << s.status().ToString();
    EXPECT_EQ(s->kind, c.kind) << c.text;
    EXPECT_EQ(s->m, c.m) << c.text;
    EXPECT_EQ(s->ToString(), c.text);
  }
  EXPECT_EQ(Scheme().ToString(), "none");
  EXPECT_EQ((Scheme{Scheme::Kind::kReedSolomon, 4}), *Scheme::Parse("rs:4"));
}

TEST(SchemeTest, RejectsBadTextNamingIt) {
  const std::pair<const char*, const char*> cases[] = {
      {"", "unknown erasure scheme '': expected none, replicate:<r>, xor or rs:<m>"},
      {"raid6", "unknown erasure scheme 'raid6': expected none, replicate:<r>, xor or rs:<m>"},
      {"RS:2", "unknown erasure scheme 'RS:2': expected none, replicate:<r>, xor or rs:<m>"},
      {" rs:2", "unknown erasure scheme ' rs:2': expected none, replicate:<r>, xor or rs:<m>"},
      {"rs", "erasure scheme 'rs' needs a count: rs:<m>, e.g. rs:2"},
      {"replicate", "erasure scheme 'replicate' needs a count: replicate:<r>, e.g. replicate:2"},
      {"rs:", "erasure scheme 'rs:': parity count m '' is not a whole number"},
      {"rs:x", "erasure scheme 'rs:x': parity count m 'x' is not a whole number"},
      {"rs:2 ", "erasure scheme 'rs:2 ': parity count m '2 ' is not a whole number"},
      {"rs:-1", "erasure scheme 'rs:-1': parity count m must be 1..32, got -1"},
      {"rs:0", "erasure scheme 'rs:0': parity count m must be 1..32, got 0"},
      {"rs:33", "erasure scheme 'rs:33': parity count m must be 1..32, got 33"},
      {"rs:99999999999", "erasure scheme 'rs:99999999999': parity count m must be 1..32, got 99999999999"},
      {"replicate:1", "erasure scheme 'replicate:1': a single copy protects nothing; use none, or replicate:2 and up"},
      {"replicate:0", "erasure scheme 'replicate:0': copy count r must be 2..33, got 0"},
      {"replicate:34", "erasure scheme 'replicate:34': copy count r must be 2..33, got 34"},
      {"xor:1", "erasure scheme 'xor:1': xor takes no count"},
      {"none:0", "erasure scheme 'none:0': none takes no count"},
  };
  for (const auto& [text, message] : cases) {
    Result<Scheme> s = Scheme::Parse(text);
    ASSERT_FALSE(s.ok()) << "'" << text << "' parsed";
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument) << text;
    EXPECT_EQ(s.status().message(), message);
  }
}

}  // namespace
}  // namespace memento
