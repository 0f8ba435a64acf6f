// The CUDA calls a worker thread needs and tch does not expose: make a GPU the thread's
// current device, give the thread a stream of its own, and wait for that stream.
//
// Only c10's device-generic interface is used (libtorch_cuda registers the CUDA
// implementation when it loads), so this builds without the CUDA toolkit and, on a machine
// without a GPU, answers with libtorch's error instead of failing to link.
//
// Every function returns NULL on success or a malloc'd message that the caller frees with
// modelgate_cuda_free_message; no C++ exception crosses into Rust.

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "shim.h"

using modelgate_shim::guarded;

namespace {

c10::Device cuda_device(int index) {
  return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
}

}  // namespace

extern "C" {

// Makes GPU `index` this thread's current device and a stream from libtorch's pool its
// current stream on that device: every copy and kernel the thread issues from then on goes
// to that stream, so workers on one GPU overlap instead of queueing on the default stream.
char* modelgate_cuda_bind_thread(int index) {
  return guarded([index] {
    const auto* cuda = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Device device = cuda_device(index);
    cuda->setDevice(device);
    cuda->exchangeStream(cuda->getStreamFromGlobalPool(device, /*isHighPriority=*/false));
  });
}

// Blocks until everything this thread queued on GPU `index` (its current stream) is done.
char* modelgate_cuda_synchronize_thread_stream(int index) {
  return guarded([index] {
    const auto* cuda = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    cuda->synchronizeStream(cuda->getStream(cuda_device(index)));
  });
}

// The CUDA caching allocator's allocated bytes on GPU `index`, all pools together: now in
// `*current`, and the most since the last reset in `*peak`. With `reset_peak`, the peak is
// reset to the current value first.
char* modelgate_cuda_allocated_bytes(int index, int reset_peak, int64_t* current,
                                     int64_t* peak) {
  return guarded([&] {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto device = static_cast<c10::DeviceIndex>(index);
    if (reset_peak != 0) {
      allocator->resetPeakStats(device);
    }
    const auto stats = allocator->getDeviceStats(device);
    const auto& bytes =
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    *current = bytes.current;
    *peak = bytes.peak;
  });
}

void modelgate_cuda_free_message(char* message) { modelgate_shim::release(message); }

}  // extern "C"
