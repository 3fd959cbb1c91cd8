// One CUDA thread block on the host with real threads: every CUDA thread is a
// std::thread, block_sync() is a barrier of the whole block, and a warp
// shuffle goes through scratch memory between two barriers of the warp. The
// kernel bodies of csrc/cuda/attention_blocks.cuh then run with the real
// thread layout (4 warps x 32 lanes), so ThreadSanitizer sees every
// shared-memory race a missing barrier would cause on a GPU.
//
// Defines the hooks csrc/cuda/block_ops.cuh declares under
// LONGREACH_THREADED_EMULATION. A thread that runs no block (the main thread)
// gets the single-thread layout, so the same binary also runs the bodies the
// way the existing emulation does (tests/emulation/attention_emulation.cpp).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda/block_ops.cuh"

namespace longreach::cuda_kernels::threaded_emulation {

// A reusable barrier on a mutex and a condition variable, which
// ThreadSanitizer models exactly: everything before arrive_and_wait() in any
// thread happens before everything after it in all of them.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      woken_.notify_all();
      return;
    }
    // A barrier some threads never reach hangs a GPU block (undefined
    // behaviour); here it stops the run with a message instead of a hang.
    if (!woken_.wait_for(lock, std::chrono::seconds(kDeadlockSeconds), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "threaded emulation: %d of %d threads reached a barrier within %d s (divergent barrier?)\n",
                   arrived_, n_, kDeadlockSeconds);
      std::abort();
    }
  }
  static constexpr int kDeadlockSeconds = 120;

 private:
  std::mutex mutex_;
  std::condition_variable woken_;
  const int n_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Block {
  int nthreads;
  int warp_size;
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  // Two shuffle buffers of one value per thread: consecutive shuffles of a
  // warp alternate between them, so a lane that writes one again has passed the
  // barrier behind which every lane read it last time (one barrier per shuffle).
  std::vector<float> shuffle_buffers;
  // Harness self-test: the block_sync() with this index (counted from 0 in
  // each block, the same in every thread) is skipped. -1: none.
  int skip_sync = -1;

  Block(int threads, int lanes, int skip)
      : nthreads(threads), warp_size(lanes), barrier(threads), shuffle_buffers(2 * threads), skip_sync(skip) {
    for (int w = 0; w < threads / lanes; ++w) warp_barriers.emplace_back(new Barrier(lanes));
  }
};

struct ThreadState {
  Block* block = nullptr;
  int tid = 0;
  int syncs = 0;     // block_sync() calls in the current block
  int shuffles = 0;  // shuffles of this thread so far (the same count in every lane of its warp)
};

inline ThreadState& self() {
  static thread_local ThreadState state;
  return state;
}

}  // namespace longreach::cuda_kernels::threaded_emulation

namespace longreach::cuda_kernels {

BlockCtx threaded_emulation::block_ctx() {
  const ThreadState& s = self();
  if (s.block == nullptr) return {0, 1, 0, 1, 0, 1};
  const int ws = s.block->warp_size;
  return {s.tid, s.block->nthreads, s.tid / ws, s.block->nthreads / ws, s.tid % ws, ws};
}

void threaded_emulation::block_sync() {
  ThreadState& s = self();
  if (s.block == nullptr) return;
  if (s.syncs++ == s.block->skip_sync) return;
  s.block->barrier.arrive_and_wait();
}

float threaded_emulation::shfl_xor(float x, int lane_mask) {
  ThreadState& s = self();
  Block& blk = *s.block;  // only called with more than one lane per warp
  float* buffer = blk.shuffle_buffers.data() + (s.shuffles++ % 2) * blk.nthreads;
  const int ws = blk.warp_size, warp_base = s.tid / ws * ws;
  buffer[s.tid] = x;
  blk.warp_barriers[s.tid / ws]->arrive_and_wait();
  return buffer[warp_base + ((s.tid % ws) ^ lane_mask)];
}

namespace threaded_emulation {

// Shared memory of one block: exactly `bytes` (a multiple of 128), 128-byte
// aligned, so AddressSanitizer reports any access past the carved arrays.
// (`offset` > 0, a self-test: the base sits that many bytes past the boundary.)
struct SharedMemory {
  int64_t bytes;
  char* allocation;
  char* base;
  SharedMemory(int64_t n, int offset)
      : bytes(n),
        allocation(static_cast<char*>(std::aligned_alloc(128, static_cast<size_t>((n + offset + 127) / 128 * 128)))),
        base(allocation + offset) {}
  ~SharedMemory() { std::free(allocation); }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  // Poison: a read before a write shows up as a wrong result (0x7f7f7f7f is a huge float).
  void poison() const { std::memset(base, 0x7f, static_cast<size_t>(bytes)); }
};

// Runs body(block, head, batch, smem) for every block of a (blocks, heads,
// batch) grid, one block at a time. threads == 1: on the calling thread, with
// the single-thread layout; else on `threads` std::threads in warps of
// `warp_size` lanes.
template <typename Body>
void run_grid(int threads, int warp_size, int skip_sync, int smem_offset, int64_t smem_bytes, int64_t blocks,
              int64_t heads, int64_t batch, Body body) {
  SharedMemory smem(smem_bytes, smem_offset);
  if (threads == 1) {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          smem.poison();
          body(blk, h, b, smem.base);
        }
    return;
  }
  Block block(threads, warp_size, skip_sync);
  std::vector<std::thread> pool;
  for (int tid = 0; tid < threads; ++tid) {
    pool.emplace_back([&, tid] {
      ThreadState& s = self();
      s.block = &block;
      s.tid = tid;
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t blk = 0; blk < blocks; ++blk) {
            // A new block on the same shared memory, as when the GPU schedules
            // the next block on a multiprocessor (these barriers are not counted).
            if (tid == 0) smem.poison();
            block.barrier.arrive_and_wait();
            s.syncs = 0;
            body(blk, h, b, smem.base);
            block.barrier.arrive_and_wait();
          }
      s.block = nullptr;
    });
  }
  for (std::thread& t : pool) t.join();
}

}  // namespace threaded_emulation
}  // namespace longreach::cuda_kernels
