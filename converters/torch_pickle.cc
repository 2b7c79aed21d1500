// The pickle machine and writer of converters/torch_pickle.h. Opcodes as Python's pickletools
// documents them; only those that build values are run, and globals are looked up in tables here,
// never imported.
#include "converters/torch_pickle.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <unordered_map>

#include "core/utf8.h"

namespace memento {
namespace {

// Modules whose callables can run code or touch the system: any global from them is refused.
constexpr std::array<std::string_view, 30> kCodeModules = {
    "os",       "posix",    "nt",         "subprocess", "sys",      "shutil",   "socket",    "importlib",
    "runpy",    "pickle",   "_pickle",    "code",       "codeop",   "pty",      "commands",  "webbrowser",
    "ctypes",   "multiprocessing", "asyncio", "io",     "tempfile", "pathlib",  "signal",    "marshal",
    "types",    "operator", "functools",  "timeit",     "pdb",      "platform"};
// builtins that build plain values; every other builtin (eval, exec, getattr, open, __import__...)
// is refused.
constexpr std::array<std::string_view, 4> kSafeBuiltins = {"set", "frozenset", "bytearray", "slice"};

// "a list", "an object of ..."
std::string An(const PickleValue& v) {
  const std::string t = v.TypeName();
  return (t[0] == 'o' || t[0] == 'O' ? "an " : "a ") + t;
}

bool InModule(std::string_view module, std::string_view m) {
  return module == m || (module.size() > m.size() && module.substr(0, m.size()) == m && module[m.size()] == '.');
}

struct StorageName {
  DType dtype;
  std::string_view name;
};
constexpr std::array<StorageName, 11> kStorages = {{{DType::kF32, "FloatStorage"},
                                                    {DType::kF64, "DoubleStorage"},
                                                    {DType::kF16, "HalfStorage"},
                                                    {DType::kBF16, "BFloat16Storage"},
                                                    {DType::kI64, "LongStorage"},
                                                    {DType::kI32, "IntStorage"},
                                                    {DType::kI8, "CharStorage"},
                                                    {DType::kU8, "ByteStorage"},
                                                    {DType::kBool, "BoolStorage"},
                                                    {DType::kF8E4M3, "Float8_e4m3fnStorage"},
                                                    {DType::kF8E5M2, "Float8_e5m2Storage"}}};

// The persistent storage a BINPERSID builds; its name cannot come from a GLOBAL (those hold a dot).
constexpr std::string_view kStorageObject = "<storage>";

bool IsDeepSpeedClass(std::string_view name, std::string_view cls) {
  return InModule(name, "deepspeed") && name.size() > cls.size() + 1 &&
         name.substr(name.size() - cls.size() - 1) == std::string(".") + std::string(cls);
}

bool IsKnownGlobal(std::string_view name) {
  static const std::array<std::string_view, 12> kKnown = {
      "collections.OrderedDict",  "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
      "torch._utils._rebuild_parameter_with_state", "torch.Size", "_codecs.encode", "builtins.set",
      "builtins.frozenset", "builtins.bytearray", "copyreg._reconstructor", "__builtin__.set", "torch.device"};
  if (std::find(kKnown.begin(), kKnown.end(), name) != kKnown.end()) return true;
  if (name.substr(0, 6) == "torch." && DTypeFromTorchStorage(name.substr(6)) != DType::kInvalid) return true;
  return IsDeepSpeedClass(name, "fragment_address") || IsDeepSpeedClass(name, "SubparamShape");
}

class Machine {
 public:
  Machine(std::string_view data, const PickleLimits& limits) : data_(data), limits_(limits) {}

  Result<PickleValuePtr> Run() {
    if (data_.size() > limits_.max_bytes) {
      return InvalidArgument("pickle of " + std::to_string(data_.size()) + " bytes exceeds the limit of " +
                             std::to_string(limits_.max_bytes));
    }
    while (true) {
      op_pos_ = pos_;
      if (pos_ >= data_.size()) return Bad("input ends before STOP");
      const uint8_t op = static_cast<uint8_t>(data_[pos_++]);
      if (op == '.') break;
      MEMENTO_RETURN_IF_ERROR(Step(op));
    }
    if (stack_.size() != 1 || !marks_.empty()) return Bad("STOP with " + std::to_string(stack_.size()) + " values on the stack");
    return stack_.back();
  }

 private:
  Status Bad(const std::string& what) const {
    return InvalidArgument("pickle at byte " + std::to_string(op_pos_) + ": " + what);
  }

  Status Need(uint64_t n) const {
    if (n > data_.size() - pos_) {
      return Bad("declares " + std::to_string(n) + " bytes but only " + std::to_string(data_.size() - pos_) +
                 " remain");
    }
    return Status::Ok();
  }
  Result<uint64_t> ReadLE(int n) {
    MEMENTO_RETURN_IF_ERROR(Need(static_cast<uint64_t>(n)));
    uint64_t v = 0;
    for (int k = 0; k < n; ++k) v |= static_cast<uint64_t>(static_cast<uint8_t>(data_[pos_ + k])) << (8 * k);
    pos_ += static_cast<size_t>(n);
    return v;
  }
  Result<std::string> ReadBytes(uint64_t n) {
    MEMENTO_RETURN_IF_ERROR(Need(n));
    std::string s(data_.substr(pos_, n));
    pos_ += n;
    return s;
  }
  Result<std::string> ReadLine() {
    const size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) return Bad("line without end");
    std::string s(data_.substr(pos_, nl - pos_));
    pos_ = nl + 1;
    return s;
  }

