// memento-fuzz-seeds: writes the generated part of the seed corpora (tests/fuzz/corpus/<target>/)
// from the code that writes those inputs in production: a native checkpoint of two ranks and its
// universal conversion, catalog records and agent frames as the agent and client build them,
// heartbeats, option strings and pattern specs. The pickle and torch zip seeds come from torch
// itself and are kept as they are. Run once after a format change:
//   build-fuzz/tests/memento-fuzz-seeds tests/fuzz/corpus
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "agent/node_state.h"
#include "converters/torch_zip.h"
#include "core/crc.h"
#include "core/heartbeat.h"
#include "core/shard.h"
#include "proto/memento.pb.h"
#include "proto/shard_convert.h"
#include "proto/version.h"
#include "tests/fuzz/memory_file_system.h"
#include "ucp_format/native_checkpoint.h"
#include "ucp_format/safetensors.h"
#include "ucp_format/universal.h"

namespace {

using namespace memento;

std::string root;
constexpr int64_t kCreatedUnixMs = 1764000000000;  // 2025-11-24, in the seeds' manifests

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string path = root + "/" + target + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::cerr << "cannot write " << path << " (does " << root << "/" << target << " exist?)\n";
    std::exit(1);
  }
}

template <typename T>
T Check(Result<T> r, const char* what) {
  if (!r.ok()) {
    std::cerr << what << ": " << r.status().ToString() << "\n";
    std::exit(1);
  }
  return std::move(r).value();
}

void Check(const Status& st, const char* what) {
  if (!st.ok()) {
    std::cerr << what << ": " << st.ToString() << "\n";
    std::exit(1);
  }
}

proto::TensorRecord Tensor(const std::string& name, DType dtype, const ShardSpec& spec) {
  proto::TensorRecord t;
  t.set_name(name);
  t.set_dtype(static_cast<int32_t>(dtype));
  ToProto(spec, t.mutable_spec());
  t.set_bytes(static_cast<uint64_t>(spec.local_numel) * DTypeSize(dtype));
  return t;
}

proto::BlobRecord Blob(const std::string& name, uint64_t capacity) {
  proto::BlobRecord b;
  b.set_name(name);
  b.set_capacity(capacity);
  return b;
}

// Rank `rank` of 2: a row-split weight, a ZeRO flat part of a bias, a replicated norm, an RNG blob.
proto::RegisterRequest Registration(int rank) {
  proto::RegisterRequest req;
  *req.add_tensors() = Tensor("layer.w", DType::kF32, Check(SplitEvenly({8, 6}, 0, 2, rank), "split"));
  *req.add_tensors() = Tensor("layer.w.exp_avg", DType::kF32, Check(SplitEvenly({8, 6}, 0, 2, rank), "split"));
  auto flat = Check(ZeroFlatPartition({{10}}, 2, rank), "flat");
  *req.add_tensors() = Tensor("layer.b", DType::kBF16, flat[0].spec);
  *req.add_tensors() = Tensor("norm.g", DType::kF16, WholeTensor({6}, static_cast<int32_t>(rank)));
  *req.add_blobs() = Blob("rng", 24);
  return req;
}

proto::RankRecord Layout(int rank) {
  Session s;
  s.hello_done = true;
  s.rank = rank;
  s.local_rank = rank;
  s.world_size = 2;
  return Check(LayOutSlot(s, Registration(rank)), "layout");
}

std::string Frame(const google::protobuf::MessageLite& m) {
  const std::string body = m.SerializeAsString();
  const uint32_t n = static_cast<uint32_t>(body.size());
  const char header[4] = {static_cast<char>(n & 0xff), static_cast<char>((n >> 8) & 0xff),
                          static_cast<char>((n >> 16) & 0xff), static_cast<char>(n >> 24)};
  return std::string(header, 4) + body;
}

