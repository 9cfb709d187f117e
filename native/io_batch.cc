// readBatch / writeBatch: one promise for a whole batch of segments, so the TypeScript hot path
// makes one call (and one allocation-free completion) per batch, never one per block.
#include "common.h"
#include "io_engine.h"

namespace livesnap {

class BatchWorker : public Napi::AsyncWorker {
 public:
  BatchWorker(Napi::Env env, int fd, bool write, Napi::ArrayBuffer buf, std::vector<Segment> segs)
      : Napi::AsyncWorker(env, write ? "livesnap.writeBatch" : "livesnap.readBatch"),
        deferred_(Napi::Promise::Deferred::New(env)), fd_(fd), write_(write),
        base_(static_cast<uint8_t*>(buf.Data())), segs_(std::move(segs)) {
    bufRef_ = Napi::Persistent(buf.As<Napi::Object>());  // keeps the memory alive while in flight
  }
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    if (!RunBatchUring(fd_, write_, base_, segs_, results_)) RunBatchSync(fd_, write_, base_, segs_, results_);
  }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::Int32Array out = Napi::Int32Array::New(env, results_.size());
    for (size_t i = 0; i < results_.size(); i++) out[i] = results_[i];
    bufRef_.Reset();
    deferred_.Resolve(out);
  }

 private:
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference bufRef_;
  int fd_;
  bool write_;
  uint8_t* base_;
  std::vector<Segment> segs_;
  std::vector<int32_t> results_;
};

// (fd, ArrayBuffer, Float64Array [offset, length, bufOffset] * n) -> Promise<Int32Array>
static Napi::Value Batch(const Napi::CallbackInfo& info, bool write) {
  Napi::Env env = info.Env();
  if (!RequireArgs(info, 3, "usage: (fd, arrayBuffer, segments: Float64Array)")) return env.Null();
  if (!info[0].IsNumber() || !info[1].IsArrayBuffer() || !info[2].IsTypedArray()) {
    Napi::TypeError::New(env, "usage: (fd: number, buffer: ArrayBuffer, segments: Float64Array)").ThrowAsJavaScriptException();
    return env.Null();
  }
  int fd = info[0].As<Napi::Number>().Int32Value();
  Napi::ArrayBuffer buf = info[1].As<Napi::ArrayBuffer>();
  Napi::TypedArray ta = info[2].As<Napi::TypedArray>();
  if (ta.TypedArrayType() != napi_float64_array || ta.ElementLength() % 3 != 0) {
    Napi::TypeError::New(env, "segments must be a Float64Array of [offset, length, bufOffset] triplets").ThrowAsJavaScriptException();
    return env.Null();
  }
  Napi::Float64Array f = ta.As<Napi::Float64Array>();
  size_t n = f.ElementLength() / 3;
  std::vector<Segment> segs(n);
  int64_t cap = (int64_t)buf.ByteLength();
  for (size_t i = 0; i < n; i++) {
    double o = f[3 * i], l = f[3 * i + 1], b = f[3 * i + 2];
    if (!(o >= 0) || !(l > 0) || !(b >= 0) || l > 0x7ffff000 || b + l > (double)cap) {
      Napi::RangeError::New(env, "segment " + std::to_string(i) + " is outside the buffer or has a bad offset/length").ThrowAsJavaScriptException();
      return env.Null();
    }
    segs[i] = Segment{(int64_t)o, (int64_t)l, (int64_t)b};
  }
  auto* w = new BatchWorker(env, fd, write, buf, std::move(segs));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value ReadBatch(const Napi::CallbackInfo& info) { return Batch(info, false); }
Napi::Value WriteBatch(const Napi::CallbackInfo& info) { return Batch(info, true); }
Napi::Value IoEngine(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), EngineName()); }

// useThreadpool(on): batches never use io_uring (the caller's configuration decides; call it first).
Napi::Value UseThreadpool(const Napi::CallbackInfo& info) {
  SetForceThreadpool(info.Length() > 0 && info[0].ToBoolean());
  return info.Env().Undefined();
}

}  // namespace livesnap
