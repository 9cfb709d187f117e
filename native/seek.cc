// dataRanges: where a regular file holds data, by SEEK_DATA / SEEK_HOLE (holes read as zeroes).
// Mechanism only: the caller decides what a hole means to its clients.
#include "common.h"
#include <unistd.h>
#include <vector>

namespace livesnap {

class DataRangesWorker : public Napi::AsyncWorker {
 public:
  DataRangesWorker(Napi::Env env, int fd, int64_t offset, int64_t end, int64_t max)
      : Napi::AsyncWorker(env, "livesnap.dataRanges"), deferred_(Napi::Promise::Deferred::New(env)),
        fd_(fd), offset_(offset), end_(end), max_(max) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    int64_t pos = offset_;
    while (pos < end_ && (int64_t)(ranges_.size() / 2) < max_) {
      off_t d = lseek(fd_, pos, SEEK_DATA);
      if (d < 0) {
        if (errno != ENXIO) err_ = errno;  // ENXIO: no data at or after pos
        return;
      }
      if (d >= end_) return;
      off_t h = lseek(fd_, d, SEEK_HOLE);
      if (h < 0) { err_ = errno; return; }
      ranges_.push_back((double)d);
      ranges_.push_back((double)(h < end_ ? h : end_));
      pos = h;
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (err_) { deferred_.Reject(ErrnoError(env, err_, "lseek(SEEK_DATA)").Value()); return; }
    Napi::Float64Array out = Napi::Float64Array::New(env, ranges_.size());
    for (size_t i = 0; i < ranges_.size(); i++) out[i] = ranges_[i];
    deferred_.Resolve(out);
  }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  int64_t offset_, end_, max_;
  std::vector<double> ranges_;
  int err_ = 0;
};

// dataRanges(fd, offset, length, maxRanges) -> Promise<Float64Array [start, end) * n>: the data
// ranges of [offset, offset+length), at most maxRanges of them (the last may be cut at the end).
Napi::Value DataRanges(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t fd = -1, offset = 0, length = 0, max = 0;
  if (info.Length() < 4 || !GetOffset(info[0], &fd) || !GetOffset(info[1], &offset) || !GetOffset(info[2], &length) ||
      !GetOffset(info[3], &max) || max < 1 || fd > 0x7fffffff || offset + length < offset) {
    Napi::TypeError::New(env, "usage: dataRanges(fd, offset, length, maxRanges >= 1)").ThrowAsJavaScriptException();
    return env.Null();
  }
  auto* w = new DataRangesWorker(env, (int)fd, offset, offset + length, max);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace livesnap