  Result<PickleValuePtr> Pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) return Bad("stack underflow");
    PickleValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  Result<std::vector<PickleValuePtr>> PopMark() {
    if (marks_.empty()) return Bad("no MARK");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<PickleValuePtr> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
                                      std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  Status Push(PickleValuePtr v) {
    if (v->depth > limits_.max_depth) {
      return Bad("nesting deeper than " + std::to_string(limits_.max_depth) + " levels");
    }
    stack_.push_back(std::move(v));
    return Status::Ok();
  }

  // Places `child` inside `parent`: seals the child, updates the parent's depth.
  Status Place(PickleValue* parent, const PickleValuePtr& child) {
    if (child.get() == parent) return Bad("places " + An(*parent) + " inside itself (recursive structure): refused");
    child->sealed = true;
    parent->depth = std::max(parent->depth, child->depth + 1);
    if (parent->depth > limits_.max_depth) return Bad("nesting deeper than " + std::to_string(limits_.max_depth) + " levels");
    return Status::Ok();
  }
  Status Mutable(const PickleValue& v, PickleValue::Kind kind, const char* op) {
    if (v.kind != kind) return Bad(std::string(op) + " on " + An(v));
    if (v.sealed) return Bad(std::string(op) + " modifies " + An(v) + " already placed in another value (recursive structure): refused");
    return Status::Ok();
  }

  Result<PickleValuePtr> Container(PickleValue::Kind kind, std::vector<PickleValuePtr> items) {
    auto v = std::make_shared<PickleValue>();
    v->kind = kind;
    for (const PickleValuePtr& item : items) MEMENTO_RETURN_IF_ERROR(Place(v.get(), item));
    v->items = std::move(items);
    return v;
  }

  // The identity of a str or int key ("" for other keys, which are never merged).
  static std::string KeySig(const PickleValue& key) {
    if (key.kind == PickleValue::Kind::kString) return "s" + key.s;
    if (key.kind == PickleValue::Kind::kInt) return "i" + std::to_string(key.i);
    return "";
  }

  Status SetItem(PickleValue* dict, PickleValuePtr key, PickleValuePtr value) {
    MEMENTO_RETURN_IF_ERROR(Place(dict, key));
    MEMENTO_RETURN_IF_ERROR(Place(dict, value));
    const std::string sig = KeySig(*key);
    if (!sig.empty()) {
      // The index is keyed by address, and a dict freed during the run (popped, a BUILD state)
      // can leave its index to a new dict at the same address: an entry is used only when the
      // dict holds that key there, and the index is rebuilt from the dict's entries otherwise.
      auto& index = dict_index_[dict];
      auto it = index.find(sig);
      if (it != index.end() && (it->second >= dict->entries.size() || KeySig(*dict->entries[it->second].first) != sig)) {
        index.clear();
        for (size_t k = 0; k < dict->entries.size(); ++k) {
          const std::string ks = KeySig(*dict->entries[k].first);
          if (!ks.empty()) index[ks] = k;
        }
        it = index.find(sig);
      }
      if (it != index.end()) {
        dict->entries[it->second].second = std::move(value);
        return Status::Ok();
      }
      index.emplace(sig, dict->entries.size());
    }
    dict->entries.emplace_back(std::move(key), std::move(value));
    return Status::Ok();
  }

  Result<PickleValuePtr> Global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    for (std::string_view m : kCodeModules) {
      if (InModule(module, m)) return Bad("imports " + full + ", which can run code: refused (nothing was run)");
    }
    if (module == "builtins" || module == "__builtin__") {
      if (std::find(kSafeBuiltins.begin(), kSafeBuiltins.end(), name) == kSafeBuiltins.end()) {
        return Bad("imports " + full + ", which can run code: refused (nothing was run)");
      }
    }
    if (limits_.strict_globals && !IsKnownGlobal(full)) return Bad("imports unknown global " + full + ": refused (strict)");
    auto v = std::make_shared<PickleValue>();
    v->kind = PickleValue::Kind::kGlobal;
    v->s = full;
    return v;
  }

  Result<int64_t> AsInt(const PickleValuePtr& v, const char* what) {
    if (v->kind == PickleValue::Kind::kInt) return v->i;
    if (v->kind == PickleValue::Kind::kBool) return v->b ? 1 : 0;
    return Bad(std::string(what) + " is " + An(*v) + ", not an int");
  }
  Result<std::vector<int64_t>> AsInts(const PickleValuePtr& v, const char* what) {
    const PickleValue* seq = v.get();
    if (seq->kind == PickleValue::Kind::kObject && seq->s == "torch.Size") return Bad(std::string(what) + " malformed");
    if (seq->kind != PickleValue::Kind::kTuple && seq->kind != PickleValue::Kind::kList) {
      return Bad(std::string(what) + " is " + An(*seq) + ", not a tuple");
    }
    std::vector<int64_t> out;
    for (const PickleValuePtr& item : seq->items) {
      MEMENTO_ASSIGN_OR_RETURN(int64_t x, AsInt(item, what));
      out.push_back(x);
    }
    return out;
  }

