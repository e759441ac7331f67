// A host emulation of the CUDA execution model, for executing CUDA kernel bodies on a CPU in tests.
//
// Include it before a kernel header (csrc/cuda/*_kernels.h; defining __CUDA_ARCH__ around that
// include gives the kernels the device branches of shared __host__ __device__ code), then launch a
// kernel with `cuda_emu::launch(kernel, grid, block, shared_bytes, args...)`, what
// `kernel<<<grid, block, shared_bytes>>>(args...)` does on a GPU.  Every CUDA thread of a block is a
// host std::thread (a launch starts one per thread of a block and runs every block with them):
//
// - the blocks of a grid run one after another (a legal CUDA schedule: blocks are independent), and
//   the threads of a block run concurrently, so `__shared__` variables are `static` (one copy, used
//   by one block at a time) and the dynamic shared memory (GSPN_DYNAMIC_SHARED) is one buffer of the
//   launch's `shared_bytes`, filled with 0xff bytes (NaN in float and double) before every block, so
//   a read of shared memory the block did not write shows up in the results;
// - threadIdx, blockIdx, blockDim and gridDim are thread-locals; warps are 32 consecutive threads
//   (threadIdx.x fastest);
// - __syncthreads() is a std::barrier over the block's threads that also checks that all of them
//   wait at the same __syncthreads (a barrier in divergent code is an error, reported by the launch);
//   a thread that returns leaves the block's and its warp's barriers (as exited threads do on a GPU);
// - __syncwarp and the warp collectives (__shfl_sync, __shfl_up_sync, __shfl_down_sync,
//   __shfl_xor_sync, __ballot_sync, __any_sync, __all_sync) go through a per-warp exchange between
//   two std::barrier phases.  They must be called by every live thread of the warp (the mask must
//   name them all; a subset is reported as unsupported), and a shuffle reading a lane that does not
//   exist or has exited is reported as an error;
// - atomicAdd/atomicMax/atomicMin/atomicExch/atomicCAS are std::atomic_ref operations, __ldg a plain
//   load, __threadfence* a sequentially consistent fence.
//
// The launch checks the block size (at most 1024 threads) and the dynamic shared memory (at most
// kMaxDynamicShared, an H100's opt-in limit), and throws std::runtime_error with the first error a
// thread reported (an exception thrown by a thread included).  A launch that makes no progress for
// CUDA_EMU_TIMEOUT_S seconds (default 300: a deadlock) prints what it knows and aborts the process.
//
// Races between CUDA threads show up in results only as far as the host threads' scheduling exposes
// them (in practice a missing __syncthreads in the GSPN kernels fails most test cases); compiled with
// -fsanitize=thread (race_check.cpp) every access pair that no barrier orders is reported.
//
// Not emulated: the memory model beyond what the barriers order, __launch_bounds__ (ignored), CUDA's
// own 16-bit types and intrinsics (__half, __nv_bfloat16; kernels templated on c10::Half /
// c10::BFloat16, which are host types too, run), textures, cooperative groups, clusters, and warp
// collectives over a subset of a warp.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_emu.h is for host compilers; nvcc has the real thing"
#endif

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA C++ keywords and built-in types ----

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// __restrict__ is a GCC/Clang keyword already.

// The kernel headers declare their dynamic shared memory with this (gspn_kernel_common.h).
#define GSPN_DYNAMIC_SHARED(name) unsigned char* const name = ::cuda_emu::dynamic_shared()

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace cuda_emu {

constexpr int kWarp = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // an H100's (and H200's) opt-in maximum per block

// ---- the running launch ----

// Where a thread waits in __syncthreads: the call site, or "gone" once it has returned.
struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const {
    return line == o.line && (file == o.file || (file && o.file && std::strcmp(file, o.file) == 0));
  }
};

struct Block;

// Completion step of a block barrier phase: all waiting threads must stand at the same site.
struct SiteCheck {
  Block* block;
  void operator()() noexcept;
};

struct Launch;

// Completion step of a barrier phase: the launch made progress (for the deadlock watchdog).
struct Progress {
  Launch* launch;
  void operator()() noexcept;
};

struct Warp {
  int size;  // threads of the block in this warp (the last warp may be partial)
  std::barrier<Progress> bar;
  uint64_t slot[kWarp];
  std::atomic<bool> live[kWarp];
  Warp(Launch* l, int n) : size(n), bar(n, Progress{l}), slot{} {
    for (int i = 0; i < kWarp; ++i) live[i].store(i < n);
  }
};

struct Block {
  Launch* launch;
  int threads;
  std::vector<Site> sites;  // per thread: where it waits in __syncthreads
  std::barrier<SiteCheck> sync;
  std::vector<std::unique_ptr<Warp>> warps;
  Block(Launch* l, int n) : launch(l), threads(n), sites(n), sync(n, SiteCheck{this}) {
    for (int w = 0; w * kWarp < n; ++w) warps.push_back(std::make_unique<Warp>(l, std::min(kWarp, n - w * kWarp)));
  }
};

