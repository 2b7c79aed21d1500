/* memento C API: the same calls as snapshot/client.h for C programs and Python (ctypes).
 * Every call returns 0 on success or a memento status code (> 0); memento_last_error() then
 * returns the message (thread-local, valid until the next call on that thread). */
#ifndef MEMENTO_MEMENTO_H_
#define MEMENTO_MEMENTO_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct memento_client memento_client;

/* dtype codes (core/dtype.h) */
enum {
  MEMENTO_F64 = 1, MEMENTO_F32 = 2, MEMENTO_F16 = 3, MEMENTO_BF16 = 4, MEMENTO_F8E4M3 = 5,
  MEMENTO_F8E5M2 = 6, MEMENTO_I64 = 7, MEMENTO_I32 = 8, MEMENTO_I8 = 9, MEMENTO_U8 = 10, MEMENTO_BOOL = 11
};
/* memory kinds */
enum { MEMENTO_HOST = 0, MEMENTO_CUDA = 1 };

const char* memento_last_error(void);

/* Connects to the node's agent. Any string may be NULL and any int -1 for the default (the
 * environment: MEMENTO_AGENT_SOCKET, MEMENTO_JOB_ID, MEMENTO_JOB_TOKEN, OMPI_COMM_WORLD_*). */
int memento_connect(const char* agent_socket, const char* job_id, const char* job_token, int rank,
                    int local_rank, int world_size, memento_client** out);
void memento_close(memento_client* c);

/* A tensor whose local buffer holds the box [offsets, offsets + lengths) of a global tensor of
 * shape `global_shape` (ndim dims), row-major; NULL offsets/lengths = the whole tensor. */
int memento_register_tensor(memento_client* c, const char* name, void* data, size_t bytes, int dtype,
                            int ndim, const int64_t* global_shape, const int64_t* offsets,
                            const int64_t* lengths, int replica_id, int memory_kind, int device);
/* A tensor whose local buffer holds elements [flat_begin, flat_begin + flat_length) of the
 * row-major global tensor (a ZeRO flat partition). */
int memento_register_flat(memento_client* c, const char* name, void* data, size_t bytes, int dtype,
                          int ndim, const int64_t* global_shape, int64_t flat_begin, int64_t flat_length,
                          int replica_id, int memory_kind, int device);
int memento_register_blob(memento_client* c, const char* name, void* data, size_t capacity, size_t* size);
int memento_finish_registration(memento_client* c);

int memento_snapshot(memento_client* c, int64_t step);
int memento_wait_until_safe_to_update(memento_client* c);
/* step = -1 for the newest complete version; the restored step is written to *restored_step. */
int memento_restore(memento_client* c, int64_t step, int64_t* restored_step);

#ifdef __cplusplus
}
#endif

#endif /* MEMENTO_MEMENTO_H_ */
