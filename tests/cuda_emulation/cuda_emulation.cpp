// The emulated CUDA runtime of cuda_emulation.h: launches, fibers, barriers, shuffles.
#include "cuda_emulation.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace cuda_emulation {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr size_t kStackBytes = 128 * 1024;       // per emulated thread; the kernels' frames are small
constexpr size_t kMaxSharedBytes = 48 * 1024;    // dynamic shared memory a launch gets without opting in

enum class State { Running, AtBlockBarrier, AtWarpBarrier, Returned };

// Switching fibers. On x86-64, a few instructions that save the callee-saved registers on the old stack
// and restore them from the new one: ucontext's swapcontext also saves the signal mask, a system call
// per switch, which made the barrier-heavy kernels ten times slower. Elsewhere, ucontext.
#if defined(__x86_64__)
struct Context {
  void* stack_pointer = nullptr;
};
extern "C" void cuda_emulation_switch(void** save_stack_pointer, void* load_stack_pointer);
asm(R"(
  .text
  .globl cuda_emulation_switch
  .type cuda_emulation_switch, @function
cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulation_switch, .-cuda_emulation_switch
)");
void switch_context(Context& save, Context& load) { cuda_emulation_switch(&save.stack_pointer, load.stack_pointer); }
// A context that starts entry() on the given stack (entry must never return).
void make_context(Context& context, char* stack, size_t bytes, void (*entry)(), Context&) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                           // entry's own return address: rsp % 16 == 8 on entry, as after a call
  *--sp = reinterpret_cast<void*>(entry);    // where the first switch's ret goes
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
  context.stack_pointer = sp;
}
#else
struct Context {
  ucontext_t context;
};
void switch_context(Context& save, Context& load) { swapcontext(&save.context, &load.context); }
void make_context(Context& context, char* stack, size_t bytes, void (*entry)(), Context& link) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = &link.context;
  makecontext(&context.context, entry, 0);
}
#endif

struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack;
  uint3 index;
  State state = State::Returned;
  WarpOp warp_op = WarpOp::Sync;
  uint64_t shuffle_slot = 0;
};

struct Launch {
  dim3 grid, block;
  unsigned threads = 0;
  uint3 block_index{};
  unsigned char* shared = nullptr;
  size_t shared_bytes = 0;
  std::vector<void*> poisoned_static_shared;  // the static __shared__ variables poisoned in this block
  const std::function<void()>* body = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  Fiber* current = nullptr;
  Context scheduler;
};

std::mutex launch_mutex;  // one launch at a time: static shared memory is function-static (cuda_emulation.h)
Launch* active = nullptr;
thread_local cudaError_t last_error = cudaSuccess;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "cuda_emulation: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

Launch& launch() {
  if (active == nullptr) fail("a device function was called outside a kernel launch");
  return *active;
}

Fiber& current() {
  Launch& l = launch();
  if (l.current == nullptr) fail("a device function was called outside a kernel's thread");
  return *l.current;
}

std::string thread_name(const Launch& l, unsigned t) {
  return "block (" + std::to_string(l.block_index.x) + ", " + std::to_string(l.block_index.y) + ", " +
         std::to_string(l.block_index.z) + ") thread " + std::to_string(t);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::ShufflePublish: return "a shuffle";
    case WarpOp::ShuffleRead: return "the end of a shuffle";
  }
  return "?";
}

[[noreturn]] void fiber_main() {
  Launch& l = *active;
  (*l.body)();
  Fiber& f = *l.current;
  f.state = State::Returned;
  switch_context(f.context, l.scheduler);
  fail("a thread that had returned was resumed");
}

void wait_at(State state) {
  Fiber& f = current();
  f.state = state;
  switch_context(f.context, launch().scheduler);
}

// Opens the barriers every live thread of a warp (or of the block) has reached. False when every thread
// has returned; aborts when no barrier can open (a hang on a GPU) or a warp's lanes diverge.
bool open_barriers(Launch& l) {
  std::vector<Fiber>& fibers = *l.fibers;
  bool opened = false;
  unsigned live = 0, at_block = 0;
  for (unsigned first = 0; first < l.threads; first += kWarpSize) {
    const unsigned end = std::min(l.threads, first + kWarpSize);
    unsigned warp_live = 0, warp_at_warp = 0, warp_at_block = 0, first_at_warp = 0;
    for (unsigned t = first; t < end; ++t) {
      const Fiber& f = fibers[t];
      if (f.state == State::Returned) continue;
      ++warp_live;
      if (f.state == State::AtBlockBarrier) ++warp_at_block;
      if (f.state != State::AtWarpBarrier) continue;
      if (warp_at_warp++ == 0) {
        first_at_warp = t;
      } else if (f.warp_op != fibers[first_at_warp].warp_op) {
        fail("the lanes of a warp diverge: " + thread_name(l, first_at_warp) + " waits at " +
             op_name(fibers[first_at_warp].warp_op) + ", " + thread_name(l, t) + " at " + op_name(f.warp_op));
      }
    }
    if (warp_at_warp > 0 && warp_at_block > 0) {
      fail("the lanes of a warp diverge: " + thread_name(l, first_at_warp) + " waits at " +
           op_name(fibers[first_at_warp].warp_op) + " while other lanes wait at __syncthreads");
    }
    if (warp_at_warp > 0 && warp_at_warp == warp_live) {
      for (unsigned t = first; t < end; ++t) {
        if (fibers[t].state == State::AtWarpBarrier) fibers[t].state = State::Running;
      }
      opened = true;
    }
    live += warp_live;
    at_block += warp_at_block;
  }
  if (opened) return true;
  if (live == 0) return false;
  if (at_block == live) {
    for (unsigned t = 0; t < l.threads; ++t) {
      if (fibers[t].state == State::AtBlockBarrier) fibers[t].state = State::Running;
    }
    return true;
  }
  fail("deadlock in " + thread_name(l, 0) + "'s block: no barrier can open");
}

