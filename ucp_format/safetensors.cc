// safetensors: header serialization and a strict reader (a small JSON parser for the header only).
#include "ucp_format/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <utility>

#include "core/shard.h"
#include "core/utf8.h"

namespace memento {
namespace {

constexpr uint64_t kDataAlignment = 4096;
// The reference implementation refuses headers over 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// The JSON subset of a safetensors header: objects, arrays, strings, non-negative integers.
struct JsonValue {
  // Declared here, defined below where JsonValue is complete: a pair holding JsonValue needs that
  // (clang with libstdc++ checks it when the members' destructors are instantiated).
  JsonValue();
  JsonValue(const JsonValue&);
  JsonValue(JsonValue&&) noexcept;
  JsonValue& operator=(const JsonValue&);
  JsonValue& operator=(JsonValue&&) noexcept;
  ~JsonValue();

  enum class Kind { kObject, kArray, kString, kNumber } kind = Kind::kNumber;
  std::vector<std::pair<std::string, JsonValue>> members;  // kObject, in file order
  std::vector<JsonValue> items;                            // kArray
  std::string text;                                        // kString
  uint64_t number = 0;                                     // kNumber
};
JsonValue::JsonValue() = default;
JsonValue::JsonValue(const JsonValue&) = default;
JsonValue::JsonValue(JsonValue&&) noexcept = default;
JsonValue& JsonValue::operator=(const JsonValue&) = default;
JsonValue& JsonValue::operator=(JsonValue&&) noexcept = default;
JsonValue::~JsonValue() = default;

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}

  Status Parse(JsonValue* out) {
    MEMENTO_RETURN_IF_ERROR(Value(out, 0));
    SkipSpace();
    if (pos_ != s_.size()) return Error("trailing characters");
    return Status::Ok();
  }

 private:
  Status Error(const std::string& what) const {
    return DataLoss("malformed header JSON at byte " + std::to_string(pos_) + ": " + what);
  }
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  Status Value(JsonValue* out, int depth) {
    if (depth > 8) return Error("nested too deeply");
    SkipSpace();
    if (pos_ >= s_.size()) return Error("unexpected end");
    const char c = s_[pos_];
    if (c == '{') {
      out->kind = JsonValue::Kind::kObject;
      ++pos_;
      SkipSpace();
      if (pos_ < s_.size() && s_[pos_] == '}') {
        ++pos_;
        return Status::Ok();
      }
      while (true) {
        SkipSpace();
        std::string key;
        MEMENTO_RETURN_IF_ERROR(String(&key));
        SkipSpace();
        if (pos_ >= s_.size() || s_[pos_] != ':') return Error("expected ':'");
        ++pos_;
        JsonValue v;
        MEMENTO_RETURN_IF_ERROR(Value(&v, depth + 1));
        out->members.emplace_back(std::move(key), std::move(v));
        SkipSpace();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == '}') {
          ++pos_;
          return Status::Ok();
        }
        return Error("expected ',' or '}'");
      }
    }
    if (c == '[') {
      out->kind = JsonValue::Kind::kArray;
      ++pos_;
      SkipSpace();
      if (pos_ < s_.size() && s_[pos_] == ']') {
        ++pos_;
        return Status::Ok();
      }
      while (true) {
        JsonValue v;
        MEMENTO_RETURN_IF_ERROR(Value(&v, depth + 1));
        out->items.push_back(std::move(v));
        SkipSpace();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == ']') {
          ++pos_;
          return Status::Ok();
        }
        return Error("expected ',' or ']'");
      }
    }
    if (c == '"') {
      out->kind = JsonValue::Kind::kString;
      return String(&out->text);
    }
    if (c >= '0' && c <= '9') {
      out->kind = JsonValue::Kind::kNumber;
      uint64_t v = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
        const uint64_t digit = static_cast<uint64_t>(s_[pos_] - '0');
        if (v > (UINT64_MAX - digit) / 10) return Error("integer overflow");
        v = v * 10 + digit;
        ++pos_;
      }
      out->number = v;
      return Status::Ok();
    }
    return Error(std::string("unexpected character '") + c + "'");
  }
  Status String(std::string* out) {
    if (pos_ >= s_.size() || s_[pos_] != '"') return Error("expected a string");
    ++pos_;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= s_.size()) return Error("unterminated escape");
      c = s_[pos_++];
      switch (c) {
        case '"': case '\\': case '/': out->push_back(c); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'u': {
          if (pos_ + 4 > s_.size()) return Error("short \\u escape");
          unsigned cp = 0;
          for (int i = 0; i < 4; ++i) {
            const char h = s_[pos_++];
            cp <<= 4;
            if (h >= '0' && h <= '9') cp |= static_cast<unsigned>(h - '0');
            else if (h >= 'a' && h <= 'f') cp |= static_cast<unsigned>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') cp |= static_cast<unsigned>(h - 'A' + 10);
            else return Error("bad \\u escape");
          }
          // UTF-8 of a BMP code point (surrogate pairs are not expected in tensor names).
          if (cp < 0x80) {
            out->push_back(static_cast<char>(cp));
          } else if (cp < 0x800) {
            out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
            out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
          } else {
            out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
            out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
            out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
          }
          break;
        }
        default: return Error("bad escape");
      }
    }
    if (pos_ >= s_.size()) return Error("unterminated string");
    ++pos_;
    // JSON text is UTF-8 (the reference reader refuses other bytes); keys become Protobuf strings.
    if (!IsUtf8(*out)) return Error("a string that is not UTF-8");
    return Status::Ok();
  }

  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace

Status SafetensorsHeader::Add(const std::string& key, DType dtype, const std::vector<int64_t>& shape) {
  if (key.empty() || key == "__metadata__") return InvalidArgument("safetensors key '" + key + "' is not allowed");
  for (const SafetensorsEntry& e : entries_) {
    if (e.key == key) return InvalidArgument("safetensors key '" + key + "' added twice");
  }
  if (DTypeSize(dtype) == 0) return InvalidArgument("safetensors key '" + key + "': invalid dtype");
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgument("safetensors key '" + key + "': negative dim in " + ShapeString(shape));
  }
  SafetensorsEntry e;
  e.key = key;
  e.dtype = dtype;
  e.shape = shape;
  e.begin = data_bytes_;
  e.end = data_bytes_ + static_cast<uint64_t>(NumElements(shape)) * DTypeSize(dtype);
  data_bytes_ = e.end;
  entries_.push_back(std::move(e));
  return Status::Ok();
}

std::string SafetensorsHeader::Serialize() const {
  std::string json = "{";
  bool first = true;
  if (!metadata_.empty()) {
    json += "\"__metadata__\":{";
    for (const auto& [k, v] : metadata_) {
      if (!first) json += ",";
      first = false;
      json += JsonString(k) + ":" + JsonString(v);
    }
    json += "}";
  }
  for (const SafetensorsEntry& e : entries_) {
    if (json.size() > 1) json += ",";
    json += JsonString(e.key) + ":{\"dtype\":\"" + std::string(DTypeName(e.dtype)) + "\",\"shape\":[";
    for (size_t i = 0; i < e.shape.size(); ++i) json += (i ? "," : "") + std::to_string(e.shape[i]);
    json += "],\"data_offsets\":[" + std::to_string(e.begin) + "," + std::to_string(e.end) + "]}";
  }
  json += "}";
  const uint64_t unpadded = 8 + json.size();
  const uint64_t padded = (unpadded + kDataAlignment - 1) / kDataAlignment * kDataAlignment;
  json.append(static_cast<size_t>(padded - unpadded), ' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + json;
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(FileSystem* fs, const std::string& path) {
  auto out = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  out->path_ = path;
  MEMENTO_ASSIGN_OR_RETURN(out->file_, fs->NewReadableFile(path));
  const uint64_t size = out->file_->size();
  if (size < 8) return DataLoss(path + ": " + std::to_string(size) + " bytes, too short for a safetensors header");
  uint8_t len_bytes[8];
  MEMENTO_RETURN_IF_ERROR(out->file_->ReadAt(0, len_bytes, 8));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kMaxHeaderBytes || n > size - 8) {
    return DataLoss(path + ": header length " + std::to_string(n) + " exceeds the file's " + std::to_string(size) +
                    " bytes (truncated or not a safetensors file)");
  }
  std::string header(static_cast<size_t>(n), '\0');
  MEMENTO_RETURN_IF_ERROR(out->file_->ReadAt(8, header.data(), header.size()));
  JsonValue root;
  Status parsed = JsonParser(header).Parse(&root);
  if (!parsed.ok()) return parsed.WithContext(path);
  if (root.kind != JsonValue::Kind::kObject) return DataLoss(path + ": the header is not a JSON object");
  out->data_start_ = 8 + n;
  for (auto& [key, v] : root.members) {
    const std::string what = path + ": tensor '" + key + "'";
    if (key == "__metadata__") {
      if (v.kind != JsonValue::Kind::kObject) return DataLoss(path + ": __metadata__ is not an object");
      for (auto& [mk, mv] : v.members) {
        if (mv.kind != JsonValue::Kind::kString) return DataLoss(path + ": __metadata__ '" + mk + "' is not a string");
        out->metadata_[mk] = mv.text;
      }
      continue;
    }
    if (v.kind != JsonValue::Kind::kObject) return DataLoss(what + " is not an object");
    SafetensorsEntry e;
    e.key = key;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    for (auto& [f, fv] : v.members) {
      if (f == "dtype" && fv.kind == JsonValue::Kind::kString) {
        Result<DType> d = ParseDType(fv.text);
        if (!d.ok()) return DataLoss(what + ": unknown dtype '" + fv.text + "'");
        e.dtype = *d;
        has_dtype = true;
      } else if (f == "shape" && fv.kind == JsonValue::Kind::kArray) {
        for (const JsonValue& d : fv.items) {
          if (d.kind != JsonValue::Kind::kNumber || d.number > (uint64_t{1} << 62)) {
            return DataLoss(what + ": bad shape");
          }
          e.shape.push_back(static_cast<int64_t>(d.number));
        }
        has_shape = true;
      } else if (f == "data_offsets" && fv.kind == JsonValue::Kind::kArray && fv.items.size() == 2 &&
                 fv.items[0].kind == JsonValue::Kind::kNumber && fv.items[1].kind == JsonValue::Kind::kNumber) {
        e.begin = fv.items[0].number;
        e.end = fv.items[1].number;
        has_offsets = true;
      } else {
        return DataLoss(what + ": unexpected or malformed field '" + f + "'");
      }
    }
    if (!has_dtype || !has_shape || !has_offsets) return DataLoss(what + ": needs dtype, shape and data_offsets");
    if (e.end < e.begin) return DataLoss(what + ": data_offsets end before they begin");
    // Every partial product fits, so that readers may take NumElements of the shape.
    int64_t numel = 1;
    uint64_t want = 0;
    for (int64_t d : e.shape) {
      if (__builtin_mul_overflow(numel, d, &numel)) {
        return DataLoss(what + ": shape " + ShapeString(e.shape) + " has more elements than int64 can count");
      }
    }
    if (__builtin_mul_overflow(static_cast<uint64_t>(numel), DTypeSize(e.dtype), &want)) {
      return DataLoss(what + ": shape " + ShapeString(e.shape) + " of " + std::string(DTypeName(e.dtype)) +
                      " has more bytes than 64 bits can count");
    }
    if (e.end - e.begin != want) {
      return DataLoss(what + ": data_offsets span " + std::to_string(e.end - e.begin) + " bytes, " +
                      ShapeString(e.shape) + " of " + std::string(DTypeName(e.dtype)) + " needs " + std::to_string(want));
    }
    out->entries_.push_back(std::move(e));
  }
  std::set<std::string> keys;
  for (const SafetensorsEntry& e : out->entries_) {
    if (!keys.insert(e.key).second) return DataLoss(path + ": tensor '" + e.key + "' appears twice");
  }
  // The tensors must tile the data buffer: no hole, no overlap.
  std::vector<const SafetensorsEntry*> sorted;
  for (const SafetensorsEntry& e : out->entries_) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return std::pair(a->begin, a->end) < std::pair(b->begin, b->end); });
  uint64_t at = 0;
  for (const SafetensorsEntry* e : sorted) {
    if (e->begin != at) {
      return DataLoss(path + ": tensor '" + e->key + "' starts at " + std::to_string(e->begin) + ", expected " +
                      std::to_string(at) + " (a hole or an overlap in the data buffer)");
    }
    at = e->end;
  }
  if (out->data_start_ + at != size) {
    return DataLoss(path + ": the header describes " + std::to_string(out->data_start_ + at) + " bytes, the file has " +
                    std::to_string(size) + (size < out->data_start_ + at ? " (truncated)" : ""));
  }
  return out;
}

Result<const SafetensorsEntry*> SafetensorsFile::Find(const std::string& key) const {
  for (const SafetensorsEntry& e : entries_) {
    if (e.key == key) return &e;
  }
  return NotFound(path_ + ": no tensor '" + key + "'");
}

Result<std::vector<uint8_t>> SafetensorsFile::Read(const std::string& key) {
  MEMENTO_ASSIGN_OR_RETURN(const SafetensorsEntry* e, Find(key));
  std::vector<uint8_t> out(static_cast<size_t>(e->end - e->begin));
  MEMENTO_RETURN_IF_ERROR(file_->ReadAt(data_start_ + e->begin, out.data(), out.size()));
  return out;
}

}  // namespace memento
