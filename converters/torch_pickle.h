// A pickle machine for the data.pkl of PyTorch files (docs/formats/ecosystem.md): it builds plain
// values (dict, OrderedDict, list, tuple, set, int, float, str, bytes, bool, None, torch.Size,
// tensors through torch._utils._rebuild_tensor_v2 and persistent storage ids, DeepSpeed's
// fragment_address and SubparamShape) and runs no code. Any other global becomes an opaque
// placeholder (kGlobal, or kObject once called) that readers refuse where they need a value; a
// global of a module that can run code (os, subprocess, builtins.eval, ...) is refused outright.
// Also the writer of pickles that torch.load(weights_only=True) accepts. Thread-compatible.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace memento {

// A tensor as data.pkl describes it: a view (offset, size, stride in elements) of a storage kept
// in the zip as data/<storage_key>.
struct TorchTensorRef {
  std::string storage_key;
  std::string location;        // "cpu", "cuda:0", ...
  DType dtype = DType::kInvalid;
  int64_t storage_numel = 0;   // elements of the storage
  int64_t storage_offset = 0;  // elements
  std::vector<int64_t> size;
  std::vector<int64_t> stride;

  int64_t numel() const;
  // Row-major contiguous (any view of a storage, at any offset).
  bool contiguous() const;
};

class PickleValue;
using PickleValuePtr = std::shared_ptr<PickleValue>;

class PickleValue {
 public:
  enum class Kind {
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kBytes,
    kList,
    kTuple,
    kSet,
    kDict,     // dict and collections.OrderedDict (ordered() tells them apart); insertion order kept
    kTensor,
    kGlobal,   // a global not called (a class or a function object): name() is "module.qualname"
    kObject,   // an instance of a class nothing here understands, or a known dataclass (fragment_address)
  };

  Kind kind = Kind::kNone;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;                      // kString, kBytes; the global's "module.name" for kGlobal, kObject
  std::vector<PickleValuePtr> items;  // kList, kTuple, kSet; kObject: the call's arguments
  std::vector<std::pair<PickleValuePtr, PickleValuePtr>> entries;  // kDict; kObject: BUILD state dict
  TorchTensorRef tensor;              // kTensor
  bool ordered = false;               // kDict from collections.OrderedDict
  // Nesting depth (1 for scalars), fixed when the value is first placed inside another.
  int depth = 1;
  // A container may not change after it was placed inside another (this rules out cycles).
  bool sealed = false;

  bool is_none() const { return kind == Kind::kNone; }
  const std::string& name() const { return s; }
  // Dict lookup by string key; nullptr when absent or not a dict.
  const PickleValue* Get(std::string_view key) const;
  // For kObject: the BUILD state's entry `key`, else its `index`-th constructor argument.
  const PickleValue* Field(std::string_view key, size_t index) const;

  // "dict", "list", "tensor", "object deepspeed.utils.tensor_fragment.fragment_address", ...
  std::string TypeName() const;
};

struct PickleLimits {
  // Deepest nesting of containers. Default 200.
  int max_depth = 200;
  // Input bytes. Default 1 GiB.
  uint64_t max_bytes = uint64_t{1} << 30;
  // Globals not known here: false (default) makes them opaque placeholders; true refuses them.
  bool strict_globals = false;
};

// Runs the pickle in `data` (protocols 0..5 opcodes that build values; INST/OBJ/EXT refused) and
// returns its value. InvalidArgument naming the opcode offset for malformed input, for sizes past
// the end of the input, for nesting deeper than the limit, for a global that runs code
// ("pickle at byte 12 imports os.system, which can run code: refused"), and for REDUCE of an
// unknown callable in strict mode. Nothing is ever imported or called.
Result<PickleValuePtr> Unpickle(std::string_view data, const PickleLimits& limits = {});

// Builds a protocol 2 pickle of plain values and tensors (storages as persistent ids
// ('storage', torch.<T>Storage, key, location, numel)), loadable by torch.load(weights_only=True).
// Supported kinds: None, bool, int, float, str, list, tuple, dict (OrderedDict when ordered),
// tensor, and DeepSpeed's dataclasses fragment_address and SubparamShape (made by PyDataclass),
// written as Python pickles a dataclass: GLOBAL, NEWOBJ of no arguments, BUILD of its fields.
// A pickle holding such an object needs torch.load(weights_only=False) (or the class in
// torch.serialization.add_safe_globals), with DeepSpeed importable. InvalidArgument for other
// kinds (bytes, sets, globals, any other object).
Result<std::string> PickleForTorch(const PickleValue& value);

// Value constructors (for writers and tests).
PickleValuePtr PyNone();
PickleValuePtr PyBool(bool v);
PickleValuePtr PyInt(int64_t v);
PickleValuePtr PyFloat(double v);
PickleValuePtr PyStr(std::string v);
PickleValuePtr PyList(std::vector<PickleValuePtr> items = {});
PickleValuePtr PyTuple(std::vector<PickleValuePtr> items = {});
PickleValuePtr PyDict(bool ordered = false);
PickleValuePtr PyTensor(TorchTensorRef t);
// An instance (kObject, no constructor arguments) of the dataclass `global_name`
// ("module.QualName"); its fields are set with DictSet, in declaration order.
PickleValuePtr PyDataclass(std::string global_name);
// Appends (key, value) to a dict built with PyDict (or a field to a PyDataclass).
void DictSet(PickleValue* dict, const std::string& key, PickleValuePtr value);

// The name of torch's storage class for a dtype ("FloatStorage", "BFloat16Storage", ...) and back.
std::string_view TorchStorageName(DType dtype);
DType DTypeFromTorchStorage(std::string_view name);

}  // namespace memento