void run_block(Launch& l) {
  std::vector<Fiber>& fibers = *l.fibers;
  if (l.shared_bytes > 0) std::memset(l.shared, 0xff, l.shared_bytes);
  l.poisoned_static_shared.clear();
  for (unsigned t = 0; t < l.threads; ++t) {
    Fiber& f = fibers[t];
    f.index = {t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y)};
    f.state = State::Running;
    make_context(f.context, f.stack.get(), kStackBytes, fiber_main, l.scheduler);
  }
  // Each round runs every runnable thread up to its next barrier, alternately in increasing and in
  // decreasing order, so that a missing barrier shows whichever way the data flows.
  for (bool increasing = true;; increasing = !increasing) {
    for (unsigned i = 0; i < l.threads; ++i) {
      Fiber& f = fibers[increasing ? i : l.threads - 1 - i];
      if (f.state != State::Running) continue;
      l.current = &f;
      switch_context(l.scheduler, f.context);
    }
    l.current = nullptr;
    if (!open_barriers(l)) return;
  }
}

std::vector<Fiber>& fiber_pool(unsigned threads) {
  static std::vector<Fiber> pool;
  if (pool.size() < threads) pool.resize(threads);
  for (Fiber& f : pool) {
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
  }
  return pool;
}

}  // namespace

const uint3& thread_index() { return current().index; }
const uint3& block_index() { return launch().block_index; }
const dim3& block_dim() { return launch().block; }
const dim3& grid_dim() { return launch().grid; }
unsigned char* dynamic_shared_memory() { return launch().shared; }

void poison_static_shared(void* variable, size_t bytes) {
  std::vector<void*>& poisoned = launch().poisoned_static_shared;
  if (std::find(poisoned.begin(), poisoned.end(), variable) != poisoned.end()) return;
  poisoned.push_back(variable);
  std::memset(variable, 0xff, bytes);
}

void block_barrier() { wait_at(State::AtBlockBarrier); }

void warp_barrier(WarpOp op) {
  current().warp_op = op;
  wait_at(State::AtWarpBarrier);
}

void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask (the kernels use full warps)");
  const Launch& l = launch();
  const unsigned t = unsigned(&current() - l.fibers->data());
  if (t / kWarpSize * kWarpSize + kWarpSize > l.threads) {
    fail(std::string(what) + " with a full mask in a warp the block fills only in part");
  }
}

uint64_t& own_shuffle_slot() { return current().shuffle_slot; }

const uint64_t& lane_shuffle_slot(int lane, const char* what) {
  const Launch& l = launch();
  const unsigned t = unsigned(&current() - l.fibers->data());
  const unsigned source = t / kWarpSize * kWarpSize + unsigned(lane);
  if (lane < 0 || lane >= int(kWarpSize) || source >= l.threads) {
    fail(std::string(what) + " reads lane " + std::to_string(lane) + ", outside the warp");
  }
  const Fiber& f = (*l.fibers)[source];
  if (f.state == State::Returned) fail(std::string(what) + " reads a lane that has returned");
  return f.shuffle_slot;
}

void run(const LaunchConfig& config, const std::function<void()>& body) {
  const dim3 grid = config.grid, block = config.block;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (config.shared_bytes > kMaxSharedBytes) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  const std::lock_guard<std::mutex> lock(launch_mutex);
  struct SharedMemory {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, SharedMemory> shared(
      config.shared_bytes > 0
          ? static_cast<unsigned char*>(std::aligned_alloc(256, (config.shared_bytes + 255) / 256 * 256))
          : nullptr);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.threads = unsigned(threads);
  l.shared = shared.get();
  l.shared_bytes = config.shared_bytes;
  l.body = &body;
  l.fibers = &fiber_pool(l.threads);
  active = &l;
  // Blocks in decreasing order: a kernel that needs block order to be correct is wrong on a GPU too.
  for (unsigned z = grid.z; z-- > 0;) {
    for (unsigned y = grid.y; y-- > 0;) {
      for (unsigned x = grid.x; x-- > 0;) {
        l.block_index = {x, y, z};
        run_block(l);
      }
    }
  }
  active = nullptr;
}

}  // namespace cuda_emulation

cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emulation::last_error;
  cuda_emulation::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

namespace at {
namespace cuda {
cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp properties = [] {
    const char* text = std::getenv("NICE_EXT_EMULATED_SMS");
    const int sms = text != nullptr && *text != '\0' ? std::atoi(text) : 2;
    if (sms < 1) cuda_emulation::fail("NICE_EXT_EMULATED_SMS must be a positive integer");
    return cudaDeviceProp{sms};
  }();
  return &properties;
}
}  // namespace cuda
}  // namespace at
