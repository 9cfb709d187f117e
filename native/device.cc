// Opening devices and files for direct I/O, their geometry, aligned memory, and the
// whole-device operations (sync, flush cache, discard, zero).
#include "common.h"
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <cstdlib>

namespace livesnap {

struct OpenArgs { std::string path; int flags = 0; };

static bool ParseOpen(const Napi::CallbackInfo& info, OpenArgs* a) {
  Napi::Env env = info.Env();
  if (!RequireArgs(info, 1, "usage: open(path, {write, direct, exclusive, create})")) return false;
  if (!info[0].IsString()) { Napi::TypeError::New(env, "path must be a string").ThrowAsJavaScriptException(); return false; }
  a->path = info[0].As<Napi::String>();
  bool write = false, direct = true, exclusive = false, create = false;
  if (info.Length() > 1 && info[1].IsObject()) {
    Napi::Object o = info[1].As<Napi::Object>();
    if (o.Has("write")) write = o.Get("write").ToBoolean();
    if (o.Has("direct")) direct = o.Get("direct").ToBoolean();
    if (o.Has("exclusive")) exclusive = o.Get("exclusive").ToBoolean();
    if (o.Has("create")) create = o.Get("create").ToBoolean();
  }
  int flags = (write ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_LARGEFILE;
  if (direct) flags |= O_DIRECT;
  // On a block device O_EXCL without O_CREAT claims it exclusively: EBUSY while mounted or held.
  if (exclusive) flags |= O_EXCL;
  if (create) flags |= O_CREAT;
  a->flags = flags;
  return true;
}

// open(path, {write, direct, exclusive, create}) -> fd
Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  OpenArgs a;
  if (!ParseOpen(info, &a)) return env.Null();
  int fd = open(a.path.c_str(), a.flags, 0600);
  if (fd < 0) { ErrnoError(env, errno, "open", a.path).ThrowAsJavaScriptException(); return env.Null(); }
  return Napi::Number::New(env, fd);
}

// openAsync(path, flags) -> Promise<fd>: the same open on the thread pool, for paths whose lookup
// may wait on a file system this process itself serves.
Napi::Value OpenAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  OpenArgs a;
  if (!ParseOpen(info, &a)) return env.Null();
  return ValueWorker::Start(env, "open", a.path, [a]() -> int64_t {
    int fd = open(a.path.c_str(), a.flags, 0600);
    return fd < 0 ? -(int64_t)errno : fd;
  });
}

// lock(fd, mode) -> true if taken, false if someone else holds a conflicting lock. mode: "exclusive",
// "shared" or "unlock". flock(2), never waiting: an export holds an exclusive lock on its device
// (and a loop device's backing file) for as long as it is served.
Napi::Value Lock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsString()) {
    Napi::TypeError::New(env, "usage: lock(fd, 'exclusive' | 'shared' | 'unlock')").ThrowAsJavaScriptException(); return env.Null();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  std::string mode = info[1].As<Napi::String>();
  int op = mode == "exclusive" ? LOCK_EX : mode == "shared" ? LOCK_SH : mode == "unlock" ? LOCK_UN : -1;
  if (op < 0) { Napi::TypeError::New(env, "lock: mode must be exclusive, shared or unlock").ThrowAsJavaScriptException(); return env.Null(); }
  for (;;) {
    if (flock(fd, op | LOCK_NB) == 0) return Napi::Boolean::New(env, true);
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) return Napi::Boolean::New(env, false);
    ErrnoError(env, errno, "flock").ThrowAsJavaScriptException();
    return env.Null();
  }
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!RequireArgs(info, 1, "usage: close(fd)")) return env.Null();
  if (close(info[0].As<Napi::Number>().Int32Value()) != 0) ErrnoError(env, errno, "close").ThrowAsJavaScriptException();
  return env.Undefined();
}

// stat(fd) -> {size, logicalSectorSize, physicalSectorSize, blockDevice, rdevMajor, rdevMinor}
Napi::Value Stat(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!RequireArgs(info, 1, "usage: stat(fd)")) return env.Null();
  int fd = info[0].As<Napi::Number>().Int32Value();
  struct stat st;
  if (FStat(fd, &st) != 0) { ErrnoError(env, errno, "fstat").ThrowAsJavaScriptException(); return env.Null(); }
  uint64_t size = st.st_size;
  int lss = 512, pss = 512;
  bool blk = S_ISBLK(st.st_mode);
  if (blk) {
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) { ErrnoError(env, errno, "ioctl(BLKGETSIZE64)").ThrowAsJavaScriptException(); return env.Null(); }
    if (ioctl(fd, BLKSSZGET, &lss) != 0) lss = 512;
    unsigned int p = 0;
    if (ioctl(fd, BLKPBSZGET, &p) == 0 && p) pss = (int)p; else pss = lss;
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", Napi::Number::New(env, (double)size));
  o.Set("logicalSectorSize", Napi::Number::New(env, lss));
  o.Set("physicalSectorSize", Napi::Number::New(env, pss));
  o.Set("blockDevice", Napi::Boolean::New(env, blk));
  o.Set("regularFile", Napi::Boolean::New(env, S_ISREG(st.st_mode)));
  o.Set("rdevMajor", Napi::Number::New(env, major(st.st_rdev)));
  o.Set("rdevMinor", Napi::Number::New(env, minor(st.st_rdev)));
  return o;
}

