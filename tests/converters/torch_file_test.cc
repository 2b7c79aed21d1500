// Tests of the pickle machine and torch zip files (converters/torch_pickle.h, torch_zip.h): values
// built from pickles written by Python's pickler and by torch.save, round trips of the writer, and
// hostile input refused with its exact message (os.system, unknown callables, deep nesting, huge
// sizes, recursive structures, zip bombs, '..' names, legacy files).
#include <gtest/gtest.h>
#ifdef MEMENTO_TEST_HAVE_ZLIB
#include <zlib.h>
#endif

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "converters/torch_pickle.h"
#include "converters/torch_zip.h"
#include "core/file_system.h"

#include "tests/converters/test_util.h"

namespace memento {
namespace {

using test::Slurp;
using test::TestRoot;

using K = PickleValue::Kind;

std::string Fixture(const std::string& name) { return std::string(MEMENTO_SOURCE_DIR) + "/tests/converters/fixtures/" + name; }

std::string Error(std::string_view pickle, const PickleLimits& limits = {}) {
  Result<PickleValuePtr> v = Unpickle(pickle, limits);
  if (v.ok()) return "OK";
  return v.status().ToString();
}
// Literals hold NUL bytes: keep their whole length.
template <size_t N>
std::string Error(const char (&pickle)[N], const PickleLimits& limits = {}) {
  return Error(std::string_view(pickle, N - 1), limits);
}

TEST(PickleTest, PlainValuesFromPythonsPickler) {
  const std::string data = Slurp(Fixture("plain.pkl"));
  ASSERT_FALSE(data.empty());
  Result<PickleValuePtr> root = Unpickle(data);
  ASSERT_TRUE(root.ok()) << root.status().ToString();
  const PickleValue& r = **root;
  ASSERT_EQ(r.kind, K::kDict);
  const PickleValue* ints = r.Get("ints");
  ASSERT_NE(ints, nullptr);
  std::vector<int64_t> got;
  for (const auto& v : ints->items) got.push_back(v->i);
  EXPECT_EQ(got, (std::vector<int64_t>{0, 255, 256, 65535, 65536, -1, -2147483648LL, int64_t{1} << 40, INT64_MIN}));
  EXPECT_EQ(r.Get("f")->f, 2.5);
  EXPECT_EQ(r.Get("s")->s, "h\xc3\xa9llo");
  EXPECT_EQ(r.Get("b")->kind, K::kBytes);
  EXPECT_EQ(r.Get("b")->s, std::string("\x00\xff", 2));
  const PickleValue* t = r.Get("t");
  ASSERT_EQ(t->kind, K::kTuple);
  ASSERT_EQ(t->items.size(), 5u);
  EXPECT_EQ(t->items[1]->s, "x");
  EXPECT_TRUE(t->items[2]->is_none());
  EXPECT_TRUE(t->items[3]->b);
  EXPECT_EQ(t->items[4]->kind, K::kBool);
  const PickleValue* od = r.Get("od");
  ASSERT_EQ(od->kind, K::kDict);
  EXPECT_TRUE(od->ordered);
  ASSERT_EQ(od->entries.size(), 2u);
  EXPECT_EQ(od->entries[0].first->s, "z");
  EXPECT_EQ(od->entries[1].second->i, 2);
  EXPECT_EQ(r.Get("set")->kind, K::kSet);
  EXPECT_EQ(r.Get("set")->items[0]->i, 3);
  const PickleValue* args = r.Get("args");
  EXPECT_EQ(args->TypeName(), "object of unknown callable argparse.Namespace");
  EXPECT_EQ(args->Get("lr")->f, 0.1);
  const PickleValue* frag = r.Get("frag");
  EXPECT_EQ(frag->name(), "deepspeed.utils.tensor_fragment.fragment_address");
  EXPECT_EQ(frag->Field("numel", 0)->i, 12);
  EXPECT_EQ(frag->Field("start", 1)->i, 4);
}

TEST(PickleTest, StrictModeRefusesUnknownGlobals) {
  const std::string data = Slurp(Fixture("plain.pkl"));
  PickleLimits strict;
  strict.strict_globals = true;
  const std::string e = Error(data, strict);
  EXPECT_NE(e.find("imports unknown global argparse.Namespace: refused (strict)"), std::string::npos) << e;
}

TEST(PickleTest, OsSystemIsRefusedAndNotRun) {
  const std::string marker = TestRoot() + "/ran";
  const std::string cmd = "touch " + marker;
  // cos\nsystem\n(X<cmd>tR.  — what `pickle.dumps` of a __reduce__ returning (os.system, (cmd,)) holds.
  std::string p = "\x80\x02" "cos\nsystem\n(X";
  const auto n = static_cast<uint32_t>(cmd.size());
  p += std::string(reinterpret_cast<const char*>(&n), 4) + cmd + "tR.";
  EXPECT_EQ(Error(p), "InvalidArgument: pickle at byte 2: imports os.system, which can run code: refused (nothing was run)");
  EXPECT_FALSE(std::filesystem::exists(marker));
  // posix.system (what os.system pickles as on Linux), builtins.eval through STACK_GLOBAL.
  EXPECT_EQ(Error("cposix\nsystem\n."), "InvalidArgument: pickle at byte 0: imports posix.system, which can run code: refused (nothing was run)");
  const char sg[] = "\x80\x04\x8c\x08" "builtins" "\x8c\x04" "eval" "\x93.";
  EXPECT_EQ(Error(sg), "InvalidArgument: pickle at byte 18: imports builtins.eval, which can run code: refused (nothing was run)");
  EXPECT_EQ(Error("csubprocess\nPopen\n."), "InvalidArgument: pickle at byte 0: imports subprocess.Popen, which can run code: refused (nothing was run)");
}

TEST(PickleTest, UnknownCallableIsOpaqueAndRefusedWhereAValueIsNeeded) {
  // mymod.evil('x') -> an opaque placeholder; nothing is called.
  const char kP[] = "\x80\x02" "cmymod\nevil\nX\x01\x00\x00\x00xq\x00\x85R.";
  const std::string p(kP, sizeof(kP) - 1);
  Result<PickleValuePtr> v = Unpickle(p);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ((*v)->TypeName(), "object of unknown callable mymod.evil");
  PickleLimits strict;
  strict.strict_globals = true;
  EXPECT_EQ(Error(p, strict), "InvalidArgument: pickle at byte 2: imports unknown global mymod.evil: refused (strict)");
  // Where a tensor needs a storage: _rebuild_tensor_v2(mymod.evil(), 0, (1,), (1,)).
  const char kT[] = "\x80\x02" "ctorch._utils\n_rebuild_tensor_v2\n(cmymod\nevil\n)RK\x00K\x01\x85K\x01\x85tR.";
  const std::string t(kT, sizeof(kT) - 1);
  EXPECT_EQ(Error(t), "InvalidArgument: pickle at byte 59: _rebuild_tensor_v2 of an object of unknown callable mymod.evil, not a persistent storage");
  // The writer refuses it too.
  EXPECT_EQ(PickleForTorch(**v).status().ToString(), "InvalidArgument: cannot write an object of unknown callable mymod.evil into a torch file");
}

// DeepSpeed's SubparamShape as its universal files hold it ('sub_param_shape'): written as
// Python's pickler writes a dataclass (GLOBAL, NEWOBJ of (), BUILD of its fields), and read back,
// from our bytes and from Python's. Python 3.11 with a stand-in dataclass of the same module and
// name loads the bytes below to SubparamShape(patterns=['qkv'], shape=((8, 4, 4), 8),
// partition_dim=0), equal to the object pickle.dumps(protocol=2) wrote the second string from.
TEST(PickleTest, SubparamShapeIsWrittenAsPythonWritesIt) {
  PickleValuePtr sp = PyDataclass("deepspeed.checkpoint.universal_checkpoint.SubparamShape");
  DictSet(sp.get(), "patterns", PyList({PyStr("qkv")}));
  DictSet(sp.get(), "shape", PyTuple({PyTuple({PyInt(8), PyInt(4), PyInt(4)}), PyInt(8)}));
  DictSet(sp.get(), "partition_dim", PyInt(0));
  Result<std::string> ours = PickleForTorch(*sp);
  ASSERT_TRUE(ours.ok()) << ours.status().ToString();
  const char kOurs[] =
      "\x80\x02" "cdeepspeed.checkpoint.universal_checkpoint\nSubparamShape\n)\x81}("
      "X\x08\x00\x00\x00patterns](X\x03\x00\x00\x00qkve"
      "X\x05\x00\x00\x00shape((K\x08K\x04K\x04tK\x08t"
      "X\x0d\x00\x00\x00partition_dimK\x00ub.";
  EXPECT_EQ(*ours, std::string(kOurs, sizeof(kOurs) - 1));
  const char kPython[] =
      "\x80\x02" "cdeepspeed.checkpoint.universal_checkpoint\nSubparamShape\nq\x00)\x81q\x01}q\x02("
      "X\x08\x00\x00\x00patternsq\x03]q\x04X\x03\x00\x00\x00qkvq\x05" "a"
      "X\x05\x00\x00\x00shapeq\x06K\x08K\x04K\x04\x87q\x07K\x08\x86q\x08"
      "X\x0d\x00\x00\x00partition_dimq\x09K\x00ub.";
  for (const std::string& bytes : {*ours, std::string(kPython, sizeof(kPython) - 1)}) {
    Result<PickleValuePtr> v = Unpickle(bytes, PickleLimits{.strict_globals = true});
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    const PickleValue& o = **v;
    EXPECT_EQ(o.kind, PickleValue::Kind::kObject);
    EXPECT_EQ(o.name(), "deepspeed.checkpoint.universal_checkpoint.SubparamShape");
    EXPECT_EQ(o.Field("patterns", 0)->items[0]->s, "qkv");
    const PickleValue* shape = o.Field("shape", 1);
    ASSERT_EQ(shape->kind, PickleValue::Kind::kTuple);
    ASSERT_EQ(shape->items[0]->kind, PickleValue::Kind::kTuple);
    EXPECT_EQ(shape->items[0]->items[2]->i, 4);
    EXPECT_EQ(shape->items[1]->i, 8);
    EXPECT_EQ(o.Field("partition_dim", 2)->i, 0);
  }
  // Only DeepSpeed's dataclasses, with no constructor arguments and a plain dotted name.
  EXPECT_EQ(PickleForTorch(*PyDataclass("mymod.SubparamShape")).status().ToString(),
            "InvalidArgument: cannot write an object of unknown callable mymod.SubparamShape into a torch file");
  EXPECT_EQ(PickleForTorch(*PyDataclass("deepspeed.x\nos\nsystem.SubparamShape")).status().ToString(),
            "InvalidArgument: cannot write an object of unknown callable deepspeed.x\nos\nsystem.SubparamShape into a torch file");
}

// A dict freed during the run (popped, or a BUILD state) whose address a new dict takes: the new
// dict's keys are its own (this input used to write past the new dict's entries).
TEST(PickleTest, AFreedDictLeavesNothingToTheNext) {
  const char kP[] = "\x80\x02}(X\x01\x00\x00\x00" "aK\x01u0}(X\x01\x00\x00\x00" "aK\x02X\x01\x00\x00\x00" "bK\x03u.";
  Result<PickleValuePtr> v = Unpickle(std::string_view(kP, sizeof(kP) - 1));
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  ASSERT_EQ((*v)->entries.size(), 2u);
  EXPECT_EQ((*v)->Get("a")->i, 2);
  EXPECT_EQ((*v)->Get("b")->i, 3);
  // Two BUILDs of one object: the second state's 'a' replaces the first's; its dict may reuse the
  // first state's address.
  const char kB[] = "\x80\x02" "cdeepspeed.x\nSubparamShape\n)\x81}(X\x01\x00\x00\x00" "aK\x01ub}(X\x01\x00\x00\x00"
                    "bK\x02X\x01\x00\x00\x00" "aK\x03ub.";
  v = Unpickle(std::string_view(kB, sizeof(kB) - 1));
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  ASSERT_EQ((*v)->entries.size(), 2u);
  EXPECT_EQ((*v)->entries[0].first->s, "a");
  EXPECT_EQ((*v)->entries[0].second->i, 3);
  EXPECT_EQ((*v)->entries[1].first->s, "b");
  EXPECT_EQ((*v)->entries[1].second->i, 2);
}

TEST(PickleTest, DeepNestingIsRefused) {
  std::string p = "\x80\x02";
  for (int k = 0; k < 300; ++k) p += "]";
  for (int k = 0; k < 299; ++k) p += "a";
  p += ".";
  EXPECT_EQ(Error(p), "InvalidArgument: pickle at byte 501: nesting deeper than 200 levels");
  std::string q = "\x80\x02N";
  for (int k = 0; k < 250; ++k) q += "\x85";
  q += ".";
  EXPECT_EQ(Error(q), "InvalidArgument: pickle at byte 202: nesting deeper than 200 levels");
}

TEST(PickleTest, HugeDeclaredSizesAreRefused) {
  EXPECT_EQ(Error("\x80\x02X\xff\xff\xff\xff" "abc."),
            "InvalidArgument: pickle at byte 2: declares 4294967295 bytes but only 4 remain");
  EXPECT_EQ(Error(std::string("\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.", 12)),
            "InvalidArgument: pickle at byte 2: declares 9223372036854775807 bytes but only 1 remain");
  EXPECT_EQ(Error(std::string("\x80\x02\x8a\x09" "123456789.", 14)),
            "InvalidArgument: pickle at byte 2: integer of 9 bytes does not fit 64 bits");
  // A tensor whose view runs past its storage: size (100,), storage of 4 elements.
  const char kT[] =
      "\x80\x02" "ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x00"
      "0X\x03\x00\x00\x00" "cpuK\x04tQK\x00K\x64\x85K\x01\x85tR.";
  const std::string t(kT, sizeof(kT) - 1);
  EXPECT_EQ(Error(t), "InvalidArgument: pickle at byte 96: tensor view reaches element 99 of a storage of 4");
  PickleLimits small;
  small.max_bytes = 4;
  EXPECT_EQ(Error("\x80\x02N.", small), "OK");
  EXPECT_EQ(Error("\x80\x02(N.", small), "InvalidArgument: pickle of 5 bytes exceeds the limit of 4");
}

TEST(PickleTest, RecursiveStructuresAndMalformedInputAreRefused) {
  // l = []; l.append(l)
  EXPECT_EQ(Error("\x80\x02]q\x00h\x00" "a."),
            "InvalidArgument: pickle at byte 7: places a list inside itself (recursive structure): refused");
  // d = {}; l = [d]; d['l'] = l
  EXPECT_EQ(Error("\x80\x02}q\x00]q\x01h\x00" "a0X\x01\x00\x00\x00" "lh\x01s."),
            "InvalidArgument: pickle at byte 20: SETITEM modifies a dict already placed in another value (recursive structure): refused");
  EXPECT_EQ(Error("\x80\x02]"), "InvalidArgument: pickle at byte 3: input ends before STOP");
  EXPECT_EQ(Error("\x80\x02h\x05."), "InvalidArgument: pickle at byte 2: GET of memo 5, never PUT");
  EXPECT_EQ(Error("\x80\x02" "a."), "InvalidArgument: pickle at byte 2: stack underflow");
  EXPECT_EQ(Error("\x80\x02i."), "InvalidArgument: pickle at byte 2: unsupported opcode 0x69");
  EXPECT_EQ(Error("\x80\x02NN."), "InvalidArgument: pickle at byte 4: STOP with 2 values on the stack");
}

// Found with tests/fuzz/fuzz_pickle.cc (a timeout): the memo lets 40 levels of [x, x] share one
// list per level, 2^40 paths; the writer wrote every path. It writes each shared container once
// and fetches it from the memo after (BINPUT/BINGET, as Python's pickler does).
TEST(PickleTest, SharedContainersAreWrittenOnce) {
  std::string dag("\x80\x02]q\x00" "0", 6);  // x0 = []
  for (int i = 1; i <= 40; ++i) {              // x_i = [x_{i-1}, x_{i-1}]
    dag += std::string("(h") + static_cast<char>(i - 1) + "h" + static_cast<char>(i - 1) + "lq" + static_cast<char>(i) + "0";
  }
  dag += std::string("h") + static_cast<char>(40) + ".";
  Result<PickleValuePtr> v = Unpickle(dag);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  Result<std::string> written = PickleForTorch(**v);
  ASSERT_TRUE(written.ok()) << written.status().ToString();
  EXPECT_LT(written->size(), 400u);
  Result<PickleValuePtr> back = Unpickle(*written);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  const PickleValue* x = back->get();
  for (int level = 40; level > 0; --level) {
    ASSERT_EQ(x->kind, PickleValue::Kind::kList);
    ASSERT_EQ(x->items.size(), 2u);
    EXPECT_EQ(x->items[0], x->items[1]);  // still one shared list
    x = x->items[0].get();
  }
  EXPECT_TRUE(x->items.empty());
  // Without sharing, the bytes are those of before (no memo opcodes).
  EXPECT_EQ(*PickleForTorch(*PyList({PyList(), PyList()})), std::string("\x80\x02](]]e.", 8));
}

TEST(TorchFileTest, WriterRoundTripAndLayout) {
  const std::string root = TestRoot();
  FileSystem* fs = PosixFileSystem();
  TorchFileBuilder b;
  std::vector<uint8_t> w(2 * 3 * 4);
  for (size_t k = 0; k < w.size(); ++k) w[k] = static_cast<uint8_t>(k * 7);
  Result<PickleValuePtr> tw = b.AddTensor(DType::kF32, {2, 3}, w);
  ASSERT_TRUE(tw.ok());
  Result<PickleValuePtr> tb = b.AddTensor(DType::kBF16, {5}, std::vector<uint8_t>(10, 0xab));
  ASSERT_TRUE(tb.ok());
  PickleValuePtr top = PyDict(false);
  PickleValuePtr module = PyDict(true);
  DictSet(module.get(), "layer.w", *tw);
  DictSet(module.get(), "layer.b", *tb);
  DictSet(top.get(), "module", module);
  DictSet(top.get(), "step", PyInt(70000));
  DictSet(top.get(), "lr", PyFloat(-1.5e-4));
  DictSet(top.get(), "name", PyStr("x"));
  DictSet(top.get(), "shape", PyTuple({PyInt(-3), PyInt(int64_t{1} << 40)}));
  DictSet(top.get(), "flags", PyList({PyBool(true), PyNone()}));
  const std::string path = root + "/t.pt";
  ASSERT_TRUE(b.Write(fs, path, *top).ok());

  Result<std::unique_ptr<ZipArchive>> zip = ZipArchive::Open(fs, path);
  ASSERT_TRUE(zip.ok()) << zip.status().ToString();
  std::vector<std::string> names;
  for (const ZipEntry& e : (*zip)->entries()) {
    names.push_back(e.name);
    EXPECT_EQ(e.method, 0);
    if (e.name.find("/data/") != std::string::npos) {
      EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
    }
  }
  EXPECT_EQ(names, (std::vector<std::string>{"archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/data/1", "archive/version"}));

  Result<std::unique_ptr<TorchFile>> f = TorchFile::Open(fs, path, PickleLimits{.strict_globals = true});
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const PickleValue& r = (*f)->root();
  EXPECT_EQ((*f)->prefix(), "archive");
  EXPECT_EQ(r.Get("step")->i, 70000);
  EXPECT_EQ(r.Get("lr")->f, -1.5e-4);
  EXPECT_EQ(r.Get("shape")->items[0]->i, -3);
  EXPECT_EQ(r.Get("shape")->items[1]->i, int64_t{1} << 40);
  EXPECT_TRUE(r.Get("flags")->items[1]->is_none());
  const PickleValue* m = r.Get("module");
  ASSERT_TRUE(m->ordered);
  const TorchTensorRef& ref = m->Get("layer.w")->tensor;
  EXPECT_EQ(ref.dtype, DType::kF32);
  EXPECT_EQ(ref.size, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ref.stride, (std::vector<int64_t>{3, 1}));
  Result<std::vector<uint8_t>> bytes = (*f)->ReadTensor(ref);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(*bytes, w);
  Result<std::vector<uint8_t>> bb = (*f)->ReadTensor(m->Get("layer.b")->tensor);
  ASSERT_TRUE(bb.ok());
  EXPECT_EQ(*bb, std::vector<uint8_t>(10, 0xab));
  // Writing the same again gives the same bytes.
  ASSERT_TRUE(b.Write(fs, root + "/u.pt", *top).ok());
  EXPECT_EQ(Slurp(path), Slurp(root + "/u.pt"));
}

TEST(TorchFileTest, StridedViewsAreGathered) {
  const std::string root = TestRoot();
  FileSystem* fs = PosixFileSystem();
  TorchFileBuilder b;
  std::vector<uint8_t> s(6 * 4);
  for (size_t k = 0; k < 6; ++k) {
    const float x = static_cast<float>(k);
    std::memcpy(&s[k * 4], &x, 4);
  }
  Result<PickleValuePtr> t = b.AddTensor(DType::kF32, {2, 3}, s);
  ASSERT_TRUE(t.ok());
  // The transpose of the [2,3] tensor: size (3,2), stride (1,3), as x.t() pickles.
  PickleValuePtr view = PyTensor((*t)->tensor);
  view->tensor.size = {3, 2};
  view->tensor.stride = {1, 3};
  PickleValuePtr top = PyDict(false);
  DictSet(top.get(), "t", view);
  ASSERT_TRUE(b.Write(fs, root + "/v.pt", *top).ok());
  Result<std::unique_ptr<TorchFile>> f = TorchFile::Open(fs, root + "/v.pt");
  ASSERT_TRUE(f.ok());
  Result<std::vector<uint8_t>> bytes = (*f)->ReadTensor((*f)->root().Get("t")->tensor);
  ASSERT_TRUE(bytes.ok());
  std::vector<float> got(6);
  std::memcpy(got.data(), bytes->data(), 24);
  EXPECT_EQ(got, (std::vector<float>{0, 3, 1, 4, 2, 5}));
}

// A zip with one entry whose header fields are given, for hostile archives.
std::string RawZip(const std::string& name, uint16_t method, const std::string& data, uint64_t declared_size, uint32_t crc) {
  std::string out;
  auto le = [&](uint64_t v, int n) {
    for (int k = 0; k < n; ++k) out.push_back(static_cast<char>((v >> (8 * k)) & 0xff));
  };
  le(0x04034b50, 4); le(20, 2); le(0, 2); le(method, 2); le(0, 4); le(crc, 4);
  le(data.size(), 4); le(declared_size, 4); le(name.size(), 2); le(0, 2);
  out += name + data;
  const uint64_t cd = out.size();
  le(0x02014b50, 4); le(20, 2); le(20, 2); le(0, 2); le(method, 2); le(0, 4); le(crc, 4);
  le(data.size(), 4); le(declared_size, 4); le(name.size(), 2); le(0, 2); le(0, 2); le(0, 2); le(0, 2); le(0, 4); le(0, 4);
  out += name;
  const uint64_t cd_size = out.size() - cd;
  le(0x06054b50, 4); le(0, 2); le(0, 2); le(1, 2); le(1, 2); le(cd_size, 4); le(cd, 4); le(0, 2);
  return out;
}

#ifdef MEMENTO_TEST_HAVE_ZLIB
std::string Deflate(const std::string& in) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::string out(deflateBound(&zs, in.size()), '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}
#endif

std::string WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

std::string ZipError(const std::string& path) {
  Result<std::unique_ptr<ZipArchive>> z = ZipArchive::Open(PosixFileSystem(), path);
  if (!z.ok()) return z.status().ToString();
  for (const ZipEntry& e : (*z)->entries()) {
    Result<std::string> r = (*z)->Read(e);
    if (!r.ok()) return r.status().ToString();
  }
  return "OK";
}

TEST(TorchFileTest, HostileZipsAreRefused) {
  const std::string root = TestRoot();
  const std::string data = "hello";
  const uint32_t crc = ZipCrc32(data.data(), data.size());
  EXPECT_EQ(ZipError(WriteRaw(root + "/ok.zip", RawZip("a/b", 0, data, 5, crc))), "OK");
  const std::string dotdot = WriteRaw(root + "/dotdot.zip", RawZip("archive/../../etc/passwd", 0, data, 5, crc));
  EXPECT_EQ(ZipError(dotdot), "InvalidArgument: " + dotdot + ": zip entry name 'archive/../../etc/passwd' has a '..' component: refused");
  const std::string abs = WriteRaw(root + "/abs.zip", RawZip("/etc/passwd", 0, data, 5, crc));
  EXPECT_EQ(ZipError(abs), "InvalidArgument: " + abs + ": zip entry name '/etc/passwd' is absolute: refused");
  const std::string badcrc = WriteRaw(root + "/crc.zip", RawZip("a/b", 0, data, 5, crc ^ 1));
  EXPECT_EQ(ZipError(badcrc), "DataLoss: " + badcrc + ": zip entry 'a/b': CRC-32 mismatch");

#ifdef MEMENTO_TEST_HAVE_ZLIB
  // A zip bomb: 64 MiB of zeros deflate to about 64 KiB (ratio above 1000).
  const std::string zeros(size_t{64} << 20, '\0');
  const std::string bomb = WriteRaw(root + "/bomb.zip", RawZip("a/b", 8, Deflate(zeros), zeros.size(), ZipCrc32(zeros.data(), zeros.size())));
  const std::string e = ZipError(bomb);
  EXPECT_EQ(e.substr(0, e.find(" inflates")), "InvalidArgument: " + bomb + ": zip entry 'a/b'");
  EXPECT_NE(e.find("refused as a zip bomb"), std::string::npos) << e;
  // An entry that inflates past the size it declares.
  const std::string text(1000, 'x');
  const std::string liar = WriteRaw(root + "/liar.zip", RawZip("a/b", 8, Deflate(text), 100, ZipCrc32(text.data(), 100)));
  EXPECT_EQ(ZipError(liar), "InvalidArgument: " + liar + ": zip entry 'a/b' inflates past its declared 100 bytes: refused as a zip bomb");
  // A deflated entry that is honest reads back.
  const std::string good = WriteRaw(root + "/good.zip", RawZip("a/b", 8, Deflate(text), text.size(), ZipCrc32(text.data(), text.size())));
  EXPECT_EQ(ZipError(good), "OK");
#endif
  // Data declared past the end of the file.
  std::string trunc = RawZip("a/b", 0, data, 5, crc);
  trunc[18] = '\x7f';  // local compressed size
  trunc[static_cast<size_t>(30 + 3 + 5 + 20)] = '\x7f';  // central compressed size
  trunc[static_cast<size_t>(30 + 3 + 5 + 24)] = '\x7f';  // central size
  const std::string tp = WriteRaw(root + "/trunc.zip", trunc);
  EXPECT_EQ(ZipError(tp), "DataLoss: " + tp + ": zip entry 'a/b' declares 127 bytes past the end of the file (truncated or hostile)");

  // Not a zip; a legacy torch file.
  const std::string legacy = WriteRaw(root + "/legacy.pt", std::string("\x80\x02\x8a\x0a" "l\xfc\x9c" "F\xf9 j\xa8" "P\x19.", 16));
  EXPECT_EQ(ZipError(legacy), "InvalidArgument: " + legacy +
                                  ": a legacy (pre-1.6, non-zip) torch.save file; not supported: load and re-save it with a current PyTorch");
  // The zip writer refuses escaping names.
  Result<std::unique_ptr<ZipBuilder>> zb = ZipBuilder::Create(PosixFileSystem(), root + "/w.zip");
  ASSERT_TRUE(zb.ok());
  EXPECT_EQ((*zb)->Add("../x", "a", 1).ToString(), "InvalidArgument: " + root + "/w.zip: zip entry name '../x' has a '..' component: refused");
}

// fixtures/memento_written.pt is what this test writes; the GPU machine loaded it with
// torch.load(weights_only=True) and mmap=True (fixtures/torch_load_check.txt).
TEST(TorchFileTest, WriterOutputIsTheFileTorchLoaded) {
  const std::string root = TestRoot();
  TorchFileBuilder b;
  std::vector<uint8_t> w(12 * 4);
  for (int k = 0; k < 12; ++k) {
    const float x = static_cast<float>(k);
    std::memcpy(&w[static_cast<size_t>(k) * 4], &x, 4);
  }
  Result<PickleValuePtr> t = b.AddTensor(DType::kF32, {3, 4}, w);
  Result<PickleValuePtr> h = b.AddTensor(DType::kBF16, {2}, std::vector<uint8_t>{0x80, 0x3f, 0x00, 0x40});
  Result<PickleValuePtr> i = b.AddTensor(DType::kI64, {}, std::vector<uint8_t>{7, 0, 0, 0, 0, 0, 0, 0});
  ASSERT_TRUE(t.ok() && h.ok() && i.ok());
  PickleValuePtr top = PyDict(false);
  PickleValuePtr od = PyDict(true);
  DictSet(od.get(), "w", *t);
  DictSet(od.get(), "h", *h);
  DictSet(top.get(), "module", od);
  DictSet(top.get(), "step", *i);
  DictSet(top.get(), "lr", PyFloat(0.25));
  DictSet(top.get(), "big", PyInt(int64_t{1} << 40));
  DictSet(top.get(), "neg", PyInt(-70000));
  DictSet(top.get(), "t", PyTuple({PyStr("a"), PyBool(true), PyNone()}));
  DictSet(top.get(), "l", PyList({PyInt(1)}));
  ASSERT_TRUE(b.Write(PosixFileSystem(), root + "/m.pt", *top).ok());
  EXPECT_EQ(Slurp(root + "/m.pt"), Slurp(Fixture("memento_written.pt")));
}

TEST(TorchFileTest, ReadsTorchSaveFiles) {
  // Written by torch.save on the GPU machine (fixtures/make_deepspeed_fixtures.py).
  const std::string path = Fixture("torch_save_plain.pt");
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no torch-written fixture " << path;
  Result<std::unique_ptr<TorchFile>> f = TorchFile::Open(PosixFileSystem(), path, PickleLimits{.strict_globals = true});
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const PickleValue& r = (*f)->root();
  const PickleValue* w = r.Get("w");
  ASSERT_NE(w, nullptr);
  ASSERT_EQ(w->kind, K::kTensor);
  EXPECT_EQ(w->tensor.size, (std::vector<int64_t>{3, 4}));
  Result<std::vector<uint8_t>> bytes = (*f)->ReadTensor(w->tensor);
  ASSERT_TRUE(bytes.ok());
  std::vector<float> got(12);
  std::memcpy(got.data(), bytes->data(), 48);
  for (int k = 0; k < 12; ++k) EXPECT_EQ(got[static_cast<size_t>(k)], static_cast<float>(k)) << k;
  // wt = w.t(): a strided view of the same storage.
  Result<std::vector<uint8_t>> tb = (*f)->ReadTensor(r.Get("wt")->tensor);
  ASSERT_TRUE(tb.ok());
  std::memcpy(got.data(), tb->data(), 48);
  EXPECT_EQ(got[1], 4.0f);
  EXPECT_EQ(r.Get("size")->items[1]->i, 4);
  EXPECT_EQ(r.Get("bf16")->tensor.dtype, DType::kBF16);
}

}  // namespace
}  // namespace memento
