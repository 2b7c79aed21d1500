// libFuzzer target: torch zip files (converters/torch_zip.h): the zip reader and the pickle
// machine on arbitrary bytes, then every tensor read. Inputs go through a file in /dev/shm.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

#include "converters/torch_zip.h"

namespace {
const std::string& Path() {
  static const std::string path = "/dev/shm/memento-fuzz-zip-" + std::to_string(::getpid());
  return path;
}
void Walk(memento::TorchFile* f, const memento::PickleValue& v, int depth) {
  if (depth > 8) return;
  if (v.kind == memento::PickleValue::Kind::kTensor) {
    if (v.tensor.numel() * static_cast<int64_t>(memento::DTypeSize(v.tensor.dtype)) < (int64_t{64} << 20)) (void)f->ReadTensor(v.tensor);
    return;
  }
  for (const auto& [k, x] : v.entries) Walk(f, *x, depth + 1);
  for (const auto& x : v.items) Walk(f, *x, depth + 1);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FILE* out = std::fopen(Path().c_str(), "wb");
  if (out == nullptr) return 0;
  std::fwrite(data, 1, size, out);
  std::fclose(out);
  memento::FileSystem* fs = memento::PosixFileSystem();
  memento::Result<std::unique_ptr<memento::ZipArchive>> z = memento::ZipArchive::Open(fs, Path());
  if (z.ok()) {
    for (const memento::ZipEntry& e : (*z)->entries()) {
      if (e.size < (uint64_t{64} << 20)) (void)(*z)->Read(e);
    }
  }
  memento::Result<std::unique_ptr<memento::TorchFile>> t = memento::TorchFile::Open(fs, Path());
  if (t.ok()) Walk(t->get(), (*t)->root(), 0);
  return 0;
}
