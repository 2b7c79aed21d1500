// The zip reader and writer and torch file access of converters/torch_zip.h. Zip records as in
// PKWARE's APPNOTE.TXT (local header, central directory, end records, zip64 extensions).
#include "converters/torch_zip.h"

#include <algorithm>
#include <array>
#include <cstring>

#ifdef MEMENTO_HAVE_ZLIB
#include <zlib.h>
#endif

namespace memento {
namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kAlign = 64;  // torch aligns storage data to 64 bytes

uint64_t Le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int k = 0; k < n; ++k) v |= static_cast<uint64_t>(p[k]) << (8 * k);
  return v;
}
void PutLe(std::string* out, uint64_t v, int n) {
  for (int k = 0; k < n; ++k) out->push_back(static_cast<char>((v >> (8 * k)) & 0xff));
}

// An entry name that could not escape a destination directory nor alias another entry.
Status CheckName(const std::string& path, const std::string& name) {
  auto bad = [&](const char* why) { return InvalidArgument(path + ": zip entry name '" + name + "' " + why + ": refused"); };
  if (name.empty()) return bad("is empty");
  if (name[0] == '/') return bad("is absolute");
  if (name.find('\\') != std::string::npos) return bad("holds a backslash");
  if (name.find('\0') != std::string::npos) return bad("holds a NUL byte");
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    const std::string part = name.substr(start, end - start);
    if (part == "..") return bad("has a '..' component");
    start = end + 1;
  }
  return Status::Ok();
}

const std::array<uint32_t, 256>& CrcTable() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) != 0 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

}  // namespace

