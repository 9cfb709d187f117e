#include "io_engine.h"
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <mutex>
#include <unistd.h>

#ifdef LIVESNAP_HAVE_URING
#include <liburing.h>
#endif

namespace livesnap {

// Set once by the caller (src/config.ts decides) before any batch runs.
static std::atomic<bool> gForceThreadpool{false};
void SetForceThreadpool(bool on) { gForceThreadpool = on; }
static bool ForcedThreadpool() { return gForceThreadpool.load(); }

#ifdef LIVESNAP_HAVE_URING
static constexpr unsigned kRingDepth = 128;

// One ring per libuv worker thread: rings are not thread-safe, and a per-thread ring needs no lock.
struct ThreadRing {
  struct io_uring ring;
  int state = 0;  // 0 = untried, 1 = ready, -1 = unavailable
  ~ThreadRing() { if (state == 1) io_uring_queue_exit(&ring); }
  bool Ensure() {
    if (state == 0) state = io_uring_queue_init(kRingDepth, &ring, 0) == 0 ? 1 : -1;
    return state == 1;
  }
};
static thread_local ThreadRing tRing;

bool RunBatchUring(int fd, bool write, uint8_t* base, const std::vector<Segment>& segs, std::vector<int32_t>& results) {
  if (ForcedThreadpool() || !tRing.Ensure()) return false;
  struct io_uring* ring = &tRing.ring;
  size_t next = 0, inflight = 0, n = segs.size();
  results.assign(n, 0);
  while (next < n || inflight > 0) {
    while (next < n && inflight < kRingDepth) {
      struct io_uring_sqe* sqe = io_uring_get_sqe(ring);
      if (!sqe) break;
      const Segment& s = segs[next];
      if (write) io_uring_prep_write(sqe, fd, base + s.bufOffset, (unsigned)s.length, (uint64_t)s.offset);
      else io_uring_prep_read(sqe, fd, base + s.bufOffset, (unsigned)s.length, (uint64_t)s.offset);
      io_uring_sqe_set_data64(sqe, next);
      next++; inflight++;
    }
    int r = io_uring_submit_and_wait(ring, 1);
    if (r < 0 && r != -EINTR) {
      // The ring itself failed: finish what is not done the plain way; completions already
      // queued are reaped first so no buffer is touched twice.
      struct io_uring_cqe* cqe;
      while (inflight > 0 && io_uring_wait_cqe(ring, &cqe) == 0) {
        results[io_uring_cqe_get_data64(cqe)] = cqe->res; io_uring_cqe_seen(ring, cqe); inflight--;
      }
      std::vector<Segment> rest(segs.begin() + next, segs.end());
      std::vector<int32_t> rr;
      RunBatchSync(fd, write, base, rest, rr);
      for (size_t i = 0; i < rr.size(); i++) results[next + i] = rr[i];
      next = n;
      break;
    }
    struct io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
      results[io_uring_cqe_get_data64(cqe)] = cqe->res;
      seen++;
    }
    io_uring_cq_advance(ring, seen);
    inflight -= seen;
  }
  // A short transfer that is not at end of file is finished synchronously (rare: signals, odd devices).
  for (size_t i = 0; i < n; i++) {
    const Segment& s = segs[i];
    if (results[i] > 0 && results[i] < s.length) {
      std::vector<Segment> one{{s.offset + results[i], s.length - results[i], s.bufOffset + results[i]}};
      std::vector<int32_t> rr;
      RunBatchSync(fd, write, base, one, rr);
      if (rr[0] < 0 && !write) { /* keep the short count: the tail is past the end or unreadable */ }
      else if (rr[0] < 0) results[i] = rr[0];
      else results[i] += rr[0];
    }
  }
  return true;
}

const char* EngineName() {
  static const char* name = [] {
    if (ForcedThreadpool()) return "threadpool";
    struct io_uring probe;
    if (io_uring_queue_init(4, &probe, 0) != 0) return "threadpool";
    io_uring_queue_exit(&probe);
    return "io_uring";
  }();
  return name;
}
#else
bool RunBatchUring(int, bool, uint8_t*, const std::vector<Segment>&, std::vector<int32_t>&) { return false; }
const char* EngineName() { return "threadpool"; }
#endif

void RunBatchSync(int fd, bool write, uint8_t* base, const std::vector<Segment>& segs, std::vector<int32_t>& results) {
  results.assign(segs.size(), 0);
  for (size_t i = 0; i < segs.size(); i++) {
    const Segment& s = segs[i];
    int64_t done = 0;
    while (done < s.length) {
      ssize_t r = write ? pwrite(fd, base + s.bufOffset + done, s.length - done, s.offset + done)
                        : pread(fd, base + s.bufOffset + done, s.length - done, s.offset + done);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (done == 0) done = -errno;
        break;
      }
      if (r == 0) break;  // end of file
      done += r;
    }
    results[i] = (int32_t)done;
  }
}

}  // namespace livesnap