  Result<PickleValuePtr> RebuildTensor(const std::vector<PickleValuePtr>& args) {
    if (args.size() < 4) return Bad("_rebuild_tensor_v2 with " + std::to_string(args.size()) + " arguments");
    const PickleValue& storage = *args[0];
    if (storage.kind != PickleValue::Kind::kObject || storage.s != kStorageObject) {
      return Bad("_rebuild_tensor_v2 of " + An(storage) + ", not a persistent storage");
    }
    auto v = std::make_shared<PickleValue>();
    v->kind = PickleValue::Kind::kTensor;
    TorchTensorRef& t = v->tensor;
    t.dtype = static_cast<DType>(storage.i);
    t.storage_key = storage.items[0]->s;
    t.location = storage.items[1]->s;
    t.storage_numel = storage.items[2]->i;
    MEMENTO_ASSIGN_OR_RETURN(t.storage_offset, AsInt(args[1], "storage offset"));
    MEMENTO_ASSIGN_OR_RETURN(t.size, AsInts(args[2], "tensor size"));
    MEMENTO_ASSIGN_OR_RETURN(t.stride, AsInts(args[3], "tensor stride"));
    if (t.size.size() != t.stride.size() || t.size.size() > 64) return Bad("tensor size and stride disagree");
    // The last element the view touches must lie inside the storage (no overflow on the way).
    constexpr int64_t kMax = int64_t{1} << 50;
    if (t.storage_offset < 0 || t.storage_offset > t.storage_numel) return Bad("tensor storage offset outside its storage");
    int64_t last = t.storage_offset;
    bool empty = false;
    for (size_t d = 0; d < t.size.size(); ++d) {
      if (t.size[d] < 0 || t.size[d] > kMax || t.stride[d] < 0 || t.stride[d] > kMax) return Bad("tensor size or stride out of range");
      if (t.size[d] == 0) empty = true;
    }
    if (!empty) {
      for (size_t d = 0; d < t.size.size(); ++d) {
        if (t.size[d] > 1 && t.stride[d] > (kMax - last) / (t.size[d] - 1)) return Bad("tensor view out of range");
        last += (t.size[d] - 1) * t.stride[d];
      }
      if (last >= t.storage_numel) {
        return Bad("tensor view reaches element " + std::to_string(last) + " of a storage of " +
                   std::to_string(t.storage_numel));
      }
    }
    return v;
  }

