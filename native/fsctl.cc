// File-system controls: FIFREEZE / FITHAW on a mount point, FIEMAP on a file.
#include "common.h"
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

namespace livesnap {

static int FreezeOp(const std::string& mnt, unsigned long req) {
  int fd = open(mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  int r = ioctl(fd, req, 0) == 0 ? 0 : errno;
  close(fd);
  return r;
}

// freeze(mountPoint): FIFREEZE syncs dirty data and blocks new writers on that file system only.
Napi::Value Freeze(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) { Napi::TypeError::New(env, "usage: freeze(mountPoint)").ThrowAsJavaScriptException(); return env.Null(); }
  std::string mnt = info[0].As<Napi::String>();
  return CallWorker::Start(env, "ioctl(FIFREEZE)", mnt, [mnt] { return FreezeOp(mnt, FIFREEZE); });
}

// setSendBuffer(socketFd, bytes) -> the size the kernel granted (SO_SNDBUF, capped by wmem_max).
Napi::Value SetSendBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd = -1, bytes = 0;
  if (info.Length() < 2 || !GetOffset(info[0], &fd) || !GetOffset(info[1], &bytes) || bytes > (1 << 30)) {
    Napi::TypeError::New(env, "usage: setSendBuffer(fd, bytes)").ThrowAsJavaScriptException(); return env.Null();
  }
  int v = (int)bytes;
  if (setsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) != 0) { ErrnoError(env, errno, "setsockopt(SO_SNDBUF)").ThrowAsJavaScriptException(); return env.Null(); }
  socklen_t l = sizeof v;
  if (getsockopt((int)fd, SOL_SOCKET, SO_SNDBUF, &v, &l) != 0) v = 0;
  return Napi::Number::New(env, v);
}

// syncfs(mountPoint): writes back that one file system's dirty data (writers keep going).
Napi::Value SyncFs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) { Napi::TypeError::New(env, "usage: syncfs(mountPoint)").ThrowAsJavaScriptException(); return env.Null(); }
  std::string mnt = info[0].As<Napi::String>();
  return CallWorker::Start(env, "syncfs", mnt, [mnt] {
    int fd = open(mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno;
    int r = syncfs(fd) == 0 ? 0 : errno;
    close(fd);
    return r;
  });
}

Napi::Value Thaw(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) { Napi::TypeError::New(env, "usage: thaw(mountPoint)").ThrowAsJavaScriptException(); return env.Null(); }
  std::string mnt = info[0].As<Napi::String>();
  return CallWorker::Start(env, "ioctl(FITHAW)", mnt, [mnt] { return FreezeOp(mnt, FITHAW); });
}

// thawSync(mountPoint): for exit and signal paths, where no promise will be awaited.
Napi::Value ThawSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) { Napi::TypeError::New(env, "usage: thawSync(mountPoint)").ThrowAsJavaScriptException(); return env.Null(); }
  std::string mnt = info[0].As<Napi::String>();
  int r = FreezeOp(mnt, FITHAW);
  if (r) { ErrnoError(env, r, "ioctl(FITHAW)", mnt).ThrowAsJavaScriptException(); return env.Null(); }
  return env.Undefined();
}

// The extents of a file as [logical, physical, length, flags] quadruplets, or -errno.
static int64_t FiemapOp(const std::string& path, bool sync, std::vector<double>* out) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -(int64_t)errno;
  const unsigned kBatch = 512;
  std::vector<uint8_t> mem(sizeof(struct fiemap) + kBatch * sizeof(struct fiemap_extent));
  struct fiemap* fm = reinterpret_cast<struct fiemap*>(mem.data());
  uint64_t start = 0;
  bool last = false;
  while (!last) {
    memset(mem.data(), 0, mem.size());
    fm->fm_start = start;
    fm->fm_length = ~0ULL - start;
    fm->fm_flags = sync ? FIEMAP_FLAG_SYNC : 0;
    fm->fm_extent_count = kBatch;
    if (ioctl(fd, FS_IOC_FIEMAP, fm) != 0) { int e = errno; close(fd); return -(int64_t)e; }
    if (fm->fm_mapped_extents == 0) break;
    for (unsigned i = 0; i < fm->fm_mapped_extents; i++) {
      const struct fiemap_extent& e = fm->fm_extents[i];
      out->push_back((double)e.fe_logical); out->push_back((double)e.fe_physical);
      out->push_back((double)e.fe_length); out->push_back((double)e.fe_flags);
      if (e.fe_flags & FIEMAP_EXTENT_LAST) last = true;
      start = e.fe_logical + e.fe_length;
    }
  }
  close(fd);
  return 0;
}

// fiemap(path, sync=true) -> Promise<Float64Array>. On the thread pool: with FIEMAP_FLAG_SYNC it
// writes the file back first, which may wait on a file system this process serves.
class FiemapWorker : public Napi::AsyncWorker {
 public:
  FiemapWorker(Napi::Env env, std::string path, bool sync)
      : Napi::AsyncWorker(env, "fiemap"), deferred_(Napi::Promise::Deferred::New(env)), path_(std::move(path)), sync_(sync) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { err_ = FiemapOp(path_, sync_, &out_); }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_ < 0) { deferred_.Reject(ErrnoError(env, (int)-err_, "ioctl(FS_IOC_FIEMAP)", path_).Value()); return; }
    Napi::Float64Array arr = Napi::Float64Array::New(env, out_.size());
    for (size_t i = 0; i < out_.size(); i++) arr[i] = out_[i];
    deferred_.Resolve(arr);
  }
 private:
  Napi::Promise::Deferred deferred_;
  std::string path_;
  bool sync_;
  std::vector<double> out_;
  int64_t err_ = 0;
};

Napi::Value Fiemap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) { Napi::TypeError::New(env, "usage: fiemap(path)").ThrowAsJavaScriptException(); return env.Null(); }
  auto* w = new FiemapWorker(env, info[0].As<Napi::String>(), info.Length() < 2 || info[1].ToBoolean());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace livesnap
