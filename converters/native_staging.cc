// The temporary native checkpoint of converters/native_staging.h.
#include "converters/native_staging.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <cctype>

#include <google/protobuf/util/json_util.h>

#include "core/crc.h"
#include "core/posix_error.h"
#include "proto/version.h"
#include "ucp_format/safetensors.h"

#include "core/shard.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "ucp_format/native_checkpoint.h"

namespace memento {
namespace {
constexpr uint64_t kRankSlotBytes = uint64_t{64} << 20;
uint64_t Align(uint64_t n) { return (n + 4095) / 4096 * 4096; }

class UnsyncedFile final : public WritableFile {
 public:
  UnsyncedFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~UnsyncedFile() override {
    if (fd_ >= 0) ::close(fd_);
  }
  Status Append(const void* data, size_t n) override {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return PosixError("write " + path_);
      p += w;
      n -= static_cast<size_t>(w);
      size_ += static_cast<uint64_t>(w);
    }
    return Status::Ok();
  }
  Status Sync() override { return Status::Ok(); }
  Status Close() override {
    if (fd_ >= 0 && ::close(fd_) != 0) {
      fd_ = -1;
      return PosixError("close " + path_);
    }
    fd_ = -1;
    return Status::Ok();
  }
  uint64_t size() const override { return size_; }

 private:
  std::string path_;
  int fd_;
  uint64_t size_ = 0;
};

class Unsynced final : public FileSystem {
 public:
  explicit Unsynced(FileSystem* base) : base_(base) {}
  Result<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path, const WriteOptions& options) override {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, options.mode);
    if (fd < 0) return PosixError("open " + path);
    return std::unique_ptr<WritableFile>(new UnsyncedFile(path, fd));
  }
  Result<std::unique_ptr<ReadableFile>> NewReadableFile(const std::string& path) override { return base_->NewReadableFile(path); }
  Status CreateDirs(const std::string& path) override { return base_->CreateDirs(path); }
  Status SyncDir(const std::string&) override { return Status::Ok(); }
  Status Rename(const std::string& from, const std::string& to) override { return base_->Rename(from, to); }
  Status RemoveFile(const std::string& path) override { return base_->RemoveFile(path); }
  Status RemoveAll(const std::string& path) override { return base_->RemoveAll(path); }
  Result<std::vector<std::string>> ListDir(const std::string& path) override { return base_->ListDir(path); }
  bool Exists(const std::string& path) override { return base_->Exists(path); }
  Result<uint64_t> FileSize(const std::string& path) override { return base_->FileSize(path); }

 private:
  FileSystem* base_;
};
}  // namespace

std::unique_ptr<FileSystem> UnsyncedFileSystem(FileSystem* base) { return std::make_unique<Unsynced>(base); }

Status NativeStaging::AddTensor(const std::string& name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  if (shape.empty()) shape = {1};
  if (bytes.size() != static_cast<uint64_t>(NumElements(shape)) * DTypeSize(dtype)) {
    return Internal("tensor '" + name + "': " + std::to_string(bytes.size()) + " bytes for shape " + ShapeString(shape));
  }
  if (!pending_.empty() && pending_bytes_ + bytes.size() > kRankSlotBytes) MEMENTO_RETURN_IF_ERROR(Flush(false));
  pending_bytes_ += bytes.size();
  pending_.push_back({name, dtype, std::move(shape), std::move(bytes)});
  return Status::Ok();
}