  // REDUCE, NEWOBJ: `callable(*args)` for the callables known here; an opaque object otherwise.
  Result<PickleValuePtr> Call(const PickleValuePtr& callable, std::vector<PickleValuePtr> args, bool newobj) {
    if (callable->kind != PickleValue::Kind::kGlobal) return Bad("call of " + An(*callable));
    const std::string& n = callable->s;
    if (n == "collections.OrderedDict") {
      auto d = std::make_shared<PickleValue>();
      d->kind = PickleValue::Kind::kDict;
      d->ordered = true;
      if (!args.empty()) {
        if (args[0]->kind != PickleValue::Kind::kList && args[0]->kind != PickleValue::Kind::kTuple) return Bad("OrderedDict of a " + args[0]->TypeName());
        for (const PickleValuePtr& pair : args[0]->items) {
          if (pair->kind != PickleValue::Kind::kTuple || pair->items.size() != 2) return Bad("OrderedDict item not a pair");
          MEMENTO_RETURN_IF_ERROR(SetItem(d.get(), pair->items[0], pair->items[1]));
        }
      }
      return d;
    }
    if (n == "torch._utils._rebuild_tensor_v2") return RebuildTensor(args);
    if (n == "torch._utils._rebuild_parameter" || n == "torch._utils._rebuild_parameter_with_state") {
      if (args.empty() || args[0]->kind != PickleValue::Kind::kTensor) return Bad(n + " of a non-tensor");
      return args[0];
    }
    if (n == "torch.Size") {
      if (args.size() != 1) return Bad("torch.Size with " + std::to_string(args.size()) + " arguments");
      MEMENTO_ASSIGN_OR_RETURN(std::vector<int64_t> dims, AsInts(args[0], "torch.Size"));
      (void)dims;
      return Container(PickleValue::Kind::kTuple, args[0]->items);
    }
    if (n == "_codecs.encode") {
      if (args.empty() || args[0]->kind != PickleValue::Kind::kString) return Bad("_codecs.encode of a non-string");
      auto b = std::make_shared<PickleValue>();
      b->kind = PickleValue::Kind::kBytes;
      // latin1: each code point (< 256) of the UTF-8 text is one byte.
      const std::string& s = args[0]->s;
      for (size_t k = 0; k < s.size(); ++k) {
        const auto c = static_cast<uint8_t>(s[k]);
        if (c < 0x80) {
          b->s.push_back(static_cast<char>(c));
        } else if ((c == 0xc2 || c == 0xc3) && k + 1 < s.size()) {
          b->s.push_back(static_cast<char>(((c & 0x03) << 6) | (static_cast<uint8_t>(s[++k]) & 0x3f)));
        } else {
          return Bad("_codecs.encode of text outside latin1");
        }
      }
      return b;
    }
    if (n == "builtins.set" || n == "builtins.frozenset" || n == "__builtin__.set") {
      if (args.empty()) return Container(PickleValue::Kind::kSet, {});
      if (args[0]->kind != PickleValue::Kind::kList && args[0]->kind != PickleValue::Kind::kTuple) return Bad("set of a " + args[0]->TypeName());
      return Container(PickleValue::Kind::kSet, args[0]->items);
    }
    if (n == "builtins.bytearray") {
      auto b = std::make_shared<PickleValue>();
      b->kind = PickleValue::Kind::kBytes;
      if (!args.empty() && args[0]->kind == PickleValue::Kind::kBytes) b->s = args[0]->s;
      return b;
    }
    if (n == "copyreg._reconstructor") {
      if (args.empty() || args[0]->kind != PickleValue::Kind::kGlobal) return Bad("_reconstructor of a non-class");
      if (limits_.strict_globals && !IsKnownGlobal(args[0]->s)) return Bad("REDUCE of unknown callable " + args[0]->s + ": refused (strict)");
      auto o = std::make_shared<PickleValue>();
      o->kind = PickleValue::Kind::kObject;
      o->s = args[0]->s;
      return o;
    }
    if (limits_.strict_globals && !IsKnownGlobal(n)) return Bad(std::string(newobj ? "NEWOBJ" : "REDUCE") + " of unknown callable " + n + ": refused (strict)");
    MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr o, Container(PickleValue::Kind::kObject, std::move(args)));
    o->s = n;
    return o;
  }

  Status Build(const PickleValuePtr& state) {
    MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr target, Pop());
    const PickleValue* dict = state.get();
    if (dict->kind == PickleValue::Kind::kTuple && dict->items.size() == 2) dict = dict->items[0].get();  // (dict, slots)
    if (target->kind == PickleValue::Kind::kObject && target->s != kStorageObject) {
      MEMENTO_RETURN_IF_ERROR(Mutable(*target, PickleValue::Kind::kObject, "BUILD"));
      if (dict->kind == PickleValue::Kind::kDict) {
        for (const auto& [k, v] : dict->entries) MEMENTO_RETURN_IF_ERROR(SetItem(target.get(), k, v));
      } else if (!dict->is_none()) {
        MEMENTO_RETURN_IF_ERROR(Place(target.get(), state));
        target->entries.emplace_back(PyStr("__state__"), state);
      }
    } else if (!(dict->is_none() || (dict->kind == PickleValue::Kind::kDict && (dict->entries.empty() || target->kind == PickleValue::Kind::kTensor)))) {
      return Bad("BUILD of " + An(*target) + " with " + An(*state));
    }
    return Push(std::move(target));
  }

  Status Step(uint8_t op) {
    using K = PickleValue::Kind;
    switch (op) {
      case 0x80: {  // PROTO
        MEMENTO_ASSIGN_OR_RETURN(uint64_t p, ReadLE(1));
        if (p > 5) return Bad("pickle protocol " + std::to_string(p));
        return Status::Ok();
      }
      case 0x95:  // FRAME: a hint only
        return ReadLE(8).status();
      case '(':
        marks_.push_back(stack_.size());
        return Status::Ok();
      case '0':
        return Pop().status();
      case '1':
        return PopMark().status();
      case '2': {
        if (stack_.empty()) return Bad("DUP of an empty stack");
        return Push(stack_.back());
      }
      case 'N':
        return Push(PyNone());
      case 0x88:
        return Push(PyBool(true));
      case 0x89:
        return Push(PyBool(false));
      case 'J': {
        MEMENTO_ASSIGN_OR_RETURN(uint64_t v, ReadLE(4));
        return Push(PyInt(static_cast<int32_t>(static_cast<uint32_t>(v))));
      }
      case 'K': {
        MEMENTO_ASSIGN_OR_RETURN(uint64_t v, ReadLE(1));
        return Push(PyInt(static_cast<int64_t>(v)));
      }
      case 'M': {
        MEMENTO_ASSIGN_OR_RETURN(uint64_t v, ReadLE(2));
        return Push(PyInt(static_cast<int64_t>(v)));
      }
      case 0x8a:
      case 0x8b: {  // LONG1, LONG4: little-endian two's complement
        MEMENTO_ASSIGN_OR_RETURN(uint64_t n, ReadLE(op == 0x8a ? 1 : 4));
        if (n > 8) return Bad("integer of " + std::to_string(n) + " bytes does not fit 64 bits");
        MEMENTO_ASSIGN_OR_RETURN(uint64_t v, ReadLE(static_cast<int>(n)));
        if (n > 0 && n < 8 && (v >> (8 * n - 1)) != 0) v |= ~uint64_t{0} << (8 * n);
        return Push(PyInt(static_cast<int64_t>(v)));
      }
      case 'I': {  // INT, text (protocol 0)
        MEMENTO_ASSIGN_OR_RETURN(std::string line, ReadLine());
        if (line == "01") return Push(PyBool(true));
        if (line == "00") return Push(PyBool(false));
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(line.c_str(), &end, 10);
        if (line.empty() || *end != '\0' || errno != 0) return Bad("malformed INT");
        return Push(PyInt(v));
      }
      case 'G': {
        MEMENTO_ASSIGN_OR_RETURN(std::string b, ReadBytes(8));
        uint64_t bits = 0;
        for (char c : b) bits = (bits << 8) | static_cast<uint8_t>(c);
        double d;
        std::memcpy(&d, &bits, sizeof(d));
        return Push(PyFloat(d));
      }
      case 'X':
      case 0x8c:
      case 0x8d:
      case 'T':
      case 'U':
      case 'B':
      case 'C':
      case 0x8e:
      case 0x96: {
        const bool text = op == 'X' || op == 0x8c || op == 0x8d || op == 'T' || op == 'U';
        const int width = (op == 0x8c || op == 'U' || op == 'C') ? 1 : (op == 0x8d || op == 0x8e || op == 0x96) ? 8 : 4;
        MEMENTO_ASSIGN_OR_RETURN(uint64_t n, ReadLE(width));
        MEMENTO_ASSIGN_OR_RETURN(std::string s, ReadBytes(n));
        // Python decodes these as UTF-8 and fails otherwise; names must be, for the manifests.
        if (text && !IsUtf8(s)) return Bad("a str that is not UTF-8");
        auto v = std::make_shared<PickleValue>();
        v->kind = text ? K::kString : K::kBytes;
        v->s = std::move(s);
        return Push(std::move(v));
      }
      case '}':
        return Push(PyDict(false));
      case ']':
        return Push(PyList());
      case ')':
        return Push(PyTuple());
      case 0x8f: {
        auto v = std::make_shared<PickleValue>();
        v->kind = K::kSet;
        return Push(std::move(v));
      }
      case 't':
      case 'l':
      case 0x91: {
        MEMENTO_ASSIGN_OR_RETURN(std::vector<PickleValuePtr> items, PopMark());
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr v, Container(op == 't' ? K::kTuple : op == 'l' ? K::kList : K::kSet, std::move(items)));
        return Push(std::move(v));
      }
      case 0x85:
      case 0x86:
      case 0x87: {
        std::vector<PickleValuePtr> items(static_cast<size_t>(op - 0x84));
        for (size_t k = items.size(); k-- > 0;) {
          MEMENTO_ASSIGN_OR_RETURN(items[k], Pop());
        }
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr v, Container(K::kTuple, std::move(items)));
        return Push(std::move(v));
      }
      case 'd': {
        MEMENTO_ASSIGN_OR_RETURN(std::vector<PickleValuePtr> items, PopMark());
        if (items.size() % 2 != 0) return Bad("DICT with an odd number of items");
        PickleValuePtr d = PyDict(false);
        for (size_t k = 0; k < items.size(); k += 2) MEMENTO_RETURN_IF_ERROR(SetItem(d.get(), items[k], items[k + 1]));
        return Push(std::move(d));
      }
      case 'a': {
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr item, Pop());
        if (stack_.empty()) return Bad("APPEND without a list");
        PickleValue* list = stack_.back().get();
        MEMENTO_RETURN_IF_ERROR(Mutable(*list, K::kList, "APPEND"));
        MEMENTO_RETURN_IF_ERROR(Place(list, item));
        list->items.push_back(std::move(item));
        return Status::Ok();
      }
      case 'e':
      case 0x90: {
        MEMENTO_ASSIGN_OR_RETURN(std::vector<PickleValuePtr> items, PopMark());
        if (stack_.empty()) return Bad("APPENDS without a list");
        PickleValue* list = stack_.back().get();
        MEMENTO_RETURN_IF_ERROR(Mutable(*list, op == 'e' ? K::kList : K::kSet, op == 'e' ? "APPENDS" : "ADDITEMS"));
        for (PickleValuePtr& item : items) {
          MEMENTO_RETURN_IF_ERROR(Place(list, item));
          list->items.push_back(std::move(item));
        }
        return Status::Ok();
      }
      case 's': {
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr value, Pop());
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr key, Pop());
        if (stack_.empty()) return Bad("SETITEM without a dict");
        MEMENTO_RETURN_IF_ERROR(Mutable(*stack_.back(), K::kDict, "SETITEM"));
        return SetItem(stack_.back().get(), std::move(key), std::move(value));
      }
      case 'u': {
        MEMENTO_ASSIGN_OR_RETURN(std::vector<PickleValuePtr> items, PopMark());
        if (stack_.empty()) return Bad("SETITEMS without a dict");
        if (items.size() % 2 != 0) return Bad("SETITEMS with an odd number of items");
        MEMENTO_RETURN_IF_ERROR(Mutable(*stack_.back(), K::kDict, "SETITEMS"));
        for (size_t k = 0; k < items.size(); k += 2) {
          MEMENTO_RETURN_IF_ERROR(SetItem(stack_.back().get(), items[k], items[k + 1]));
        }
        return Status::Ok();
      }
      case 'q':
      case 'r':
      case 'p':
      case 0x94: {
        uint64_t index = memo_.size();
        if (op == 'q' || op == 'r') {
          MEMENTO_ASSIGN_OR_RETURN(index, ReadLE(op == 'q' ? 1 : 4));
        } else if (op == 'p') {
          MEMENTO_ASSIGN_OR_RETURN(std::string line, ReadLine());
          index = std::strtoull(line.c_str(), nullptr, 10);
        }
        if (stack_.empty()) return Bad("PUT of an empty stack");
        memo_[index] = stack_.back();
        return Status::Ok();
      }
      case 'h':
      case 'j':
      case 'g': {
        uint64_t index = 0;
        if (op == 'g') {
          MEMENTO_ASSIGN_OR_RETURN(std::string line, ReadLine());
          index = std::strtoull(line.c_str(), nullptr, 10);
        } else {
          MEMENTO_ASSIGN_OR_RETURN(index, ReadLE(op == 'h' ? 1 : 4));
        }
        auto it = memo_.find(index);
        if (it == memo_.end()) return Bad("GET of memo " + std::to_string(index) + ", never PUT");
        return Push(it->second);
      }
      case 'c': {
        MEMENTO_ASSIGN_OR_RETURN(std::string module, ReadLine());
        MEMENTO_ASSIGN_OR_RETURN(std::string name, ReadLine());
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr g, Global(module, name));
        return Push(std::move(g));
      }
      case 0x93: {
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr name, Pop());
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr module, Pop());
        if (name->kind != K::kString || module->kind != K::kString) return Bad("STACK_GLOBAL of non-strings");
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr g, Global(module->s, name->s));
        return Push(std::move(g));
      }
      case 'R':
      case 0x81:
      case 0x92: {
        PickleValuePtr kwargs;
        if (op == 0x92) {
          MEMENTO_ASSIGN_OR_RETURN(kwargs, Pop());
        }
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr args, Pop());
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr callable, Pop());
        if (args->kind != K::kTuple) return Bad("call with arguments in " + An(*args));
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr v, Call(callable, args->items, op != 'R'));
        return Push(std::move(v));
      }
      case 'b': {
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr state, Pop());
        return Build(state);
      }
      case 'Q': {  // BINPERSID: ('storage', torch.<T>Storage, key, location, numel)
        MEMENTO_ASSIGN_OR_RETURN(PickleValuePtr pid, Pop());
        const auto& it = pid->items;
        if (pid->kind != K::kTuple || it.size() != 5 || it[0]->kind != K::kString || it[0]->s != "storage") {
          return Bad("persistent id is not a ('storage', type, key, location, numel) tuple");
        }
        if (it[1]->kind != K::kGlobal || it[1]->s.substr(0, 6) != "torch.") return Bad("persistent storage of type " + it[1]->TypeName());
        const DType dtype = DTypeFromTorchStorage(std::string_view(it[1]->s).substr(6));
        if (dtype == DType::kInvalid) return Bad("unsupported storage type " + it[1]->s);
        if (it[2]->kind != K::kString || it[3]->kind != K::kString || it[4]->kind != K::kInt || it[4]->i < 0) {
          return Bad("malformed persistent storage id");
        }
        auto v = std::make_shared<PickleValue>();
        v->kind = K::kObject;
        v->s = std::string(kStorageObject);
        v->i = static_cast<int64_t>(dtype);
        v->items = {it[2], it[3], it[4]};
        return Push(std::move(v));
      }
      default:
        break;
    }
    char hex[8];
    std::snprintf(hex, sizeof(hex), "0x%02x", op);
    return Bad(std::string("unsupported opcode ") + hex);
  }

  std::string_view data_;
  PickleLimits limits_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  std::vector<PickleValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleValuePtr> memo_;
  std::unordered_map<const PickleValue*, std::unordered_map<std::string, size_t>> dict_index_;
};

