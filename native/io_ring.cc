// IoRing: one io_uring owned by the JavaScript thread, its completions delivered through the event
// loop (an eventfd watched by libuv). Positioned reads, writes and fdatasyncs are submitted straight
// from JavaScript in batches and complete one by one, so a request never waits for the rest of its
// batch and never makes a round trip through libuv's thread pool (the batch API in io_batch.cc
// does both: fine for bulk copies, too slow for an NBD server's 4 KiB requests).
//
// Mechanism only. The caller picks tags (small integers), decides ordering and what a result means.
// Memory is "registered" once (the ring holds a reference, so nothing in flight can be freed) and
// every segment is checked against the registered length.
#include "common.h"

#ifdef LIVESNAP_HAVE_URING
#include <liburing.h>
#include <sys/eventfd.h>
#include <uv.h>
#include <vector>

namespace livesnap {

namespace {

struct Op {
  int fd = -1;
  uint8_t kind = 0;  // 0 read, 1 write, 2 fdatasync
  bool urgent = false;
  uint8_t* base = nullptr;
  int64_t offset = 0, length = 0, done = 0;
  int32_t tag = 0;
  int32_t buf = -1;
  int32_t nextFree = -1;
};

struct Registered {
  Napi::Reference<Napi::ArrayBuffer> ref;
  uint8_t* data = nullptr;
  size_t length = 0;
  int64_t inflight = 0;
  bool live = false;
};

}  // namespace

class IoRing : public Napi::ObjectWrap<IoRing> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "IoRing", {
      InstanceMethod<&IoRing::Register>("register"),
      InstanceMethod<&IoRing::Unregister>("unregister"),
      InstanceMethod<&IoRing::Submit>("submit"),
      InstanceMethod<&IoRing::Close>("close"),
      InstanceAccessor<&IoRing::Inflight>("inflight"),
      InstanceAccessor<&IoRing::Capacity>("capacity"),
    });
  }

  // new IoRing(depth, onComplete(count)); completions land in this.tags / this.results.
  explicit IoRing(const Napi::CallbackInfo& info) : Napi::ObjectWrap<IoRing>(info) {
    Napi::Env env = info.Env();
    int64_t depth = 0;
    if (info.Length() < 2 || !GetOffset(info[0], &depth) || depth < 1 || depth > 4096 || !info[1].IsFunction()) {
      Napi::TypeError::New(env, "usage: new IoRing(depth 1..4096, onComplete(count))").ThrowAsJavaScriptException();
      return;
    }
    depth_ = (unsigned)depth;
    struct io_uring_params p = {};
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = depth_ * 2;
    int r = io_uring_queue_init_params(depth_, &ring_, &p);
    if (r < 0) { ErrnoError(env, -r, "io_uring_setup").ThrowAsJavaScriptException(); return; }
    ringUp_ = true;
    efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd_ < 0) { int e = errno; Teardown(); ErrnoError(env, e, "eventfd").ThrowAsJavaScriptException(); return; }
    r = io_uring_register_eventfd(&ring_, efd_);
    if (r < 0) { Teardown(); ErrnoError(env, -r, "io_uring_register_eventfd").ThrowAsJavaScriptException(); return; }
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) { Teardown(); Napi::Error::New(env, "no event loop").ThrowAsJavaScriptException(); return; }
    poll_ = new uv_poll_t;
    poll_->data = this;
    uv_poll_init(loop, poll_, efd_);
    uv_poll_start(poll_, UV_READABLE, &IoRing::OnReadable);
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
    ops_.resize(depth_);
    for (unsigned i = 0; i < depth_; i++) ops_[i].nextFree = (int32_t)i + 1 < (int32_t)depth_ ? (int32_t)i + 1 : -1;
    freeHead_ = 0;
    onComplete_ = Napi::Persistent(info[1].As<Napi::Function>());
    ctx_ = new Napi::AsyncContext(env, "livesnap.IoRing");
    Napi::Int32Array tags = Napi::Int32Array::New(env, depth_);
    Napi::Int32Array results = Napi::Int32Array::New(env, depth_);
    Value().Set("tags", tags);
    Value().Set("results", results);
    // The arrays' memory stays put while referenced: completions are written straight into it.
    tagsRef_ = Napi::Persistent(tags);
    resultsRef_ = Napi::Persistent(results);
    tags_ = tags.Data();
    results_ = results.Data();
    napi_add_env_cleanup_hook(env, &IoRing::EnvCleanup, this);
    hooked_ = true;
  }

  ~IoRing() override {
    if (hooked_) napi_remove_env_cleanup_hook(Env(), &IoRing::EnvCleanup, this);
    Shutdown();
  }

 private:
  // register(arrayBuffer) -> index
  Napi::Value Register(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return Closed(env);
    if (info.Length() < 1 || !info[0].IsArrayBuffer()) {
      Napi::TypeError::New(env, "usage: register(arrayBuffer)").ThrowAsJavaScriptException();
      return env.Null();
    }
    Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
    size_t idx = bufs_.size();
    for (size_t i = 0; i < bufs_.size(); i++) if (!bufs_[i].live) { idx = i; break; }
    if (idx == bufs_.size()) bufs_.emplace_back();
    Registered& b = bufs_[idx];
    b.ref = Napi::Persistent(ab);
    b.data = static_cast<uint8_t*>(ab.Data());
    b.length = ab.ByteLength();
    b.inflight = 0;
    b.live = true;
    return Napi::Number::New(env, (double)idx);
  }

  // unregister(index): drops the ring's reference; refused while an operation uses the memory.
  Napi::Value Unregister(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t idx = -1;
    if (info.Length() < 1 || !GetOffset(info[0], &idx) || idx >= (int64_t)bufs_.size() || !bufs_[idx].live) {
      Napi::RangeError::New(env, "unregister: not a registered buffer").ThrowAsJavaScriptException();
      return env.Null();
    }
    Registered& b = bufs_[idx];
    if (b.inflight > 0) {
      Napi::Error::New(env, "unregister: the buffer still has operations in flight").ThrowAsJavaScriptException();
      return env.Null();
    }
    b.ref.Reset();
    b.live = false;
    b.data = nullptr;
    b.length = 0;
    return env.Undefined();
  }

  // submit(ops: Float64Array, first, count) -> how many were accepted (the rest: no free slot), or
  // -(accepted + 1) when record first+accepted is malformed (bad fd, kind, buffer range or tag).
  // Each op is 7 numbers: [fd, kind (0 read, 1 write, 2 fdatasync; + 4 = urgent), buffer index,
  // offset, length, buffer offset, tag]; fdatasync ignores the buffer, offset and length. An urgent
  // op is issued in the real-time I/O priority class, which the block layer's schedulers
  // (mq-deadline, bfq) serve before best-effort I/O such as a backup's bulk reads.
  Napi::Value Submit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return Closed(env);
    int64_t first = 0, count = 0;
    if (info.Length() < 3 || !info[0].IsTypedArray() || !GetOffset(info[1], &first) || !GetOffset(info[2], &count)) {
      Napi::TypeError::New(env, "usage: submit(ops: Float64Array, first, count)").ThrowAsJavaScriptException();
      return env.Null();
    }
    Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
    if (ta.TypedArrayType() != napi_float64_array || (int64_t)ta.ElementLength() < (first + count) * 7) {
      Napi::RangeError::New(env, "submit: ops must be a Float64Array holding [first, first+count) 7-number records").ThrowAsJavaScriptException();
      return env.Null();
    }
    const double* rec = reinterpret_cast<const double*>(static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset());
    int64_t accepted = 0;
    for (int64_t i = first; i < first + count; i++) {
      if (freeHead_ < 0) break;
      const double* r = rec + i * 7;
      double fd = r[0], kindFlags = r[1], bi = r[2], off = r[3], len = r[4], bo = r[5], tag = r[6];
      bool urgent = kindFlags >= 4;
      double kind = urgent ? kindFlags - 4 : kindFlags;
      bool ok = fd >= 0 && fd < 1 << 30 && (kind == 0 || kind == 1 || kind == 2) && tag >= -2147483648.0 && tag <= 2147483647.0;
      uint8_t* base = nullptr;
      int32_t buf = -1;
      if (ok && kind != 2) {
        ok = bi >= 0 && bi < (double)bufs_.size() && bufs_[(size_t)bi].live && off >= 0 && off <= 9007199254740991.0 &&
             len > 0 && len <= 0x7ffff000 && bo >= 0 && bo + len <= (double)bufs_[(size_t)bi].length;
        if (ok) { buf = (int32_t)bi; base = bufs_[buf].data + (int64_t)bo; }
      }
      if (!ok) {
        // A malformed record: the ones before it are in flight; -(accepted + 1) tells the caller
        // which record to fail.
        Flush();
        return Napi::Number::New(env, -(double)(accepted + 1));
      }
      int32_t slot = freeHead_;
      Op& op = ops_[slot];
      freeHead_ = op.nextFree;
      op.fd = (int)fd; op.kind = (uint8_t)kind; op.base = base; op.offset = (int64_t)off; op.length = (int64_t)len;
      op.done = 0; op.tag = (int32_t)tag; op.buf = buf; op.urgent = urgent;
      if (buf >= 0) bufs_[buf].inflight++;
      Queue(slot);
      accepted++;
    }
    if (accepted) Flush();
    return Napi::Number::New(env, (double)accepted);
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  Napi::Value Inflight(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), (double)inflight_); }
  Napi::Value Capacity(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), (double)depth_); }

  Napi::Value Closed(Napi::Env env) {
    Napi::Error::New(env, "the I/O ring is closed").ThrowAsJavaScriptException();
    return env.Null();
  }

  // Puts the op's (remaining) transfer on the submission queue. There is always an SQE: at most
  // depth ops exist and each has at most one SQE queued.
  void Queue(int32_t slot) {
    Op& op = ops_[slot];
    struct io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) { io_uring_submit(&ring_); sqe = io_uring_get_sqe(&ring_); }
    if (op.kind == 2) {
      io_uring_prep_fsync(sqe, op.fd, IORING_FSYNC_DATASYNC);
    } else if (op.kind == 1) {
      io_uring_prep_write(sqe, op.fd, op.base + op.done, (unsigned)(op.length - op.done), (uint64_t)(op.offset + op.done));
    } else {
      io_uring_prep_read(sqe, op.fd, op.base + op.done, (unsigned)(op.length - op.done), (uint64_t)(op.offset + op.done));
    }
    if (op.urgent && urgentPrio_) sqe->ioprio = urgentPrio_;
    io_uring_sqe_set_data64(sqe, (uint64_t)slot);
    // While anything is in flight the ring keeps the process alive (uv_ref is a flag, not a count).
    if (inflight_ == 0) uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
    inflight_++;
    queuedSinceFlush_++;
  }

  void Flush() {
    if (!queuedSinceFlush_) return;
    queuedSinceFlush_ = 0;
    for (;;) {
      int r = io_uring_submit(&ring_);
      if (r >= 0 || (r != -EINTR && r != -EAGAIN && r != -EBUSY)) break;
    }
  }

  static void OnReadable(uv_poll_t* h, int status, int events) {
    static_cast<IoRing*>(h->data)->Drain();
  }

  void Drain() {
    uint64_t v;
    while (read(efd_, &v, sizeof v) > 0) {}
    if (closed_) return;
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    int32_t* tags = tags_;
    int32_t* results = results_;
    size_t n = 0;
    for (;;) {
      struct io_uring_cqe* cqe;
      unsigned head, seen = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        seen++;
        int32_t slot = (int32_t)io_uring_cqe_get_data64(cqe);
        Op& op = ops_[slot];
        int res = cqe->res;
        inflight_--;
        bool again = false;
        if (res == -EINTR || res == -EAGAIN) {
          again = true;
        } else if (res == -EPERM && op.urgent && urgentPrio_) {
          // The real-time class needs CAP_SYS_ADMIN or CAP_SYS_NICE: without it, plain priority.
          urgentPrio_ = 0;
          again = true;
        } else if (res > 0 && op.kind != 2) {
          op.done += res;
          again = op.done < op.length;  // short transfer: the rest (a 0 next time means end of file)
        }
        if (again) { Queue(slot); continue; }
        tags[n] = op.tag;
        results[n] = res < 0 ? res : (int32_t)op.done;
        n++;
        if (op.buf >= 0) bufs_[op.buf].inflight--;
        op.nextFree = freeHead_;
        freeHead_ = slot;
      }
      io_uring_cq_advance(&ring_, seen);
      if (!seen) break;
    }
    Flush();
    if (inflight_ == 0) uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
    if (!n) return;
    onComplete_.MakeCallback(Value(), {Napi::Number::New(env, (double)n)}, *ctx_);
  }

  // Waits for everything in flight (the memory it touches must outlive it), then frees the ring.
  void Shutdown() {
    if (closed_) return;
    closed_ = true;
    while (inflight_ > 0 && ringUp_) {
      struct io_uring_cqe* cqe;
      if (io_uring_wait_cqe(&ring_, &cqe) != 0) break;
      io_uring_cqe_seen(&ring_, cqe);
      inflight_--;
    }
    Teardown();
    for (auto& b : bufs_) { if (b.live) b.ref.Reset(); b.live = false; }
    onComplete_.Reset();
    tagsRef_.Reset();
    resultsRef_.Reset();
    delete ctx_;
    ctx_ = nullptr;
  }

  void Teardown() {
    if (poll_) {
      uv_poll_stop(poll_);
      uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
      poll_ = nullptr;
    }
    if (ringUp_) { io_uring_queue_exit(&ring_); ringUp_ = false; }
    if (efd_ >= 0) { close(efd_); efd_ = -1; }
  }

  static void EnvCleanup(void* arg) {
    IoRing* self = static_cast<IoRing*>(arg);
    self->hooked_ = false;
    self->Shutdown();
  }

  struct io_uring ring_ = {};
  bool ringUp_ = false;
  bool closed_ = false;
  bool hooked_ = false;
  int efd_ = -1;
  uv_poll_t* poll_ = nullptr;
  unsigned depth_ = 0;
  std::vector<Op> ops_;
  int32_t freeHead_ = -1;
  int64_t inflight_ = 0;
  unsigned queuedSinceFlush_ = 0;
  // IOPRIO_PRIO_VALUE(IOPRIO_CLASS_RT, 4): the middle of the real-time class; 0 once refused.
  uint16_t urgentPrio_ = (1 << 13) | 4;
  std::vector<Registered> bufs_;
  Napi::FunctionReference onComplete_;
  Napi::AsyncContext* ctx_ = nullptr;
  int32_t* tags_ = nullptr;
  int32_t* results_ = nullptr;
  Napi::Reference<Napi::Int32Array> tagsRef_, resultsRef_;
};

Napi::Value DefineIoRing(Napi::Env env) { return IoRing::Define(env); }

}  // namespace livesnap

#else
namespace livesnap {
Napi::Value DefineIoRing(Napi::Env env) { return env.Undefined(); }
}  // namespace livesnap
#endif