void AgentFrames() {
  proto::Request hello;
  proto::Hello* h = hello.mutable_hello();
  h->set_protocol_version(kAgentProtocolVersion);
  h->set_job_id("fuzz");
  h->set_job_token("token");
  h->set_rank(1);
  h->set_local_rank(1);
  h->set_world_size(2);
  h->set_pid(4242);
  h->set_library_version(kLibraryVersion);
  proto::Request reg;
  *reg.mutable_register_request() = Registration(1);
  proto::Request await;
  await.mutable_await_epoch()->set_timeout_ms(1000);
  proto::Request begin;
  begin.mutable_begin_capture()->set_step(3);
  proto::Request captured;
  captured.mutable_captured()->set_step(3);
  proto::Request restore;
  restore.mutable_restore()->set_step(-1);
  proto::Request list;
  list.mutable_list_versions();
  proto::Request nccl;
  nccl.mutable_nccl_id()->set_id(std::string(128, '\x5a'));
  nccl.mutable_nccl_id()->set_timeout_ms(1000);
  Write("agent_request", "session", Frame(hello) + Frame(reg) + Frame(await) + Frame(begin) + Frame(captured) +
                                        Frame(restore) + Frame(list) + Frame(nccl));
  h->set_job_token("guess");
  Write("agent_request", "wrong_token", Frame(hello) + Frame(reg));

  proto::Reply reply;
  reply.mutable_hello()->set_protocol_version(kAgentProtocolVersion);
  reply.mutable_hello()->set_agent_version(kLibraryVersion);
  proto::Reply registered;
  const proto::RankRecord layout = Layout(1);
  *registered.mutable_register_reply()->mutable_tensors() = layout.tensors();
  *registered.mutable_register_reply()->mutable_blobs() = layout.blobs();
  registered.mutable_register_reply()->set_slot_bytes(layout.slot_bytes());
  registered.mutable_register_reply()->add_slot_names("/memento-fuzz-n0-r1-s0");
  proto::Reply error;
  error.mutable_error()->set_code(static_cast<int32_t>(StatusCode::kUnavailable));
  error.mutable_error()->set_message("rank 1: slots busy");
  error.mutable_error()->set_retryable(true);
  proto::Reply resharded;  // a restore from the memory of an earlier layout
  proto::RestoreReply* rr = resharded.mutable_restore();
  rr->set_step(3);
  rr->set_slot_index(-1);
  rr->set_source("memory (resharded from world size 2)");
  rr->mutable_memory_reshard()->set_step(3);
  rr->mutable_memory_reshard()->set_slot_index(1);
  rr->mutable_memory_reshard()->set_old_world_size(2);
  *rr->mutable_memory_reshard()->add_old_ranks() = layout;
  rr->mutable_memory_reshard()->add_new_ranks(1);
  Write("agent_request", "replies",
        Frame(reply) + Frame(registered) + Frame(error) + Frame(resharded));
}

void CatalogRecords() {
  proto::NodeRecord node;
  node.set_format_version(kCatalogFormatVersion);
  node.set_job_id("fuzz");
  node.set_node_id(1);
  node.set_shm_prefix(ShmPrefix("fuzz", 1));
  node.set_slots_per_rank(3);
  node.set_incarnation(4);
  node.set_padded_length(8192);
  Write("catalog_record", "node", std::string(1, '\0') + node.SerializeAsString());

  proto::RankRecord rank = Layout(0);
  rank.set_incarnation(4);
  for (int k = 0; k < 3; ++k) rank.add_slot_names(ShmPrefix("fuzz", 1) + "-r0-s" + std::to_string(k));
  Write("catalog_record", "rank", std::string(1, '\1') + rank.SerializeAsString());

  // A version with rank 0's CRCs per 4 KiB chunk, as the agent computes them, and its parity.
  std::vector<uint8_t> slot(rank.slot_bytes(), 0x11);
  proto::VersionRecord v;
  v.set_step(12);
  v.set_slot_index(1);
  v.set_state(proto::VERSION_GLOBALLY_COMPLETE);
  v.set_incarnation(4);
  v.set_created_unix_ms(kCreatedUnixMs);
  v.set_is_protected(true);
  v.set_padded_length(8192);
  proto::RankCapture* cap = v.add_captured();
  cap->set_rank(0);
  auto region = [&](const std::string& name, uint64_t offset, uint64_t bytes, proto::RegionCrc* r) {
    r->set_name(name);
    r->set_offset(offset);
    r->set_bytes(bytes);
    r->set_chunk_bytes(4096);
    for (uint64_t at = 0; at < bytes || (bytes == 0 && at == 0); at += 4096) {
      r->add_chunk_crcs(Crc64(slot.data() + offset + at, std::min<uint64_t>(4096, bytes - at)));
      if (bytes == 0) break;
    }
  };
  for (const auto& t : rank.tensors()) region(t.name(), t.slot_offset(), t.bytes(), cap->add_crcs());
  for (const auto& b : rank.blobs()) region(b.name(), b.slot_offset(), 8 + b.capacity(), cap->add_crcs());
  region("parity", 0, 8192, v.add_parity_crcs());
  proto::PeerCaptures* peer = v.add_peer_captures();
  peer->set_member(1);
  *peer->add_captures() = *cap;
  Write("catalog_record", "version", std::string(1, '\2') + v.SerializeAsString());
}

// A committed native checkpoint of two ranks at /root/job/step-7 in `fs`, converted to universal
// at /ucp.
void Checkpoints(fuzz::MemoryFileSystem* fs) {
  const std::string dir = CheckpointDir("/root", "job", 7);
  std::vector<proto::ManifestRank> entries;
  for (int rank = 0; rank < 2; ++rank) {
    const proto::RankRecord layout = Layout(rank);
    std::vector<uint8_t> slot(layout.slot_bytes(), 0);
    for (size_t i = 0; i < slot.size(); ++i) slot[i] = static_cast<uint8_t>(i * 7 + rank);
    const proto::BlobRecord& rng = layout.blobs(0);
    const uint64_t length = 16;
    std::memcpy(slot.data() + rng.slot_offset(), &length, 8);
    RankImage image{rank, 2, &layout, slot.data()};
    PersistOptions options;
    options.write.direct_io = false;
    options.crc_chunk_bytes = 32;  // several chunks per run
    entries.push_back(Check(WriteRankFiles(fs, dir, "job", 7, image, options), "write rank files"));
  }
  proto::Manifest manifest = BuildManifest("job", 7, 2, entries);
  manifest.set_created_unix_ms(kCreatedUnixMs);  // the same seed on every run
  Check(CommitManifest(fs, dir, manifest), "commit");
  Write("native_manifest", "two_ranks", *fs->Get(dir + "/manifest"));
  Write("native_meta", "rank0", *fs->Get(dir + "/rank-0.meta"));
  Write("native_meta", "rank1", *fs->Get(dir + "/rank-1.meta"));

  ConvertOptions options;
  options.threads = 1;
  options.crc_chunk_bytes = 64;
  options.write.direct_io = false;
  Check(ConvertNativeToUniversal(fs, dir, "/ucp", options), "convert");
  proto::UniversalManifest universal = Check(ReadUniversalManifest(fs, "/ucp"), "read universal");
  universal.set_created_unix_ms(kCreatedUnixMs);
  Write("universal_manifest", "two_ranks", universal.SerializeAsString());
  Write("safetensors", "universal_param", *fs->Get("/ucp/params/layer.w.safetensors"));
  Write("safetensors", "universal_blobs", *fs->Get("/ucp/blobs.safetensors"));
}

void Safetensors() {
  SafetensorsHeader h;
  Check(h.Add("a", DType::kBF16, {2, 3}), "add");
  Check(h.Add("b\n\"quoted\"", DType::kI64, {0}), "add");
  Check(h.Add("c", DType::kBool, {}), "add");
  h.SetMetadata("format", "pt");
  h.SetMetadata("note", "caf\xc3\xa9 \\u00e9");
  std::string file = h.Serialize();
  for (uint64_t i = 0; i < h.data_bytes(); ++i) file.push_back(static_cast<char>(i));
  Write("safetensors", "metadata", file);
  // The compact form other writers use: no padding, keys out of buffer order.
  const std::string json = R"({"y":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  std::string compact(8, '\0');
  compact[0] = static_cast<char>(json.size());
  Write("safetensors", "compact", compact + json + std::string(6, '\x01'));
}

