// The two ways a batch of positioned reads/writes runs on a worker thread:
// io_uring (every segment of the batch in flight at once) or plain pread/pwrite one after another.
#pragma once
#include <cstdint>
#include <vector>

namespace livesnap {

struct Segment {
  int64_t offset;     // byte offset in the file/device
  int64_t length;     // bytes
  int64_t bufOffset;  // byte offset in the caller's (aligned) buffer
};

// Fills results[i] with bytes transferred (short only at end of file) or -errno.
void RunBatchSync(int fd, bool write, uint8_t* base, const std::vector<Segment>& segs, std::vector<int32_t>& results);

// Returns false when io_uring cannot be used on this thread (kernel without it, disabled by sysctl,
// seccomp, or LIVESNAP_IO_ENGINE=threadpool); the caller then runs the batch with RunBatchSync.
bool RunBatchUring(int fd, bool write, uint8_t* base, const std::vector<Segment>& segs, std::vector<int32_t>& results);

// Batches use the thread pool only (no io_uring), whatever the kernel offers: call before the first batch.
void SetForceThreadpool(bool on);

// "io_uring" or "threadpool": what batches will use, probed once.
const char* EngineName();

}  // namespace livesnap