uint32_t ZipCrc32(const void* data, size_t n, uint32_t crc) {
  const auto& table = CrcTable();
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

Result<std::unique_ptr<ZipArchive>> ZipArchive::Open(FileSystem* fs, const std::string& path, const ZipLimits& limits) {
  auto z = std::unique_ptr<ZipArchive>(new ZipArchive());
  z->path_ = path;
  z->limits_ = limits;
  MEMENTO_ASSIGN_OR_RETURN(z->file_, fs->NewReadableFile(path));
  ReadableFile* f = z->file_.get();
  const uint64_t size = f->size();
  auto malformed = [&](const std::string& what) { return DataLoss(path + ": malformed zip: " + what); };
  if (size >= 2) {
    uint8_t head[2];
    MEMENTO_RETURN_IF_ERROR(f->ReadAt(0, head, 2));
    if (head[0] == 0x80 && head[1] <= 5) {
      return InvalidArgument(path + ": a legacy (pre-1.6, non-zip) torch.save file; not supported: load and "
                             "re-save it with a current PyTorch");
    }
  }
  if (size < 22) return InvalidArgument(path + ": not a zip file (" + std::to_string(size) + " bytes)");
  const uint64_t tail_len = std::min<uint64_t>(size, 22 + 65535);
  std::vector<uint8_t> tail(tail_len);
  MEMENTO_RETURN_IF_ERROR(f->ReadAt(size - tail_len, tail.data(), tail_len));
  int64_t eocd = -1;
  for (int64_t p = static_cast<int64_t>(tail_len) - 22; p >= 0; --p) {
    if (Le(&tail[static_cast<size_t>(p)], 4) == kEndSig) {
      eocd = p;
      break;
    }
  }
  if (eocd < 0) return InvalidArgument(path + ": not a zip file (no end of central directory)");
  const uint8_t* e = &tail[static_cast<size_t>(eocd)];
  uint64_t count = Le(e + 10, 2);
  uint64_t cd_size = Le(e + 12, 4);
  uint64_t cd_offset = Le(e + 16, 4);
  const uint64_t eocd_pos = size - tail_len + static_cast<uint64_t>(eocd);
  if (count == 0xffff || cd_size == 0xffffffff || cd_offset == 0xffffffff) {
    if (eocd_pos < 20) return malformed("zip64 locator missing");
    uint8_t loc[20];
    MEMENTO_RETURN_IF_ERROR(f->ReadAt(eocd_pos - 20, loc, 20));
    if (Le(loc, 4) != kZip64LocatorSig) return malformed("zip64 locator missing");
    const uint64_t z64 = Le(loc + 8, 8);
    uint8_t rec[56];
    if (z64 > size - 56) return malformed("zip64 end record outside the file");
    MEMENTO_RETURN_IF_ERROR(f->ReadAt(z64, rec, 56));
    if (Le(rec, 4) != kZip64EndSig) return malformed("bad zip64 end record");
    count = Le(rec + 32, 8);
    cd_size = Le(rec + 40, 8);
    cd_offset = Le(rec + 48, 8);
  }
  if (count > limits.max_entries) {
    return InvalidArgument(path + ": zip declares " + std::to_string(count) + " entries, more than the limit of " +
                           std::to_string(limits.max_entries));
  }
  if (cd_offset > size || cd_size > size - cd_offset) return malformed("central directory outside the file");
  std::vector<uint8_t> cd(cd_size);
  MEMENTO_RETURN_IF_ERROR(f->ReadAt(cd_offset, cd.data(), cd_size));
  size_t p = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (cd_size - p < 46 || Le(&cd[p], 4) != kCentralSig) return malformed("bad central directory entry " + std::to_string(i));
    const uint8_t* c = &cd[p];
    ZipEntry entry;
    const uint64_t flags = Le(c + 8, 2);
    entry.method = static_cast<uint16_t>(Le(c + 10, 2));
    entry.crc32 = static_cast<uint32_t>(Le(c + 16, 4));
    entry.compressed_size = Le(c + 20, 4);
    entry.size = Le(c + 24, 4);
    const uint64_t name_len = Le(c + 28, 2), extra_len = Le(c + 30, 2), comment_len = Le(c + 32, 2);
    uint64_t local = Le(c + 42, 4);
    if (cd_size - p - 46 < name_len + extra_len + comment_len) return malformed("central directory entry overruns");
    entry.name.assign(reinterpret_cast<const char*>(c + 46), name_len);
    // zip64 extra field: the 0xffffffff fields, in order size, compressed size, offset.
    const uint8_t* x = c + 46 + name_len;
    for (uint64_t q = 0; q + 4 <= extra_len;) {
      const uint64_t id = Le(x + q, 2), len = Le(x + q + 2, 2);
      if (q + 4 + len > extra_len) return malformed("extra field overruns in '" + entry.name + "'");
      if (id == 1) {
        uint64_t r = q + 4;
        auto take = [&](uint64_t* v) {
          if (*v != 0xffffffff) return true;
          if (r + 8 > q + 4 + len) return false;
          *v = Le(x + r, 8);
          r += 8;
          return true;
        };
        if (!take(&entry.size) || !take(&entry.compressed_size) || !take(&local)) return malformed("short zip64 field in '" + entry.name + "'");
      }
      q += 4 + len;
    }
    p += 46 + name_len + extra_len + comment_len;
    MEMENTO_RETURN_IF_ERROR(CheckName(path, entry.name));
    if ((flags & 1) != 0) return InvalidArgument(path + ": zip entry '" + entry.name + "' is encrypted: not supported");
    if (entry.method != 0 && entry.method != 8) {
      return InvalidArgument(path + ": zip entry '" + entry.name + "' uses compression method " + std::to_string(entry.method) + ": not supported");
    }
    if (entry.method == 0 && entry.size != entry.compressed_size) return malformed("stored entry '" + entry.name + "' with two sizes");
    if (entry.method == 8) {
      if (entry.size > limits.max_inflated_bytes ||
          (entry.size > 4096 && entry.size / std::max<uint64_t>(entry.compressed_size, 1) > limits.max_ratio)) {
        return InvalidArgument(path + ": zip entry '" + entry.name + "' inflates " + std::to_string(entry.compressed_size) +
                               " bytes to " + std::to_string(entry.size) + ": refused as a zip bomb");
      }
    }
    uint8_t lh[30];
    if (local > size || size - local < 30) return malformed("local header of '" + entry.name + "' outside the file");
    MEMENTO_RETURN_IF_ERROR(f->ReadAt(local, lh, 30));
    if (Le(lh, 4) != kLocalSig) return malformed("bad local header of '" + entry.name + "'");
    entry.data_offset = local + 30 + Le(lh + 26, 2) + Le(lh + 28, 2);
    if (entry.data_offset > size || entry.compressed_size > size - entry.data_offset) {
      return DataLoss(path + ": zip entry '" + entry.name + "' declares " + std::to_string(entry.compressed_size) +
                      " bytes past the end of the file (truncated or hostile)");
    }
    if (!z->index_.emplace(entry.name, z->entries_.size()).second) {
      return InvalidArgument(path + ": zip entry '" + entry.name + "' appears twice: refused");
    }
    z->entries_.push_back(std::move(entry));
  }
  return z;
}

const ZipEntry* ZipArchive::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

