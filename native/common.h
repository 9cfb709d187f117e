// Shared helpers for the livesnap addon: errno-carrying errors and argument checks.
// The addon is mechanism only: it never decides what to read, when, or what an error means.
#pragma once
#include <napi.h>
#include <cerrno>
#include <cstring>
#include <string>
#include "errname.h"

namespace livesnap {

// A Node-style system error: message "<syscall> <path>: <strerror>", with code/errno/syscall/path
// properties, so the TypeScript side can map EINVAL-on-tmpfs, EBUSY, ENOSPC... to policy.
inline Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const std::string& path = "") {
  std::string msg = std::string(syscall);
  if (!path.empty()) msg += " '" + path + "'";
  msg += ": ";
  msg += strerror(err);
  Napi::Error e = Napi::Error::New(env, msg);
  const char* name = strerrorname_np_compat(err);
  e.Value().Set("code", Napi::String::New(env, name));
  e.Value().Set("errno", Napi::Number::New(env, -err));
  e.Value().Set("syscall", Napi::String::New(env, syscall));
  if (!path.empty()) e.Value().Set("path", Napi::String::New(env, path));
  return e;
}

inline bool RequireArgs(const Napi::CallbackInfo& info, size_t n, const char* usage) {
  if (info.Length() < n) {
    Napi::TypeError::New(info.Env(), usage).ThrowAsJavaScriptException();
    return false;
  }
  return true;
}

// Number argument that must be a non-negative integer below 2^53 (file offsets, lengths).
inline bool GetOffset(const Napi::Value& v, int64_t* out) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != (double)(int64_t)d) return false;
  *out = (int64_t)d;
  return true;
}

}  // namespace livesnap

#include <functional>
namespace livesnap {
// Runs fn() on the libuv pool; fn returns 0 or an errno. Resolves undefined, or rejects with ErrnoError.
class CallWorker : public Napi::AsyncWorker {
 public:
  CallWorker(Napi::Env env, const char* syscall, std::string path, std::function<int()> fn)
      : Napi::AsyncWorker(env, syscall), deferred_(Napi::Promise::Deferred::New(env)),
        syscall_(syscall), path_(std::move(path)), fn_(std::move(fn)) {}
  static Napi::Promise Start(Napi::Env env, const char* syscall, std::string path, std::function<int()> fn) {
    auto* w = new CallWorker(env, syscall, std::move(path), std::move(fn));
    Napi::Promise p = w->deferred_.Promise();
    w->Queue();
    return p;
  }
  void Execute() override { err_ = fn_(); }
  void OnOK() override {
    if (err_) deferred_.Reject(ErrnoError(Env(), err_, syscall_, path_).Value());
    else deferred_.Resolve(Env().Undefined());
  }
 private:
  Napi::Promise::Deferred deferred_;
  const char* syscall_;
  std::string path_;
  std::function<int()> fn_;
  int err_ = 0;
};
// Runs fn() on the libuv pool; fn returns a non-negative result or -errno. Resolves the number.
class ValueWorker : public Napi::AsyncWorker {
 public:
  ValueWorker(Napi::Env env, const char* syscall, std::string path, std::function<int64_t()> fn)
      : Napi::AsyncWorker(env, syscall), deferred_(Napi::Promise::Deferred::New(env)),
        syscall_(syscall), path_(std::move(path)), fn_(std::move(fn)) {}
  static Napi::Promise Start(Napi::Env env, const char* syscall, std::string path, std::function<int64_t()> fn) {
    auto* w = new ValueWorker(env, syscall, std::move(path), std::move(fn));
    Napi::Promise p = w->deferred_.Promise();
    w->Queue();
    return p;
  }
  void Execute() override { result_ = fn_(); }
  void OnOK() override {
    if (result_ < 0) deferred_.Reject(ErrnoError(Env(), (int)-result_, syscall_, path_).Value());
    else deferred_.Resolve(Napi::Number::New(Env(), (double)result_));
  }
 private:
  Napi::Promise::Deferred deferred_;
  const char* syscall_;
  std::string path_;
  std::function<int64_t()> fn_;
  int64_t result_ = 0;
};
}  // namespace livesnap

#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
namespace livesnap {
// glibc >= 2.33 binds fstat() to a new symbol; the raw syscall keeps the addon loadable on glibc 2.28.
inline int FStat(int fd, struct stat* st) { return (int)syscall(SYS_fstat, fd, st); }
}  // namespace livesnap