// Pickle writer, protocol 2.
class Writer {
 public:
  // Counts how often each container is reached, so that Write knows which ones are shared.
  void CountShared(const PickleValue& v, int depth) {
    using K = PickleValue::Kind;
    if (depth > 200 || (v.kind != K::kList && v.kind != K::kTuple && v.kind != K::kDict && v.kind != K::kObject)) return;
    if (++refs_[&v] > 1) return;  // its parts were counted on the first visit
    for (const PickleValuePtr& item : v.items) CountShared(*item, depth + 1);
    for (const auto& [k, x] : v.entries) {
      CountShared(*k, depth + 1);
      CountShared(*x, depth + 1);
    }
  }
  // A container reached more than once (a pickle's memo can share one container 2^n times through
  // n levels) is written once and then fetched from the pickle's memo (BINPUT, BINGET), as
  // Python's pickler does: the output is as large as the value, not as its expansion. Values
  // without sharing are written exactly as before.
  Status Write(const PickleValue& v, int depth) {
    auto refs = refs_.find(&v);
    if (refs == refs_.end() || refs->second < 2) return WriteValue(v, depth);
    if (auto m = memo_.find(&v); m != memo_.end()) {
      MemoOp('h', 'j', m->second);  // BINGET, LONG_BINGET
      return Status::Ok();
    }
    MEMENTO_RETURN_IF_ERROR(WriteValue(v, depth));
    const auto index = static_cast<uint32_t>(memo_.size());
    memo_[&v] = index;
    MemoOp('q', 'r', index);  // BINPUT, LONG_BINPUT
    return Status::Ok();
  }
  std::string Finish() { return std::string("\x80\x02", 2) + out_ + "."; }