struct Launch {
  dim3 grid, block;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::mutex error_mutex;
  std::string error;  // the first error reported
  std::atomic<uint64_t> progress{0};
  std::unique_ptr<Block> current;
  int64_t block_index = -1;
  bool done = false;

  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (error.empty()) error = msg;
  }
};

struct ThreadState {
  Launch* launch = nullptr;
  Block* block = nullptr;
  int tid = 0;  // linear thread index in the block
};

inline thread_local ThreadState tls;

inline void Progress::operator()() noexcept { launch->progress.fetch_add(1, std::memory_order_relaxed); }

inline void SiteCheck::operator()() noexcept {
  Block& b = *block;
  b.launch->progress.fetch_add(1, std::memory_order_relaxed);
  const Site* first = nullptr;
  for (const Site& s : b.sites) {
    if (s.file == nullptr) continue;  // returned
    if (first == nullptr) {
      first = &s;
    } else if (!(s == *first)) {
      b.launch->fail(std::string("__syncthreads in divergent code: threads of block ") +
                     std::to_string(b.launch->block_index) + " wait at " + first->file + ":" +
                     std::to_string(first->line) + " and at " + s.file + ":" + std::to_string(s.line));
      return;
    }
  }
}

inline unsigned char* dynamic_shared() { return tls.launch->smem; }

inline void syncthreads(const char* file, int line) {
  Block& b = *tls.block;
  b.sites[tls.tid] = Site{file, line};
  b.sync.arrive_and_wait();
}

inline Warp& my_warp(int& lane) {
  lane = tls.tid % kWarp;
  return *tls.block->warps[tls.tid / kWarp];
}

// Every live thread of the warp must be named in `mask`.
inline void check_mask(const Warp& w, unsigned mask, const char* what) {
  for (int i = 0; i < w.size; ++i) {
    if (w.live[i].load() && !(mask >> i & 1u)) {
      tls.launch->fail(std::string(what) + ": a mask without every live lane of the warp (mask " +
                       std::to_string(mask) + ") is not supported by the emulation");
      return;
    }
  }
}

// The value of lane `src` of the warp (every live lane calls this at once); `own` if src is -1.
template <typename T>
T exchange(unsigned mask, T v, int src, const char* what) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "warp shuffles move values of up to 8 bytes");
  int lane;
  Warp& w = my_warp(lane);
  check_mask(w, mask, what);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  w.bar.arrive_and_wait();
  T r = v;
  if (src >= 0) {
    if (src >= w.size || !w.live[src].load()) {
      tls.launch->fail(std::string(what) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                       ", which has exited or does not exist");
    } else {
      std::memcpy(&r, &w.slot[src], sizeof(T));
    }
  }
  w.bar.arrive_and_wait();  // nobody overwrites a slot before all have read
  return r;
}

inline int subgroup_base(int lane, int width) { return lane / width * width; }

inline void on_exit() {
  Block& b = *tls.block;
  b.sites[tls.tid] = Site{};
  int lane;
  Warp& w = my_warp(lane);
  w.live[lane].store(false);
  w.bar.arrive_and_drop();
  b.sync.arrive_and_drop();
}