static void FreeAligned(Napi::Env, void* data) { free(data); }
static void UnmapAligned(Napi::Env, void* data, size_t* length) { munmap(data, *length); delete length; }

// From this size on, aligned memory is an anonymous mapping of its own: zero pages the kernel fills
// on first touch, so only the pages actually used are resident. A served export's 32 MiB I/O arena
// that sees 4 KiB requests costs a few pages, not 32 MiB; a memory:64M container costs the originals
// it holds. Below it: posix_memalign + memset.
static constexpr int64_t kMapFrom = 1 << 20;

// allocAligned(size, alignment=4096) -> ArrayBuffer (zeroed). Meant to be pooled by the caller:
// external memory is only released when the event loop turns and GC runs.
Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t size = 0, align = 4096;
  if (info.Length() < 1 || !GetOffset(info[0], &size) || size <= 0) {
    Napi::RangeError::New(env, "allocAligned: size must be a positive integer").ThrowAsJavaScriptException(); return env.Null();
  }
  if (info.Length() > 1 && (!GetOffset(info[1], &align) || align < 512 || (align & (align - 1)))) {
    Napi::RangeError::New(env, "allocAligned: alignment must be a power of two >= 512").ThrowAsJavaScriptException(); return env.Null();
  }
  if (size >= kMapFrom && align <= sysconf(_SC_PAGESIZE)) {
    void* m = mmap(nullptr, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { ErrnoError(env, errno, "mmap").ThrowAsJavaScriptException(); return env.Null(); }
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, m, (size_t)size, UnmapAligned, new size_t((size_t)size));
    Napi::MemoryManagement::AdjustExternalMemory(env, size);
    return ab;
  }
  void* p = nullptr;
  if (posix_memalign(&p, (size_t)align, (size_t)size) != 0) { ErrnoError(env, ENOMEM, "posix_memalign").ThrowAsJavaScriptException(); return env.Null(); }
  memset(p, 0, (size_t)size);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, p, (size_t)size, FreeAligned);
  Napi::MemoryManagement::AdjustExternalMemory(env, size);
  return ab;
}

// zeroAligned(arrayBuffer) -> true if it was an anonymous mapping of allocAligned's (size from
// kMapFrom, page-aligned): its pages are given back to the kernel (MADV_DONTNEED), so it reads as
// zeros again and costs no memory until touched. false: nothing done, the caller zeroes it.
Napi::Value ZeroAligned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArrayBuffer()) { Napi::TypeError::New(env, "usage: zeroAligned(arrayBuffer)").ThrowAsJavaScriptException(); return env.Null(); }
  Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
  const long page = sysconf(_SC_PAGESIZE);
  const size_t len = ab.ByteLength();
  if ((int64_t)len < kMapFrom || len % (size_t)page != 0 || reinterpret_cast<uintptr_t>(ab.Data()) % (uintptr_t)page != 0) return Napi::Boolean::New(env, false);
  if (madvise(ab.Data(), len, MADV_DONTNEED) != 0) return Napi::Boolean::New(env, false);
  return Napi::Boolean::New(env, true);
}

Napi::Value Fdatasync(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  return CallWorker::Start(info.Env(), "fdatasync", "", [fd] { return fdatasync(fd) == 0 ? 0 : errno; });
}

static int RangeOp(int fd, uint64_t off, uint64_t len, bool zero) {
  struct stat st;
  if (FStat(fd, &st) != 0) return errno;
  if (S_ISBLK(st.st_mode)) {
    uint64_t range[2] = {off, len};
    if (ioctl(fd, zero ? BLKZEROOUT : BLKDISCARD, range) == 0) return 0;
    return errno;
  }
  int mode = zero ? FALLOC_FL_ZERO_RANGE : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  if (fallocate(fd, mode, (off_t)off, (off_t)len) == 0) return 0;
  if (zero && errno == EOPNOTSUPP && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0) return 0;
  return errno;
}

static Napi::Value Range(const Napi::CallbackInfo& info, bool zero) {
  Napi::Env env = info.Env();
  int64_t off, len;
  if (info.Length() < 3 || !info[0].IsNumber() || !GetOffset(info[1], &off) || !GetOffset(info[2], &len)) {
    Napi::TypeError::New(env, "usage: (fd, offset, length)").ThrowAsJavaScriptException(); return env.Null();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  return CallWorker::Start(env, zero ? "zeroRange" : "discard", "", [=] { return RangeOp(fd, off, len, zero); });
}
Napi::Value Discard(const Napi::CallbackInfo& info) { return Range(info, false); }
Napi::Value ZeroRange(const Napi::CallbackInfo& info) { return Range(info, true); }

}  // namespace livesnap
