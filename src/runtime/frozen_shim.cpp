// Frozen TorchScript: torch::jit::freeze and optimize_for_inference at load, which tch does
// not expose. An optimized module cannot be saved and loaded back (its graph holds
// constants serialization refuses), so it is kept and run here.
//
// Tensors cross as `at::Tensor*`, as in aoti_shim.cpp: inputs borrowed, outputs owned by
// Rust. Every function returns NULL on success or a malloc'd message (freed with
// modelgate_aoti_free_buffer); no C++ exception crosses into Rust.

#include <ATen/Tensor.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::string& text) {
  char* copy = static_cast<char*>(std::malloc(text.size() + 1));
  if (copy != nullptr) {
    std::memcpy(copy, text.data(), text.size());
    copy[text.size()] = '\0';
  }
  return copy;
}

template <typename F>
char* guarded_call(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

template <typename T>
T* malloc_array(size_t count) {
  auto* array = static_cast<T*>(std::malloc(sizeof(T) * (count + 1)));
  if (array == nullptr) {
    throw std::bad_alloc();
  }
  return array;
}

}  // namespace

struct modelgate_frozen {
  torch::jit::Module module;
};

extern "C" {

// Loads the TorchScript file at `path` onto the device (`cuda_index` < 0: the CPU), freezes
// it keeping `methods` (forward is always kept) and optimizes it for inference.
char* modelgate_frozen_load(const char* path, int cuda_index, const char* const* methods,
                            size_t method_count, modelgate_frozen** loaded) {
  return guarded_call([&] {
    const c10::Device device = cuda_index < 0
                                   ? c10::Device(c10::DeviceType::CPU)
                                   : c10::Device(c10::DeviceType::CUDA,
                                                 static_cast<c10::DeviceIndex>(cuda_index));
    torch::jit::Module module = torch::jit::load(path, device);
    module.eval();
    std::vector<std::string> others;
    for (size_t i = 0; i < method_count; ++i) {
      if (std::string(methods[i]) != "forward") {
        others.emplace_back(methods[i]);
      }
    }
    torch::jit::Module frozen = torch::jit::freeze(module, others);
    *loaded = new modelgate_frozen{torch::jit::optimize_for_inference(frozen, others)};
  });
}

// Runs `method` on `count` borrowed inputs. The result is flattened into `*outputs` (a
// malloc'd array of `*output_count` owned tensors) with its form: 0 a tensor, 1 a tuple or
// list, 2 a Dict[str, Tensor] whose keys are `*keys` (malloc'd, `*keys_length` bytes of
// NUL-terminated names in the tensors' order).
char* modelgate_frozen_run(modelgate_frozen* model, const char* method,
                           const at::Tensor* const* inputs, size_t count, int* form,
                           at::Tensor*** outputs, size_t* output_count, char** keys,
                           size_t* keys_length) {
  return guarded_call([&] {
    std::vector<c10::IValue> stack;
    stack.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      stack.emplace_back(*inputs[i]);
    }
    c10::IValue result = model->module.get_method(method)(std::move(stack));
    std::vector<at::Tensor> tensors;
    std::string names;
    if (result.isTensor()) {
      *form = 0;
      tensors.push_back(result.toTensor());
    } else if (result.isTuple() || result.isList()) {
      *form = 1;
      const auto items = result.isTuple() ? result.toTupleRef().elements().vec()
                                          : result.toListRef().vec();
      for (const auto& item : items) {
        TORCH_CHECK(item.isTensor(), "a method must return a tensor, a tuple of tensors or a "
                                     "Dict[str, Tensor]; an element is ", item.tagKind());
        tensors.push_back(item.toTensor());
      }
    } else if (result.isGenericDict()) {
      *form = 2;
      for (const auto& entry : result.toGenericDict()) {
        TORCH_CHECK(entry.key().isString() && entry.value().isTensor(),
                    "a method must return a Dict[str, Tensor]");
        names.append(entry.key().toStringRef()).push_back('\0');
        tensors.push_back(entry.value().toTensor());
      }
    } else {
      TORCH_CHECK(false, "a method must return a tensor, a tuple of tensors or a "
                         "Dict[str, Tensor], not ", result.tagKind());
    }
    char* packed = malloc_array<char>(names.size());
    std::memcpy(packed, names.data(), names.size());
    auto** owned = malloc_array<at::Tensor*>(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      owned[i] = new at::Tensor(std::move(tensors[i]));
    }
    *outputs = owned;
    *output_count = tensors.size();
    *keys = packed;
    *keys_length = names.size();
  });
}

void modelgate_frozen_free(modelgate_frozen* model) {
  try {
    delete model;
  } catch (...) {
  }
}

}  // extern "C"
