// The C API over memento::Client.
#include "snapshot/memento.h"

#include <string>
#include <vector>

#include "snapshot/client.h"

struct memento_client {
  std::unique_ptr<memento::Client> impl;
};

namespace {

thread_local std::string g_last_error;

int Fail(const memento::Status& st) {
  g_last_error = st.ToString();
  return st.ok() ? 0 : static_cast<int>(st.code());
}

int Check(memento_client* c) {
  if (c == nullptr || !c->impl) return Fail(memento::InvalidArgument("null memento_client"));
  return 0;
}

memento::Result<memento::DType> Dt(int dtype) { return memento::DTypeFromInt(dtype); }

}  // namespace

extern "C" {

const char* memento_last_error(void) { return g_last_error.c_str(); }

int memento_connect(const char* agent_socket, const char* job_id, const char* job_token, int rank, int local_rank,
                    int world_size, memento_client** out) {
  if (out == nullptr) return Fail(memento::InvalidArgument("memento_connect: out is null"));
  memento::ClientOptions o;
  if (agent_socket) o.agent_socket = agent_socket;
  if (job_id) o.job_id = job_id;
  if (job_token) o.job_token = job_token;
  o.rank = rank;
  o.local_rank = local_rank;
  o.world_size = world_size;
  auto r = memento::Client::Connect(o);
  if (!r.ok()) return Fail(r.status());
  *out = new memento_client{std::move(r).value()};
  return 0;
}

void memento_close(memento_client* c) { delete c; }

int memento_register_tensor(memento_client* c, const char* name, void* data, size_t bytes, int dtype, int ndim,
                            const int64_t* global_shape, const int64_t* offsets, const int64_t* lengths,
                            int replica_id, int memory_kind, int device) {
  if (int e = Check(c)) return e;
  auto dt = Dt(dtype);
  if (!dt.ok()) return Fail(dt.status().WithContext(std::string("tensor '") + (name ? name : "") + "'"));
  if (ndim < 0 || (ndim > 0 && global_shape == nullptr)) return Fail(memento::InvalidArgument("bad shape"));
  std::vector<int64_t> shape(global_shape, global_shape + ndim);
  memento::ShardSpec spec = memento::WholeTensor(shape, replica_id);
  if (offsets != nullptr && lengths != nullptr) {
    spec.fragments[0].box.offsets.assign(offsets, offsets + ndim);
    spec.fragments[0].box.lengths.assign(lengths, lengths + ndim);
    spec.local_numel = spec.fragments[0].box.numel();
  }
  return Fail(c->impl->RegisterTensor(name ? name : "", data, bytes, *dt, spec,
                                      static_cast<memento::MemoryKind>(memory_kind), device));
}

int memento_register_flat(memento_client* c, const char* name, void* data, size_t bytes, int dtype, int ndim,
                          const int64_t* global_shape, int64_t flat_begin, int64_t flat_length, int replica_id,
                          int memory_kind, int device) {
  if (int e = Check(c)) return e;
  auto dt = Dt(dtype);
  if (!dt.ok()) return Fail(dt.status());
  memento::ShardSpec spec;
  spec.global_shape.assign(global_shape, global_shape + ndim);
  memento::Fragment f;
  f.kind = memento::Fragment::Kind::kFlat;
  f.flat_begin = flat_begin;
  f.flat_length = flat_length;
  f.replica_id = replica_id;
  spec.fragments.push_back(f);
  spec.local_numel = flat_length;
  return Fail(c->impl->RegisterTensor(name ? name : "", data, bytes, *dt, spec,
                                      static_cast<memento::MemoryKind>(memory_kind), device));
}

int memento_register_blob(memento_client* c, const char* name, void* data, size_t capacity, size_t* size) {
  if (int e = Check(c)) return e;
  return Fail(c->impl->RegisterBlob(name ? name : "", data, capacity, size));
}

int memento_finish_registration(memento_client* c) {
  if (int e = Check(c)) return e;
  return Fail(c->impl->FinishRegistration());
}

int memento_snapshot(memento_client* c, int64_t step) {
  if (int e = Check(c)) return e;
  return Fail(c->impl->Snapshot(step));
}

int memento_wait_until_safe_to_update(memento_client* c) {
  if (int e = Check(c)) return e;
  return Fail(c->impl->WaitUntilSafeToUpdate());
}

int memento_restore(memento_client* c, int64_t step, int64_t* restored_step) {
  if (int e = Check(c)) return e;
  auto r = c->impl->Restore(step);
  if (!r.ok()) return Fail(r.status());
  if (restored_step) *restored_step = r->step;
  return 0;
}

}  // extern "C"