Result<std::string> ZipArchive::Read(const ZipEntry& entry) {
  std::string raw(entry.compressed_size, '\0');
  MEMENTO_RETURN_IF_ERROR(file_->ReadAt(entry.data_offset, raw.data(), raw.size()));
  std::string out;
  if (entry.method == 0) {
    out = std::move(raw);
  } else {
#ifdef MEMENTO_HAVE_ZLIB
    out.resize(entry.size);
    z_stream zs{};
    if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) return Internal("inflateInit2 failed");
    zs.next_in = reinterpret_cast<Bytef*>(raw.data());
    zs.avail_in = static_cast<uInt>(raw.size());
    zs.next_out = reinterpret_cast<Bytef*>(out.data());
    zs.avail_out = static_cast<uInt>(out.size());
    int rc = inflate(&zs, Z_FINISH);
    const uint64_t produced = zs.total_out;
    // One more byte of room tells "exactly the declared size" from "more than declared".
    unsigned char extra = 0;
    if (rc == Z_BUF_ERROR && zs.avail_out == 0) {
      zs.next_out = &extra;
      zs.avail_out = 1;
      rc = inflate(&zs, Z_FINISH);
    }
    const bool more = zs.total_out > produced;
    inflateEnd(&zs);
    if (more) {
      return InvalidArgument(path_ + ": zip entry '" + entry.name + "' inflates past its declared " +
                             std::to_string(entry.size) + " bytes: refused as a zip bomb");
    }
    if (rc != Z_STREAM_END || produced != entry.size) {
      return DataLoss(path_ + ": zip entry '" + entry.name + "': corrupt deflate stream");
    }
#else
    return NotSupported(path_ + ": zip entry '" + entry.name + "' is deflated and this build has no zlib");
#endif
  }
  if (ZipCrc32(out.data(), out.size()) != entry.crc32) {
    return DataLoss(path_ + ": zip entry '" + entry.name + "': CRC-32 mismatch");
  }
  return out;
}

Status ZipArchive::ReadStored(const ZipEntry& entry, uint64_t offset, void* dst, size_t n) {
  if (entry.method != 0) return InvalidArgument(path_ + ": zip entry '" + entry.name + "' is compressed");
  if (offset > entry.size || n > entry.size - offset) {
    return DataLoss(path_ + ": zip entry '" + entry.name + "': bytes " + std::to_string(offset) + ".." +
                    std::to_string(offset + n) + " outside its " + std::to_string(entry.size));
  }
  return file_->ReadAt(entry.data_offset + offset, dst, n);
}

Result<std::unique_ptr<ZipBuilder>> ZipBuilder::Create(FileSystem* fs, const std::string& path, const WriteOptions& options) {
  auto b = std::unique_ptr<ZipBuilder>(new ZipBuilder());
  b->path_ = path;
  MEMENTO_ASSIGN_OR_RETURN(b->file_, fs->NewWritableFile(path, options));
  return b;
}

Status ZipBuilder::Add(const std::string& name, const void* data, size_t n) {
  MEMENTO_RETURN_IF_ERROR(CheckName(path_, name));
  if (!names_.emplace(name, true).second) return InvalidArgument(path_ + ": zip entry '" + name + "' added twice");
  const uint64_t offset = file_->size();
  const uint32_t crc = ZipCrc32(data, n);
  const bool z64 = n >= 0xffffffffu;
  std::string h;
  PutLe(&h, kLocalSig, 4);
  PutLe(&h, z64 ? 45 : 20, 2);
  PutLe(&h, 0, 2);  // flags
  PutLe(&h, 0, 2);  // stored
  PutLe(&h, 0, 2);  // time
  PutLe(&h, 0x21, 2);  // date: 1980-01-01
  PutLe(&h, crc, 4);
  PutLe(&h, z64 ? 0xffffffffu : n, 4);
  PutLe(&h, z64 ? 0xffffffffu : n, 4);
  PutLe(&h, name.size(), 2);
  std::string extra;
  if (z64) {
    PutLe(&extra, 1, 2);
    PutLe(&extra, 16, 2);
    PutLe(&extra, n, 8);
    PutLe(&extra, n, 8);
  }
  // Padding extra field ("FB", as torch writes) so the data starts at a multiple of 64.
  const uint64_t before = offset + 30 + name.size() + extra.size();
  uint64_t pad = (kAlign - (before + 4) % kAlign) % kAlign;
  PutLe(&extra, 0x4246, 2);
  PutLe(&extra, pad, 2);
  extra.append(pad, 'Z');
  PutLe(&h, extra.size(), 2);
  h += name;
  h += extra;
  MEMENTO_RETURN_IF_ERROR(file_->Append(h.data(), h.size()));
  if (n > 0) MEMENTO_RETURN_IF_ERROR(file_->Append(data, n));
  written_.push_back({name, crc, n, offset});
  return Status::Ok();
}

