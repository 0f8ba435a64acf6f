// AOTInductor packages (model.pt2) through libtorch's AOTIModelPackageLoader, which tch does
// not expose: read a package's metadata, load it, run it, free it.
//
// Tensors cross as `at::Tensor*`, the pointer type tch's own C API uses: inputs are
// borrowed, outputs are `new at::Tensor` that Rust owns (tch frees them with `delete`).
//
// Every function returns NULL on success or a malloc'd message that the caller frees with
// modelgate_aoti_free_buffer; no C++ exception crosses into Rust.

#include <ATen/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "shim.h"

using modelgate_shim::guarded;
using modelgate_shim::malloc_array;

namespace {

// The model inside a package that modelgate serves (the name aoti_compile_and_package
// gives a single model).
const char* const MODEL_NAME = "model";

}  // namespace

struct modelgate_aoti {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

extern "C" {

// The libtorch version these headers (and so the linked library) are, as "MAJOR.MINOR".
const char* modelgate_aoti_torch_version() {
  static const std::string version =
      std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  return version.c_str();
}

// The package's metadata without loading its model: `*entries` becomes a malloc'd buffer of
// `*length` bytes holding key\0value\0 pairs.
char* modelgate_aoti_metadata(const char* path, char** entries, size_t* length) {
  return guarded([&] {
    auto metadata =
        torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, MODEL_NAME);
    std::string packed;
    for (const auto& [key, value] : metadata) {
      packed.append(key).push_back('\0');
      packed.append(value).push_back('\0');
    }
    char* buffer = malloc_array<char>(packed.size());
    std::memcpy(buffer, packed.data(), packed.size());
    *entries = buffer;
    *length = packed.size();
  });
}

// Loads the package with `runners` model instances (calls beyond that many at once wait
// for a free one) on device index `device_index` (-1: the package's default), and sets
// `*bytes` to its constants' bytes (the runners share one set).
char* modelgate_aoti_load(const char* path, size_t runners, int device_index,
                          modelgate_aoti** loaded, size_t* bytes) {
  return guarded([&] {
    auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, MODEL_NAME, /*run_single_threaded=*/false, runners,
        static_cast<c10::DeviceIndex>(device_index));
    std::unordered_set<const void*> seen;
    size_t total = 0;
    for (const auto& [name, tensor] :
         loader->get_runner()->extract_constants_map(/*use_inactive=*/false)) {
      if (tensor.defined() && tensor.has_storage() &&
          seen.insert(tensor.storage().unsafeGetStorageImpl()).second) {
        total += tensor.storage().nbytes();
      }
    }
    *bytes = total;
    *loaded = new modelgate_aoti{std::move(loader)};
  });
}

// Runs the package on `count` borrowed inputs. On a CUDA device (`cuda_index` >= 0) it runs
// on the calling thread's current stream on that device (the worker's own). `*outputs`
// becomes a malloc'd array of `*output_count` owned tensors.
char* modelgate_aoti_run(modelgate_aoti* model, const at::Tensor* const* inputs, size_t count,
                         int cuda_index, at::Tensor*** outputs, size_t* output_count) {
  return guarded([&] {
    std::vector<at::Tensor> arguments;
    arguments.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      arguments.push_back(*inputs[i]);
    }
    void* stream = nullptr;
    if (cuda_index >= 0) {
      const auto* cuda = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
      stream = cuda
                   ->getStream(c10::Device(c10::DeviceType::CUDA,
                                           static_cast<c10::DeviceIndex>(cuda_index)))
                   .native_handle();
    }
    std::vector<at::Tensor> results = model->loader->run(arguments, stream);
    auto** owned = malloc_array<at::Tensor*>(results.size());
    for (size_t i = 0; i < results.size(); ++i) {
      owned[i] = new at::Tensor(std::move(results[i]));
    }
    *outputs = owned;
    *output_count = results.size();
  });
}

// Frees the loaded package (and the directory it unpacked into).
void modelgate_aoti_free(modelgate_aoti* model) {
  try {
    delete model;
  } catch (...) {
  }
}

void modelgate_aoti_free_buffer(void* buffer) { modelgate_shim::release(buffer); }

}  // extern "C"