void Heartbeats() {
  Beat b;
  b.job = "run-20261126-4242";
  b.rank = 3;
  b.pid = 4242;
  b.phase = BeatPhase::kStep;
  b.step = 17;
  Write("heartbeat", "step", FormatBeat(b));
  b.phase = BeatPhase::kRestored;
  b.detail = "/storage/run/step-15";
  Write("heartbeat", "restored", FormatBeat(b));
  b.phase = BeatPhase::kWaiting;
  b.step = -1;
  b.detail = "";
  Write("heartbeat", "waiting", FormatBeat(b));
}

void Specs() {
  auto spec = [](int parser, const std::string& name, const std::string& text) {
    Write("specs", name, std::string(1, static_cast<char>(parser)) + text);
  };
  spec(0, "scheme_rs", "rs:2");
  spec(0, "scheme_replicate", "replicate:3");
  spec(0, "scheme_xor", "xor");
  spec(1, "inject_node_loss", "node-loss:node=2:step=10");
  spec(1, "inject_recovery", "node-loss:node=1:during=recovery");
  spec(1, "inject_hang", "hang:rank=5:step=4");
  std::string argv;
  for (const char* arg : {"--simulate-nodes", "4", "--ranks-per-node=2", "--ec", "rs:2", "--spares", "1", "--inject",
                          "agent-crash:node=1:step=6", "--hang-timeout", "2.5", "--job", "run-1", "--", "train",
                          "--steps", "20"}) {
    argv += (argv.empty() ? "" : std::string(1, '\0')) + arg;
  }
  spec(2, "command_line", argv);
  spec(3, "fault_fs", "enospc_after=4096,eio_read=rank-0.data,short_writes=1");
  spec(4, "dtype_alias", "bfloat16");
  spec(4, "dtype_name", "F8_E4M3");
}

void PatternSpecs() {
  Write("pattern_spec", "docs_example", R"spec(source { tp: 2 dp: 2 }
states { regex: "^(.+)\\.(exp_avg|exp_avg_sq)$" }
rule { pattern: "embed\\.w" vocab { original_size: 50257 } }
rule { pattern: ".*\\.qkv\\.w" sub_params { dim: 0 sizes: [4096, 1024, 1024] } }
rule { pattern: ".*\\.(w1|gate_up)" split { dim: 1 } }
rule { pattern: ".*\\.w2" split { dim: 0 } }
rule { pattern: ".*(ln|norm).*" replicated {} }
)spec");
  Write("pattern_spec", "tied_average", R"spec(source { tp: 4 pp: 2 }
states { regex: "^(.+)/(m|v)$" value_state: "master" }
allow_unmatched_rules: true
rule { pattern: "lm_head\\.weight" pipeline_replicated: true }
rule { pattern: "router.*" average {} }
)spec");
}

// Bundles for fuzz_deepspeed (see there) from the DeepSpeed fixtures of tests/converters: each
// file's data.pkl; the target rebuilds the zips and their storages.
void DeepSpeedBundles() {
  const std::string fixtures = root + "/../../converters/fixtures/deepspeed";
  for (const char* layout : {"dp2_zero3", "tp2_dp2_zero2"}) {
    const std::string dir = fixtures + "/" + layout + "/global_step7";
    std::string bundle;
    for (const std::string& name : Check(PosixFileSystem()->ListDir(dir), "list fixtures")) {
      auto zip = Check(ZipArchive::Open(PosixFileSystem(), dir + "/" + name), "open fixture");
      std::string pickle;
      for (const ZipEntry& e : zip->entries()) {
        if (e.name.size() > 9 && e.name.compare(e.name.size() - 9, 9, "/data.pkl") == 0) pickle = Check(zip->Read(e), "read");
      }
      bundle += static_cast<char>(name.size()) + name;
      for (int k = 0; k < 4; ++k) bundle += static_cast<char>((pickle.size() >> (8 * k)) & 0xff);
      bundle += pickle;
    }
    Write("deepspeed", layout, bundle);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: memento-fuzz-seeds <tests/fuzz/corpus>\n";
    return 2;
  }
  root = argv[1];
  fuzz::MemoryFileSystem fs;
  AgentFrames();
  CatalogRecords();
  Checkpoints(&fs);
  Safetensors();
  Heartbeats();
  Specs();
  PatternSpecs();
  DeepSpeedBundles();
  std::cout << "seeds written under " << root << "\n";
  return 0;
}