Status ZipBuilder::Finish() {
  const uint64_t cd_offset = file_->size();
  std::string cd;
  for (const Written& w : written_) {
    const bool z64 = w.size >= 0xffffffffu || w.header_offset >= 0xffffffffu;
    std::string extra;
    if (z64) {
      PutLe(&extra, 1, 2);
      PutLe(&extra, 24, 2);
      PutLe(&extra, w.size, 8);
      PutLe(&extra, w.size, 8);
      PutLe(&extra, w.header_offset, 8);
    }
    PutLe(&cd, kCentralSig, 4);
    PutLe(&cd, z64 ? 45 : 20, 2);  // made by
    PutLe(&cd, z64 ? 45 : 20, 2);  // needed
    PutLe(&cd, 0, 2);
    PutLe(&cd, 0, 2);
    PutLe(&cd, 0, 2);
    PutLe(&cd, 0x21, 2);
    PutLe(&cd, w.crc32, 4);
    PutLe(&cd, z64 ? 0xffffffffu : w.size, 4);
    PutLe(&cd, z64 ? 0xffffffffu : w.size, 4);
    PutLe(&cd, w.name.size(), 2);
    PutLe(&cd, extra.size(), 2);
    PutLe(&cd, 0, 2);  // comment
    PutLe(&cd, 0, 2);  // disk
    PutLe(&cd, 0, 2);  // internal attributes
    PutLe(&cd, 0, 4);  // external attributes
    PutLe(&cd, z64 ? 0xffffffffu : w.header_offset, 4);
    cd += w.name;
    cd += extra;
  }
  const uint64_t count = written_.size();
  const bool z64 = count >= 0xffff || cd_offset >= 0xffffffffu || cd.size() >= 0xffffffffu;
  if (z64) {
    const uint64_t z64_offset = cd_offset + cd.size();
    PutLe(&cd, kZip64EndSig, 4);
    PutLe(&cd, 44, 8);
    PutLe(&cd, 45, 2);
    PutLe(&cd, 45, 2);
    PutLe(&cd, 0, 4);
    PutLe(&cd, 0, 4);
    PutLe(&cd, count, 8);
    PutLe(&cd, count, 8);
    PutLe(&cd, z64_offset - cd_offset, 8);
    PutLe(&cd, cd_offset, 8);
    PutLe(&cd, kZip64LocatorSig, 4);
    PutLe(&cd, 0, 4);
    PutLe(&cd, z64_offset, 8);
    PutLe(&cd, 1, 4);
  }
  const uint64_t cd_size = z64 ? 0xffffffffu : cd.size();
  PutLe(&cd, kEndSig, 4);
  PutLe(&cd, 0, 2);
  PutLe(&cd, 0, 2);
  PutLe(&cd, z64 ? 0xffff : count, 2);
  PutLe(&cd, z64 ? 0xffff : count, 2);
  PutLe(&cd, cd_size, 4);
  PutLe(&cd, z64 ? 0xffffffffu : cd_offset, 4);
  PutLe(&cd, 0, 2);
  MEMENTO_RETURN_IF_ERROR(file_->Append(cd.data(), cd.size()));
  return file_->Close();
}

Result<std::unique_ptr<TorchFile>> TorchFile::Open(FileSystem* fs, const std::string& path, const PickleLimits& pickle_limits,
                                                   const ZipLimits& zip_limits) {
  auto t = std::unique_ptr<TorchFile>(new TorchFile());
  MEMENTO_ASSIGN_OR_RETURN(t->archive_, ZipArchive::Open(fs, path, zip_limits));
  const ZipEntry* pkl = nullptr;
  for (const ZipEntry& e : t->archive_->entries()) {
    const size_t slash = e.name.find('/');
    if (slash != std::string::npos && e.name.substr(slash + 1) == "data.pkl") {
      if (pkl != nullptr) return InvalidArgument(path + ": two data.pkl entries ('" + pkl->name + "', '" + e.name + "')");
      pkl = &e;
      t->prefix_ = e.name.substr(0, slash);
    }
  }
  if (pkl == nullptr) return InvalidArgument(path + ": no <folder>/data.pkl entry: not a torch.save file");
  if (pkl->size > pickle_limits.max_bytes) {
    return InvalidArgument(path + ": data.pkl of " + std::to_string(pkl->size) + " bytes exceeds the limit");
  }
  MEMENTO_ASSIGN_OR_RETURN(std::string data, t->archive_->Read(*pkl));
  Result<PickleValuePtr> root = Unpickle(data, pickle_limits);
  if (!root.ok()) return root.status().WithContext(path + ": " + pkl->name);
  t->root_ = std::move(root).value();
  return t;
}