// One launch at a time in the process: a `__shared__` (static) variable is one copy.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs `body()` for every thread of every block of the grid; throws std::runtime_error on the first
// error a thread reported.
template <typename Body>
void run(dim3 grid, dim3 block, size_t shared_bytes, Body body) {
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  if (threads < 1 || threads > kMaxThreadsPerBlock) {
    throw std::runtime_error("cuda_emu: invalid block of " + std::to_string(threads) + " threads");
  }
  if (shared_bytes > kMaxDynamicShared) {
    throw std::runtime_error("cuda_emu: " + std::to_string(shared_bytes) + " bytes of dynamic shared memory exceed " +
                             std::to_string(kMaxDynamicShared));
  }
  if (blocks == 0) return;
  std::lock_guard<std::mutex> serial(launch_mutex());

  Launch L;
  L.grid = grid;
  L.block = block;
  L.smem_bytes = shared_bytes;
  const size_t alloc = (shared_bytes + 15) / 16 * 16;
  std::unique_ptr<unsigned char[]> smem(alloc ? new (std::align_val_t{16}) unsigned char[alloc] : nullptr);
  L.smem = smem.get();
  const int n = static_cast<int>(threads);

  // Between blocks all threads meet here; the completion step sets up the next block.
  auto next_block = [&]() noexcept {
    L.progress.fetch_add(1, std::memory_order_relaxed);
    L.current.reset();
    ++L.block_index;
    if (L.block_index >= blocks) {
      L.done = true;
      return;
    }
    if (L.smem) std::memset(L.smem, 0xff, alloc);
    L.current = std::make_unique<Block>(&L, n);
  };
  std::barrier<decltype(next_block)> between(n, next_block);

  std::mutex finished_mutex;
  std::condition_variable finished_cv;
  int finished = 0;
  auto worker = [&](int tid) {
    tls.launch = &L;
    tls.tid = tid;
    threadIdx = uint3{static_cast<unsigned>(tid % block.x), static_cast<unsigned>(tid / block.x % block.y),
                      static_cast<unsigned>(tid / (block.x * block.y))};
    blockDim = block;
    gridDim = grid;
    for (;;) {
      between.arrive_and_wait();
      if (L.done) break;
      const int64_t bi = L.block_index;
      blockIdx = uint3{static_cast<unsigned>(bi % grid.x), static_cast<unsigned>(bi / grid.x % grid.y),
                       static_cast<unsigned>(bi / (int64_t{grid.x} * grid.y))};
      tls.block = L.current.get();
      try {
        body();
      } catch (const std::exception& e) {
        L.fail(std::string("exception in a kernel thread: ") + e.what());
      } catch (...) {
        L.fail("unknown exception in a kernel thread");
      }
      on_exit();
      tls.block = nullptr;
    }
    tls = ThreadState{};
    std::lock_guard<std::mutex> lock(finished_mutex);
    ++finished;
    finished_cv.notify_one();
  };

  std::vector<std::thread> pool;
  pool.reserve(n);
  for (int t = 0; t < n; ++t) pool.emplace_back(worker, t);

  // Watchdog: a launch whose barriers make no progress for the timeout is deadlocked.
  const char* env = std::getenv("CUDA_EMU_TIMEOUT_S");
  const double timeout_s = env != nullptr ? std::atof(env) : 300.0;
  {
    std::unique_lock<std::mutex> lock(finished_mutex);
    uint64_t seen = L.progress.load();
    while (finished < n) {
      if (finished_cv.wait_for(lock, std::chrono::duration<double>(timeout_s)) == std::cv_status::timeout &&
          finished < n) {
        const uint64_t now = L.progress.load();
        if (now == seen) {
          std::fprintf(stderr,
                       "cuda_emu: no barrier completed for %.0f s in block %lld of %lld (%d threads): deadlock "
                       "(a __syncthreads or warp collective not reached by every thread?); aborting\n",
                       timeout_s, static_cast<long long>(L.block_index), static_cast<long long>(blocks), n);
          std::abort();
        }
        seen = now;
      }
    }
  }
  for (std::thread& t : pool) t.join();
  if (!L.error.empty()) throw std::runtime_error("cuda_emu: " + L.error);
}

// `kernel<<<grid, block, shared_bytes>>>(args...)`: the arguments are copied once, as a launch does.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  auto params = std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...);
  run(grid, block, shared_bytes, [&] { std::apply(kernel, params); });
}

}  // namespace cuda_emu

// ---- intrinsics ----

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  int lane;
  cuda_emu::Warp& w = cuda_emu::my_warp(lane);
  cuda_emu::check_mask(w, mask, "__syncwarp");
  w.bar.arrive_and_wait();
}

inline unsigned __activemask() {
  int lane;
  const cuda_emu::Warp& w = cuda_emu::my_warp(lane);
  unsigned m = 0;
  for (int i = 0; i < w.size; ++i) m |= w.live[i].load() ? 1u << i : 0u;
  return m;
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  const int lane = cuda_emu::tls.tid % cuda_emu::kWarp;
  return cuda_emu::exchange(mask, v, cuda_emu::subgroup_base(lane, width) + (src_lane & (width - 1)), "__shfl_sync");
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = cuda_emu::tls.tid % cuda_emu::kWarp;
  const int src = lane % width >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1;
  return cuda_emu::exchange(mask, v, src, "__shfl_up_sync");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = cuda_emu::tls.tid % cuda_emu::kWarp;
  const int src = lane % width + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  return cuda_emu::exchange(mask, v, src, "__shfl_down_sync");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  const int lane = cuda_emu::tls.tid % cuda_emu::kWarp;
  const int src = lane ^ lane_mask;
  // lanes of a later subgroup are not read: the thread keeps its own value
  return cuda_emu::exchange(mask, v, src < cuda_emu::subgroup_base(lane, width) + width ? src : -1,
                            "__shfl_xor_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  int lane;
  cuda_emu::Warp& w = cuda_emu::my_warp(lane);
  cuda_emu::check_mask(w, mask, "__ballot_sync");
  w.slot[lane] = predicate != 0;
  w.bar.arrive_and_wait();
  unsigned r = 0;
  for (int i = 0; i < w.size; ++i) r |= (w.live[i].load() && w.slot[i] != 0 ? 1u << i : 0u);
  w.bar.arrive_and_wait();
  return r & mask;
}

inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == (__activemask() & mask);
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}
template <typename T>
T atomicExch(T* address, T v) {
  return std::atomic_ref<T>(*address).exchange(v);
}
template <typename T>
T atomicCAS(T* address, T compare, T v) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, v);
  return compare;
}
template <typename T>
T atomicMax(T* address, T v) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T v) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __saturatef(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }
