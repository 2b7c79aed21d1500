// A tiny training loop against an installed memento: registers a sharded weight, its Adam
// moment and an RNG blob, snapshots each step, then restores into cleared buffers and checks
// every byte. Usage: consumer <steps>   (agent socket and job id from the environment)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "snapshot/client.h"

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 3;
  memento::ClientOptions opts;
  opts.rank = 0;
  opts.local_rank = 0;
  opts.world_size = 1;
  auto client = memento::Client::Connect(opts);
  if (!client.ok()) {
    std::fprintf(stderr, "consumer: %s\n", client.status().ToString().c_str());
    return 1;
  }
  // Rank 0 of a 2-way row split of a [256, 64] weight, plus the Adam moment of that shard.
  auto spec = memento::SplitEvenly({256, 64}, 0, 2, 0);
  if (!spec.ok()) return 1;
  std::vector<float> w(128 * 64), m(128 * 64);
  std::string rng(64, '\0');
  size_t rng_size = 0;
  auto check = [](const memento::Status& st, const char* what) {
    if (!st.ok()) {
      std::fprintf(stderr, "consumer: %s: %s\n", what, st.ToString().c_str());
      std::exit(1);
    }
  };
  check((*client)->RegisterTensor("layer.w", w.data(), memento::DType::kF32, *spec), "register w");
  check((*client)->RegisterTensor("layer.w.exp_avg", m.data(), memento::DType::kF32, *spec), "register m");
  check((*client)->RegisterBlob("rng", rng.data(), rng.size(), &rng_size), "register rng");
  check((*client)->FinishRegistration(), "finish registration");
  for (int step = 1; step <= steps; ++step) {
    check((*client)->WaitUntilSafeToUpdate(), "wait");
    for (size_t i = 0; i < w.size(); ++i) {
      w[i] = static_cast<float>(step * 1000 + i);
      m[i] = static_cast<float>(step) * 0.5f;
    }
    std::string s = "rng-state-" + std::to_string(step);
    std::memcpy(rng.data(), s.data(), s.size());
    rng_size = s.size();
    check((*client)->Snapshot(step), "snapshot");
  }
  check((*client)->WaitUntilSafeToUpdate(), "wait");
  const auto expect_w = w;
  const auto expect_m = m;
  std::fill(w.begin(), w.end(), 0.0f);
  std::fill(m.begin(), m.end(), 0.0f);
  rng_size = 0;
  memento::Result<memento::RestoreResult> r = memento::NotFound("not tried");
  for (int i = 0; i < 500; ++i) {  // the last version turns globally complete within a few rounds
    r = (*client)->Restore(steps);
    if (r.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!r.ok()) {
    std::fprintf(stderr, "consumer: restore: %s\n", r.status().ToString().c_str());
    return 1;
  }
  const bool same = w == expect_w && m == expect_m && std::string(rng.data(), rng_size) == "rng-state-" + std::to_string(steps);
  std::printf("consumer: restored step %lld %s\n", static_cast<long long>(r->step), same ? "bit-exact" : "DIFFERENT");
  return same ? 0 : 1;
}