Result<std::vector<uint8_t>> TorchFile::ReadTensor(const TorchTensorRef& t) {
  const std::string name = prefix_ + "/data/" + t.storage_key;
  const ZipEntry* e = archive_->Find(name);
  if (e == nullptr) return DataLoss(path() + ": storage '" + t.storage_key + "' missing (no entry " + name + ")");
  const uint64_t width = DTypeSize(t.dtype);
  if (e->size != static_cast<uint64_t>(t.storage_numel) * width) {
    return DataLoss(path() + ": storage '" + t.storage_key + "' holds " + std::to_string(e->size) + " bytes, not " +
                    std::to_string(t.storage_numel) + " x " + std::to_string(width));
  }
  const uint64_t numel = static_cast<uint64_t>(t.numel());
  std::vector<uint8_t> out(numel * width);
  if (numel == 0) return out;
  if (t.contiguous() && e->method == 0) {
    MEMENTO_RETURN_IF_ERROR(archive_->ReadStored(*e, static_cast<uint64_t>(t.storage_offset) * width, out.data(), out.size()));
    return out;
  }
  std::string storage;
  if (e->method == 0) {
    storage.resize(e->size);
    MEMENTO_RETURN_IF_ERROR(archive_->ReadStored(*e, 0, storage.data(), storage.size()));
  } else {
    MEMENTO_ASSIGN_OR_RETURN(storage, archive_->Read(*e));
  }
  // Gather the strided view (the pickle machine checked that it stays inside the storage).
  std::vector<int64_t> idx(t.size.size(), 0);
  for (uint64_t k = 0; k < numel; ++k) {
    int64_t src = t.storage_offset;
    for (size_t d = 0; d < idx.size(); ++d) src += idx[d] * t.stride[d];
    std::memcpy(out.data() + k * width, storage.data() + static_cast<uint64_t>(src) * width, width);
    for (size_t d = idx.size(); d-- > 0;) {
      if (++idx[d] < t.size[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

Status TorchFile::ReadTensorInto(const TorchTensorRef& t, uint8_t* dst) {
  const ZipEntry* e = archive_->Find(prefix_ + "/data/" + t.storage_key);
  const uint64_t width = DTypeSize(t.dtype);
  if (e != nullptr && e->method == 0 && t.contiguous() && e->size == static_cast<uint64_t>(t.storage_numel) * width) {
    return archive_->ReadStored(*e, static_cast<uint64_t>(t.storage_offset) * width, dst, static_cast<size_t>(t.numel()) * width);
  }
  MEMENTO_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadTensor(t));
  std::memcpy(dst, bytes.data(), bytes.size());
  return Status::Ok();
}

Result<PickleValuePtr> TorchFileBuilder::AddTensor(DType dtype, const std::vector<int64_t>& shape, std::vector<uint8_t> bytes) {
  TorchTensorRef t;
  t.dtype = dtype;
  t.size = shape;
  t.stride.resize(shape.size());
  int64_t numel = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    t.stride[d] = numel;
    numel *= shape[d];
  }
  if (TorchStorageName(dtype).empty()) return InvalidArgument("no torch storage type for dtype " + std::string(DTypeName(dtype)));
  if (bytes.size() != static_cast<uint64_t>(numel) * DTypeSize(dtype)) {
    return InvalidArgument("tensor of " + std::to_string(numel) + " elements given " + std::to_string(bytes.size()) + " bytes");
  }
  t.storage_numel = numel;
  t.storage_key = std::to_string(storages_.size());
  t.location = "cpu";
  storages_.push_back(std::move(bytes));
  return PyTensor(std::move(t));
}

Status TorchFileBuilder::Write(FileSystem* fs, const std::string& path, const PickleValue& root, const std::string& archive) {
  MEMENTO_ASSIGN_OR_RETURN(std::string pkl, PickleForTorch(root));
  MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<ZipBuilder> zip, ZipBuilder::Create(fs, path));
  MEMENTO_RETURN_IF_ERROR(zip->Add(archive + "/data.pkl", pkl.data(), pkl.size()));
  MEMENTO_RETURN_IF_ERROR(zip->Add(archive + "/byteorder", "little", 6));
  for (size_t k = 0; k < storages_.size(); ++k) {
    MEMENTO_RETURN_IF_ERROR(zip->Add(archive + "/data/" + std::to_string(k), storages_[k].data(), storages_[k].size()));
  }
  MEMENTO_RETURN_IF_ERROR(zip->Add(archive + "/version", "3\n", 2));
  return zip->Finish();
}

}  // namespace memento