Status NativeStaging::Flush(bool last) {
  if (pending_.empty() && !(last && (!blobs_.empty() || ranks_.empty()))) return Status::Ok();
  proto::RankRecord rec;
  rec.set_rank(static_cast<int32_t>(ranks_.size()));
  uint64_t off = 0;
  for (const Pending& p : pending_) {
    proto::TensorRecord* t = rec.add_tensors();
    t->set_name(p.name);
    t->set_dtype(static_cast<int32_t>(p.dtype));
    ToProto(WholeTensor(p.shape), t->mutable_spec());
    t->set_slot_offset(off);
    t->set_bytes(p.bytes.size());
    off = Align(off + p.bytes.size());
  }
  if (last) {
    for (const auto& [name, bytes] : blobs_) {
      proto::BlobRecord* b = rec.add_blobs();
      b->set_name(name);
      b->set_capacity(bytes.size());
      b->set_slot_offset(off);
      off = Align(off + 8 + bytes.size());
    }
  }
  rec.set_slot_bytes(off);
  // One buffer for every rank, grown as needed: no page faults for each new rank. Only the gaps
  // between runs need zeros (they are written as padding).
  if (slot_.size() < off) slot_.resize(off);
  uint8_t* slot = slot_.data();
  uint64_t zero_from = 0;
  auto zero_to = [&](uint64_t at) {
    if (at > zero_from) std::memset(slot + zero_from, 0, at - zero_from);
  };
  for (size_t i = 0; i < pending_.size(); ++i) {
    const uint64_t at = rec.tensors(static_cast<int>(i)).slot_offset();
    zero_to(at);
    std::memcpy(slot + at, pending_[i].bytes.data(), pending_[i].bytes.size());
    zero_from = at + pending_[i].bytes.size();
  }
  for (int b = 0; b < rec.blobs_size(); ++b) {
    const std::string& bytes = blobs_[static_cast<size_t>(b)].second;
    const uint64_t n = bytes.size();
    const uint64_t at = rec.blobs(b).slot_offset();
    zero_to(at);
    std::memcpy(slot + at, &n, 8);
    std::memcpy(slot + at + 8, bytes.data(), n);
    zero_from = at + 8 + n;
  }
  zero_to(off);
  RankImage image;
  image.rank = rec.rank();
  image.world_size = rec.rank() + 1;  // the manifest, written last, has the real world size
  image.layout = &rec;
  image.slot = slot;
  PersistOptions po;
  po.write.direct_io = false;
  MEMENTO_ASSIGN_OR_RETURN(proto::ManifestRank mr, WriteRankFiles(fs_, dir_, "import", step_, image, po));
  ranks_.push_back(std::move(mr));
  pending_.clear();
  pending_bytes_ = 0;
  return Status::Ok();
}

Status NativeStaging::Finish() {
  MEMENTO_RETURN_IF_ERROR(Flush(true));
  return CommitManifest(fs_, dir_, BuildManifest("import", step_, static_cast<int32_t>(ranks_.size()), ranks_));
}

namespace {

std::string SinkJoin(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}
std::string SinkParent(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}
std::string SinkBase(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}
// As the universal writer names files: [A-Za-z0-9._-] kept, anything else (and a leading '.') %XX.
std::string FileNameFor(const std::string& param) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (size_t i = 0; i < param.size(); ++i) {
    const auto c = static_cast<unsigned char>(param[i]);
    if (std::isalnum(c) || c == '_' || c == '-' || (c == '.' && i > 0)) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}
int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}
constexpr uint64_t kChunkBytes = uint64_t{64} << 20;

}  // namespace

UniversalSink::UniversalSink(FileSystem* fs, std::string out_dir, std::string kind, std::string path, int64_t step, WriteOptions write)
    : fs_(fs), out_dir_(std::move(out_dir)), kind_(std::move(kind)), path_(std::move(path)), step_(step), write_(write) {
  tmp_ = SinkJoin(SinkParent(out_dir_), "." + SinkBase(out_dir_) + ".tmp-" + std::to_string(::getpid()));
}

UniversalSink::~UniversalSink() {
  if (!committed_) fs_->RemoveAll(tmp_).IgnoreError();
}

Status UniversalSink::Begin() {
  started_ = std::chrono::steady_clock::now();
  if (fs_->Exists(out_dir_)) return AlreadyExists(out_dir_ + " already exists; the universal checkpoint needs a new path");
  fs_->RemoveAll(tmp_).IgnoreError();
  return fs_->CreateDirs(SinkJoin(tmp_, "params"));
}

Status UniversalSink::BeginParam(const std::string& name, std::vector<StateInfo> states, const std::string& source_layout) {
  if (file_ != nullptr) return Internal("parameter '" + name + "' begun while '" + open_.name() + "' is open");
  for (const proto::UniversalParam& p : params_) {
    if (p.name() == name) return InvalidArgument("parameter '" + name + "' given twice");
  }
  SafetensorsHeader header;
  header.SetMetadata("format", "memento-universal");
  header.SetMetadata("param", name);
  for (const StateInfo& st : states) MEMENTO_RETURN_IF_ERROR(header.Add(st.state, st.dtype, st.shape));
  const std::string file = "params/" + FileNameFor(name) + ".safetensors";
  const std::string head = header.Serialize();
  MEMENTO_ASSIGN_OR_RETURN(file_, fs_->NewWritableFile(SinkJoin(tmp_, file), write_));
  MEMENTO_RETURN_IF_ERROR(file_->Append(head.data(), head.size()));
  open_.Clear();
  open_.set_name(name);
  open_.set_source_layout(source_layout);
  open_.set_rule_index(-1);
  open_.set_consolidation("deepspeed-merge");
  state_bytes_.clear();
  for (size_t i = 0; i < states.size(); ++i) {
    const StateInfo& st = states[i];
    const SafetensorsEntry& e = header.entries()[i];
    proto::UniversalTensor* t = open_.add_states();
    t->set_state(st.state);
    t->set_source_name(st.source_name);
    t->set_dtype(static_cast<int32_t>(st.dtype));
    for (int64_t d : st.shape) t->add_shape(d);
    t->set_file(file);
    t->set_key(st.state);
    t->set_data_offset(head.size() + e.begin);
    t->set_bytes(e.end - e.begin);
    t->set_chunk_bytes(kChunkBytes);
    state_bytes_.push_back(e.end - e.begin);
  }
  state_ = 0;
  state_done_ = 0;
  crc_ = chunk_crc_ = 0;
  FinishCompleteStates();
  return Status::Ok();
}

void UniversalSink::FinishCompleteStates() {
  while (state_ < state_bytes_.size() && state_done_ == state_bytes_[state_]) {
    proto::UniversalTensor* t = open_.mutable_states(static_cast<int>(state_));
    if (state_bytes_[state_] == 0 || state_done_ % kChunkBytes != 0) t->add_chunk_crcs(chunk_crc_);
    t->set_crc64(crc_);
    summary_.tensor_bytes += state_bytes_[state_];
    summary_.largest_tensor_bytes = std::max<uint64_t>(summary_.largest_tensor_bytes, state_bytes_[state_]);
    ++summary_.tensors;
    ++state_;
    state_done_ = 0;
    crc_ = chunk_crc_ = 0;
  }
}

Status UniversalSink::AppendState(const void* data, size_t n) {
  if (file_ == nullptr) return Internal("AppendState without an open parameter");
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    if (state_ >= state_bytes_.size()) {
      return Internal("parameter '" + open_.name() + "': " + std::to_string(n) + " bytes past its last state");
    }
    // Up to the end of the state and of its CRC chunk.
    const uint64_t left = std::min(state_bytes_[state_] - state_done_, kChunkBytes - state_done_ % kChunkBytes);
    const size_t take = static_cast<size_t>(std::min<uint64_t>(n, left));
    crc_ = Crc64(p, take, crc_);
    chunk_crc_ = Crc64(p, take, chunk_crc_);
    MEMENTO_RETURN_IF_ERROR(file_->Append(p, take));
    state_done_ += take;
    p += take;
    n -= take;
    if (state_done_ % kChunkBytes == 0) {
      open_.mutable_states(static_cast<int>(state_))->add_chunk_crcs(chunk_crc_);
      chunk_crc_ = 0;
    }
    FinishCompleteStates();
  }
  return Status::Ok();
}

Status UniversalSink::EndParam() {
  if (file_ == nullptr) return Internal("EndParam without an open parameter");
  if (state_ < state_bytes_.size()) {
    return Internal("parameter '" + open_.name() + "' state '" + open_.states(static_cast<int>(state_)).state() + "': " +
                    std::to_string(state_done_) + " of " + std::to_string(state_bytes_[state_]) + " bytes given");
  }
  Status st = file_->Close();
  file_.reset();
  MEMENTO_RETURN_IF_ERROR(st);
  params_.push_back(std::move(open_));
  open_.Clear();
  return Status::Ok();
}

Result<ConvertSummary> UniversalSink::Commit() {
  if (file_ != nullptr) return Internal("commit while parameter '" + open_.name() + "' is open");
  proto::UniversalManifest m;
  m.set_format_version(kUniversalFormatVersion);
  m.set_library_version(std::string(kLibraryVersion));
  m.set_created_unix_ms(NowMs());
  proto::UniversalSource* src = m.mutable_source();
  src->set_kind(kind_);
  src->set_path(path_);
  src->set_step(step_);
  src->set_world_size(1);
  std::sort(params_.begin(), params_.end(), [](const auto& a, const auto& b) { return a.name() < b.name(); });
  uint64_t total = summary_.tensor_bytes;
  for (proto::UniversalParam& p : params_) *m.add_params() = std::move(p);
  if (!blobs_.empty()) {
    SafetensorsHeader header;
    for (const auto& [name, bytes] : blobs_) MEMENTO_RETURN_IF_ERROR(header.Add("rank-0/" + name, DType::kU8, {static_cast<int64_t>(bytes.size())}));
    const std::string head = header.Serialize();
    MEMENTO_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> w, fs_->NewWritableFile(SinkJoin(tmp_, "blobs.safetensors"), write_));
    MEMENTO_RETURN_IF_ERROR(w->Append(head.data(), head.size()));
    for (size_t k = 0; k < blobs_.size(); ++k) {
      const std::string& bytes = blobs_[k].second;
      MEMENTO_RETURN_IF_ERROR(w->Append(bytes.data(), bytes.size()));
      proto::UniversalBlob* b = m.add_blobs();
      b->set_rank(0);
      b->set_name(blobs_[k].first);
      b->set_file("blobs.safetensors");
      b->set_key(header.entries()[k].key);
      b->set_data_offset(head.size() + header.entries()[k].begin);
      b->set_bytes(bytes.size());
      b->set_crc64(Crc64(bytes.data(), bytes.size()));
      total += bytes.size();
    }
    MEMENTO_RETURN_IF_ERROR(w->Close());
  }
  m.set_total_bytes(total);
  std::string json;
  google::protobuf::util::JsonPrintOptions json_options;
  json_options.add_whitespace = true;
  json_options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(m, &json, json_options).ok()) return Internal("cannot print the universal manifest as JSON");
  MEMENTO_ASSIGN_OR_RETURN(const std::string pb, SerializeUniversalManifest(m));
  MEMENTO_RETURN_IF_ERROR(WriteFileAtomically(fs_, SinkJoin(tmp_, kUniversalManifestJsonName), json));
  MEMENTO_RETURN_IF_ERROR(WriteFileAtomically(fs_, SinkJoin(tmp_, kUniversalManifestName), pb));
  MEMENTO_RETURN_IF_ERROR(fs_->SyncDir(SinkJoin(tmp_, "params")));
  MEMENTO_RETURN_IF_ERROR(fs_->SyncDir(tmp_));
  MEMENTO_RETURN_IF_ERROR(fs_->Rename(tmp_, out_dir_));  // the commit point
  committed_ = true;
  MEMENTO_RETURN_IF_ERROR(fs_->SyncDir(SinkParent(out_dir_)));
  summary_.out_dir = out_dir_;
  summary_.step = step_;
  summary_.source_world_size = 1;
  summary_.params = m.params_size();
  summary_.blobs = m.blobs_size();
  summary_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  return summary_;
}

}  // namespace memento
