// libFuzzer target: torch zip files (converters/torch_zip.h): the zip reader and the pickle machine
// on arbitrary bytes, then every entry and tensor read. Invariants: an accepted entry name cannot
// leave a destination folder (no "..", absolute name, backslash or NUL) and its data lies inside
// the file; Read returns the declared size; the writer takes every name the reader accepted, and
// the archive it writes reads back with the same names and bytes; a tensor reads as numel x width.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "converters/torch_zip.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file_system.h"

namespace {

constexpr uint64_t kReadCap = uint64_t{16} << 20;  // bytes a single read may produce here

void CheckName(const std::string& name) {
  MEMENTO_FUZZ_CHECK(!name.empty() && name[0] != '/', "accepted entry name '" + name + "'");
  MEMENTO_FUZZ_CHECK(name.find('\\') == std::string::npos && name.find('\0') == std::string::npos,
                     "accepted entry name '" + name + "'");
  for (size_t begin = 0; begin <= name.size();) {
    size_t end = name.find('/', begin);
    if (end == std::string::npos) end = name.size();
    MEMENTO_FUZZ_CHECK(name.substr(begin, end - begin) != "..", "accepted entry name '" + name + "'");
    begin = end + 1;
  }
}

void Walk(memento::TorchFile* f, const memento::PickleValue& v, int depth) {
  if (depth > 8) return;
  if (v.kind == memento::PickleValue::Kind::kTensor) {
    const uint64_t width = memento::DTypeSize(v.tensor.dtype);
    if (static_cast<uint64_t>(v.tensor.numel()) * width > kReadCap) return;
    memento::Result<std::vector<uint8_t>> bytes = f->ReadTensor(v.tensor);
    if (bytes.ok()) {
      MEMENTO_FUZZ_CHECK(bytes->size() == static_cast<uint64_t>(v.tensor.numel()) * width, "tensor of the wrong size");
    }
    return;
  }
  for (const auto& [k, x] : v.entries) Walk(f, *x, depth + 1);
  for (const auto& x : v.items) Walk(f, *x, depth + 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static memento::fuzz::MemoryFileSystem* fs = new memento::fuzz::MemoryFileSystem();
  fs->Clear();
  fs->Put("/in.pt", std::string(memento::fuzz::Bytes(data, size)));
  memento::Result<std::unique_ptr<memento::ZipArchive>> z = memento::ZipArchive::Open(fs, "/in.pt");
  if (z.ok()) {
    memento::Result<std::unique_ptr<memento::ZipBuilder>> out = memento::ZipBuilder::Create(fs, "/out.zip");
    MEMENTO_FUZZ_CHECK(out.ok(), out.status().ToString());
    std::vector<std::pair<std::string, std::string>> read;
    bool all = true;
    for (const memento::ZipEntry& e : (*z)->entries()) {
      CheckName(e.name);
      MEMENTO_FUZZ_CHECK(e.data_offset <= size && e.compressed_size <= size - e.data_offset,
                         "entry '" + e.name + "' lies outside the file");
      MEMENTO_FUZZ_CHECK((*z)->Find(e.name) != nullptr, "entry '" + e.name + "' is listed but not found");
      if (e.size > kReadCap) {
        all = false;
        continue;
      }
      memento::Result<std::string> bytes = (*z)->Read(e);
      if (!bytes.ok()) {
        all = false;
        continue;
      }
      MEMENTO_FUZZ_CHECK(bytes->size() == e.size, "entry '" + e.name + "' read with the wrong size");
      memento::Status added = (*out)->Add(e.name, bytes->data(), bytes->size());
      MEMENTO_FUZZ_CHECK(added.ok(), "the writer refuses a name the reader accepted: " + added.ToString());
      read.emplace_back(e.name, std::move(bytes).value());
    }
    MEMENTO_FUZZ_CHECK((*out)->Finish().ok(), "cannot finish the rewritten archive");
    if (all) {
      memento::Result<std::unique_ptr<memento::ZipArchive>> back = memento::ZipArchive::Open(fs, "/out.zip");
      MEMENTO_FUZZ_CHECK(back.ok(), "the rewritten archive does not open: " + back.status().ToString());
      MEMENTO_FUZZ_CHECK((*back)->entries().size() == read.size(), "the rewritten archive has other entries");
      for (size_t i = 0; i < read.size(); ++i) {
        const memento::ZipEntry& e = (*back)->entries()[i];
        memento::Result<std::string> bytes = (*back)->Read(e);
        MEMENTO_FUZZ_CHECK(e.name == read[i].first && bytes.ok() && *bytes == read[i].second,
                           "entry '" + read[i].first + "' differs in the rewritten archive");
      }
    }
  }
  memento::Result<std::unique_ptr<memento::TorchFile>> t = memento::TorchFile::Open(fs, "/in.pt");
  if (t.ok()) Walk(t->get(), (*t)->root(), 0);
  return 0;
}