 private:
  Status WriteValue(const PickleValue& v, int depth) {
    using K = PickleValue::Kind;
    if (depth > 200) return InvalidArgument("value nested deeper than 200 levels");
    switch (v.kind) {
      case K::kNone:
        out_ += 'N';
        return Status::Ok();
      case K::kBool:
        out_ += static_cast<char>(v.b ? 0x88 : 0x89);
        return Status::Ok();
      case K::kInt:
        Int(v.i);
        return Status::Ok();
      case K::kFloat: {
        uint64_t bits;
        std::memcpy(&bits, &v.f, sizeof(bits));
        out_ += 'G';
        for (int k = 7; k >= 0; --k) out_ += static_cast<char>((bits >> (8 * k)) & 0xff);
        return Status::Ok();
      }
      case K::kString:
        Str(v.s);
        return Status::Ok();
      case K::kList:
        out_ += ']';
        if (!v.items.empty()) {
          out_ += '(';
          for (const PickleValuePtr& item : v.items) MEMENTO_RETURN_IF_ERROR(Write(*item, depth + 1));
          out_ += 'e';
        }
        return Status::Ok();
      case K::kTuple:
        out_ += '(';
        for (const PickleValuePtr& item : v.items) MEMENTO_RETURN_IF_ERROR(Write(*item, depth + 1));
        out_ += 't';
        return Status::Ok();
      case K::kDict:
        if (v.ordered) {
          out_ += "ccollections\nOrderedDict\n)R";
        } else {
          out_ += '}';
        }
        return WriteItems(v, depth);
      case K::kTensor:
        return Tensor(v.tensor);
      case K::kObject:
        if (IsWritableDataclass(v)) return Dataclass(v, depth);
        return InvalidArgument("cannot write " + An(v) + " into a torch file");
      default:
        return InvalidArgument("cannot write " + An(v) + " into a torch file");
    }
  }
  void MemoOp(char op, char long_op, uint32_t index) {
    if (index < 256) {
      out_ += op;
      out_ += static_cast<char>(index);
      return;
    }
    out_ += long_op;
    for (int k = 0; k < 4; ++k) out_ += static_cast<char>((index >> (8 * k)) & 0xff);
  }
  void Int(int64_t i) {
    if (i >= 0 && i < 256) {
      out_ += 'K';
      out_ += static_cast<char>(i);
    } else if (i >= 0 && i < 65536) {
      out_ += 'M';
      out_ += static_cast<char>(i & 0xff);
      out_ += static_cast<char>(i >> 8);
    } else if (i >= std::numeric_limits<int32_t>::min() && i <= std::numeric_limits<int32_t>::max()) {
      out_ += 'J';
      const auto u = static_cast<uint32_t>(static_cast<int32_t>(i));
      for (int k = 0; k < 4; ++k) out_ += static_cast<char>((u >> (8 * k)) & 0xff);
    } else {
      out_ += static_cast<char>(0x8a);
      out_ += static_cast<char>(8);
      const auto u = static_cast<uint64_t>(i);
      for (int k = 0; k < 8; ++k) out_ += static_cast<char>((u >> (8 * k)) & 0xff);
    }
  }
  void Str(const std::string& s) {
    out_ += 'X';
    const auto n = static_cast<uint32_t>(s.size());
    for (int k = 0; k < 4; ++k) out_ += static_cast<char>((n >> (8 * k)) & 0xff);
    out_ += s;
  }
  // DeepSpeed's dataclasses, as Python's pickler writes an instance of a plain class at protocol 2:
  // the class (GLOBAL), cls.__new__(cls) (EMPTY_TUPLE, NEWOBJ), then its __dict__ (BUILD).
  // The name goes into a GLOBAL line: dotted identifiers only.
  static bool IsWritableDataclass(const PickleValue& v) {
    const bool identifier = std::all_of(v.s.begin(), v.s.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_' || c == '.';
    });
    return identifier && v.items.empty() &&
           (IsDeepSpeedClass(v.s, "SubparamShape") || IsDeepSpeedClass(v.s, "fragment_address"));
  }
  // A dict's key/value pairs after its empty dict is on the stack: MARK, the pairs, SETITEMS.
  Status WriteItems(const PickleValue& v, int depth) {
    if (v.entries.empty()) return Status::Ok();
    out_ += '(';
    for (const auto& [k, x] : v.entries) {
      MEMENTO_RETURN_IF_ERROR(Write(*k, depth + 1));
      MEMENTO_RETURN_IF_ERROR(Write(*x, depth + 1));
    }
    out_ += 'u';
    return Status::Ok();
  }
  Status Dataclass(const PickleValue& v, int depth) {
    const size_t dot = v.s.rfind('.');
    out_ += 'c' + v.s.substr(0, dot) + '\n' + v.s.substr(dot + 1) + '\n';
    out_ += ')';
    out_ += static_cast<char>(0x81);
    out_ += '}';
    MEMENTO_RETURN_IF_ERROR(WriteItems(v, depth));
    out_ += 'b';
    return Status::Ok();
  }
  Status Tensor(const TorchTensorRef& t) {
    const std::string_view storage = TorchStorageName(t.dtype);
    if (storage.empty()) return InvalidArgument("tensor of dtype " + std::string(DTypeName(t.dtype)) + " has no torch storage type");
    out_ += "ctorch._utils\n_rebuild_tensor_v2\n(";
    // The persistent id ('storage', torch.<T>Storage, key, location, numel).
    out_ += '(';
    Str("storage");
    out_ += "ctorch\n" + std::string(storage) + "\n";
    Str(t.storage_key);
    Str(t.location.empty() ? "cpu" : t.location);
    Int(t.storage_numel);
    out_ += "tQ";
    Int(t.storage_offset);
    out_ += '(';
    for (int64_t d : t.size) Int(d);
    out_ += "t(";
    for (int64_t d : t.stride) Int(d);
    out_ += 't';
    out_ += static_cast<char>(0x89);  // requires_grad False
    out_ += "ccollections\nOrderedDict\n)R";  // backward hooks
    out_ += "tR";
    return Status::Ok();
  }

  std::string out_;
  std::unordered_map<const PickleValue*, int> refs_;         // containers: times reached
  std::unordered_map<const PickleValue*, uint32_t> memo_;    // shared containers written: memo index
};

}  // namespace

int64_t TorchTensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : size) n *= d;
  return n;
}

bool TorchTensorRef::contiguous() const {
  int64_t expected = 1;
  for (size_t d = size.size(); d-- > 0;) {
    if (size[d] != 1 && stride[d] != expected) return false;
    expected *= size[d];
  }
  return true;
}

const PickleValue* PickleValue::Get(std::string_view key) const {
  if (kind != Kind::kDict && kind != Kind::kObject) return nullptr;
  for (const auto& [k, v] : entries) {
    if (k->kind == Kind::kString && k->s == key) return v.get();
  }
  return nullptr;
}

const PickleValue* PickleValue::Field(std::string_view key, size_t index) const {
  if (const PickleValue* v = Get(key)) return v;
  if (kind == Kind::kObject && index < items.size()) return items[index].get();
  return nullptr;
}

std::string PickleValue::TypeName() const {
  switch (kind) {
    case Kind::kNone: return "None";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kString: return "str";
    case Kind::kBytes: return "bytes";
    case Kind::kList: return "list";
    case Kind::kTuple: return "tuple";
    case Kind::kSet: return "set";
    case Kind::kDict: return ordered ? "OrderedDict" : "dict";
    case Kind::kTensor: return "tensor";
    case Kind::kGlobal: return "global " + s;
    case Kind::kObject: return s == kStorageObject ? "storage" : "object of unknown callable " + s;
  }
  return "value";
}

Result<PickleValuePtr> Unpickle(std::string_view data, const PickleLimits& limits) {
  return Machine(data, limits).Run();
}

Result<std::string> PickleForTorch(const PickleValue& value) {
  Writer w;
  w.CountShared(value, 0);
  MEMENTO_RETURN_IF_ERROR(w.Write(value, 0));
  return w.Finish();
}

PickleValuePtr PyNone() { return std::make_shared<PickleValue>(); }
PickleValuePtr PyBool(bool v) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kBool;
  p->b = v;
  return p;
}
PickleValuePtr PyInt(int64_t v) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kInt;
  p->i = v;
  return p;
}
PickleValuePtr PyFloat(double v) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kFloat;
  p->f = v;
  return p;
}
PickleValuePtr PyStr(std::string v) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kString;
  p->s = std::move(v);
  return p;
}
PickleValuePtr PyList(std::vector<PickleValuePtr> items) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kList;
  p->items = std::move(items);
  return p;
}
PickleValuePtr PyTuple(std::vector<PickleValuePtr> items) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kTuple;
  p->items = std::move(items);
  return p;
}
PickleValuePtr PyDict(bool ordered) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kDict;
  p->ordered = ordered;
  return p;
}
PickleValuePtr PyTensor(TorchTensorRef t) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kTensor;
  p->tensor = std::move(t);
  return p;
}
PickleValuePtr PyDataclass(std::string global_name) {
  auto p = std::make_shared<PickleValue>();
  p->kind = PickleValue::Kind::kObject;
  p->s = std::move(global_name);
  return p;
}
void DictSet(PickleValue* dict, const std::string& key, PickleValuePtr value) {
  dict->entries.emplace_back(PyStr(key), std::move(value));
}

std::string_view TorchStorageName(DType dtype) {
  for (const StorageName& s : kStorages) {
    if (s.dtype == dtype) return s.name;
  }
  return {};
}

DType DTypeFromTorchStorage(std::string_view name) {
  for (const StorageName& s : kStorages) {
    if (s.name == name) return s.dtype;
  }
  return DType::kInvalid;
}

}  // namespace memento
