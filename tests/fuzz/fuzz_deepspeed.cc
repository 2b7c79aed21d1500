// libFuzzer target: DeepSpeed checkpoint import (converters/deepspeed.h ImportDeepSpeed), the
// reading of a ZeRO checkpoint's structure (model states, optimizer states, param_slice_mappings,
// universal_checkpoint_info patterns) out of its torch files. The input is a bundle of files,
// each [name length: 1 byte][name][size: 4 bytes little-endian][bytes]. A name ending in ".pt"
// holds the file's data.pkl: the target wraps it in a torch zip with a storage entry of the right
// size for every tensor it references (so the zip's CRCs and sizes are never what stops the
// input); any other file is written as it is. The files form the checkpoint directory.
// Invariants: import returns a universal checkpoint or an error; what it writes verifies without
// problems.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "converters/deepspeed.h"
#include "converters/torch_pickle.h"
#include "converters/torch_zip.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"

namespace {

constexpr uint64_t kMaxStorageBytes = uint64_t{1} << 20;  // storage bytes one bundle may ask for
constexpr size_t kMaxFiles = 64;
const std::string kDir = "/ds";

struct Bundle {
  std::vector<std::pair<std::string, std::string>> files;
};

Bundle Split(std::string_view in) {
  Bundle b;
  size_t at = 0;
  while (at < in.size() && b.files.size() < kMaxFiles) {
    const size_t name_len = static_cast<uint8_t>(in[at]);
    if (in.size() - at < 1 + name_len + 4) break;
    std::string name(in.substr(at + 1, name_len));
    at += 1 + name_len;
    uint64_t size = 0;
    for (int k = 0; k < 4; ++k) size |= static_cast<uint64_t>(static_cast<uint8_t>(in[at + k])) << (8 * k);
    at += 4;
    size = std::min<uint64_t>(size, in.size() - at);
    b.files.emplace_back(std::move(name), std::string(in.substr(at, size)));
    at += size;
  }
  return b;
}

// Storage keys and sizes (bytes) of every tensor in `v`.
void Storages(const memento::PickleValue& v, std::map<std::string, uint64_t>* out, int depth) {
  if (depth > 64) return;
  if (v.kind == memento::PickleValue::Kind::kTensor) {
    const uint64_t width = memento::DTypeSize(v.tensor.dtype);
    if (v.tensor.storage_numel >= 0 && static_cast<uint64_t>(v.tensor.storage_numel) <= kMaxStorageBytes / std::max<uint64_t>(width, 1)) {
      (*out)[v.tensor.storage_key] = static_cast<uint64_t>(v.tensor.storage_numel) * width;
    }
    return;
  }
  for (const auto& [k, x] : v.entries) {
    Storages(*k, out, depth + 1);
    Storages(*x, out, depth + 1);
  }
  for (const auto& x : v.items) Storages(*x, out, depth + 1);
}

// The storages of a pickle's tensors. A mutation changes one file of a bundle: the pickles of the
// others were unpickled before, and their storages are remembered (a few thousand pickles at most).
const std::map<std::string, uint64_t>& StoragesOf(const std::string& pickle) {
  static auto* seen = new std::unordered_map<std::string, std::map<std::string, uint64_t>>();
  auto it = seen->find(pickle);
  if (it != seen->end()) return it->second;
  if (seen->size() >= 4096) seen->clear();
  std::map<std::string, uint64_t> storages;
  memento::Result<memento::PickleValuePtr> v = memento::Unpickle(pickle);
  if (v.ok()) Storages(**v, &storages, 0);
  return seen->emplace(pickle, std::move(storages)).first->second;
}

// A torch.save zip holding `pickle` as archive/data.pkl and a patterned storage per tensor.
void WriteTorchFile(memento::fuzz::MemoryFileSystem* fs, const std::string& path, const std::string& pickle) {
  auto zip = memento::ZipBuilder::Create(fs, path);
  if (!zip.ok() || !(*zip)->Add("archive/data.pkl", pickle.data(), pickle.size()).ok()) return;
  uint64_t total = 0;
  for (const auto& [key, bytes] : StoragesOf(pickle)) {
    if ((total += bytes) > kMaxStorageBytes) break;
    std::string data(static_cast<size_t>(bytes), '\0');
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i % 4 == 3 ? 0x3f : i * 13);
    (*zip)->Add("archive/data/" + key, data.data(), data.size()).IgnoreError();  // a hostile key is refused
  }
  (*zip)->Add("archive/byteorder", "little", 6).IgnoreError();
  (*zip)->Add("archive/version", "3\n", 2).IgnoreError();
  (*zip)->Finish().IgnoreError();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static memento::fuzz::MemoryFileSystem* fs = new memento::fuzz::MemoryFileSystem();
  fs->Clear();
  if (!fs->CreateDirs(kDir).ok()) return 0;
  for (const auto& [name, bytes] : Split(memento::fuzz::Bytes(data, size)).files) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) continue;
    const std::string path = kDir + "/" + name;
    if (name.size() > 3 && name.compare(name.size() - 3, 3, ".pt") == 0) {
      WriteTorchFile(fs, path, bytes);
    } else {
      fs->Put(path, bytes);
    }
  }
  memento::DeepSpeedImportOptions options;
  options.convert.threads = 1;
  options.convert.write.direct_io = false;
  memento::Result<memento::DeepSpeedImportSummary> imported = memento::ImportDeepSpeed(fs, kDir, "/out", options);
  if (!imported.ok()) {
    MEMENTO_FUZZ_CHECK(!fs->Exists("/out"), "a failed import left /out: " + imported.status().ToString());
    return 0;
  }
  memento::Result<std::vector<std::string>> problems = memento::VerifyUniversal(fs, "/out");
  MEMENTO_FUZZ_CHECK(problems.ok() && problems->empty(),
                     "an import does not verify: " + (problems.ok() ? (*problems)[0] : problems.status().ToString()));
  return 0;
}
