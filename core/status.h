// Status and Result<T>: how every fallible call in memento reports failure.
// A Status carries a code, a message that names the thing that failed (path, rank, step, tensor)
// and whether retrying can help. Thread-compatible value types.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace memento {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,     // the caller's input is wrong; retrying the same call cannot help
  kNotFound = 2,            // a named thing (tensor, version, file) does not exist
  kAlreadyExists = 3,       // a name registered twice
  kFailedPrecondition = 4,  // the system is not in the state the call needs
  kResourceExhausted = 5,   // memory budget, /dev/shm or disk full
  kDataLoss = 6,            // a checksum mismatch or torn data
  kUnavailable = 7,         // a peer (agent, rank) cannot be reached; retry may help
  kPermissionDenied = 8,    // wrong job, token or user
  kNotSupported = 9,        // a capability this build or machine lacks (e.g. CUDA)
  kIOError = 10,            // an operating-system I/O call failed
  kAborted = 11,            // the operation was superseded or cancelled
  kInternal = 12,           // a broken invariant: a bug
  kTimeout = 13,            // a deadline passed
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message, bool retryable = false)
      : code_(code), message_(std::move(message)), retryable_(retryable) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // True when the same call may succeed later (a peer restarting, space freed).
  bool retryable() const { return retryable_; }

  // "DataLoss: crc mismatch in rank 1 tensor 'w' step 12"
  std::string ToString() const;

  // Returns a copy whose message is prefixed with `context: `.
  Status WithContext(std::string_view context) const;

  void IgnoreError() const {}

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
  bool retryable_ = false;
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m), true}; }
inline Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m), true}; }
inline Status PermissionDenied(std::string m) { return {StatusCode::kPermissionDenied, std::move(m)}; }
inline Status NotSupported(std::string m) { return {StatusCode::kNotSupported, std::move(m)}; }
inline Status IOError(std::string m, bool retryable = false) { return {StatusCode::kIOError, std::move(m), retryable}; }
inline Status Aborted(std::string m) { return {StatusCode::kAborted, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status Timeout(std::string m) { return {StatusCode::kTimeout, std::move(m), true}; }

// Result<T> holds either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "Result built from an OK Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace memento

#define MEMENTO_CONCAT_INNER(a, b) a##b
#define MEMENTO_CONCAT(a, b) MEMENTO_CONCAT_INNER(a, b)

// Returns early from the enclosing function when `expr` is a non-OK Status.
#define MEMENTO_RETURN_IF_ERROR(expr)              \
  do {                                             \
    ::memento::Status _memento_st = (expr);        \
    if (!_memento_st.ok()) return _memento_st;     \
  } while (0)

// `MEMENTO_ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the Status.
#define MEMENTO_ASSIGN_OR_RETURN(lhs, expr) \
  MEMENTO_ASSIGN_OR_RETURN_IMPL(MEMENTO_CONCAT(_memento_res_, __LINE__), lhs, expr)
#define MEMENTO_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()
