// TorchScript modules, loaded and run here rather than through tch for what tch does not
// expose: a module's tensor bytes (its resident footprint), and torch::jit::freeze with
// optimize_for_inference at load (`--freeze_models`). An optimized module cannot be saved
// and loaded back (its graph holds constants serialization refuses), so it is kept here.
//
// Tensors cross as `at::Tensor*`, as in aoti_shim.cpp: inputs borrowed, outputs owned by
// Rust. Every function returns NULL on success or a malloc'd message (freed with
// modelgate_aoti_free_buffer); no C++ exception crosses into Rust.

#include <ATen/Tensor.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "shim.h"

using modelgate_shim::guarded;
using modelgate_shim::malloc_array;

namespace {

// Counts each distinct storage once (tied weights, a constant shared by two methods).
struct StorageBytes {
  std::unordered_set<const void*> seen;
  size_t bytes = 0;

  void add(const at::Tensor& tensor) {
    if (tensor.defined() && tensor.has_storage() &&
        seen.insert(tensor.storage().unsafeGetStorageImpl()).second) {
      bytes += tensor.storage().nbytes();
    }
  }

  // Tensor constants in `block` and the blocks nested in it (loops, branches).
  void add_constants(torch::jit::Block* block) {
    for (torch::jit::Node* node : block->nodes()) {
      if (node->kind() == c10::prim::Constant && node->outputs().size() == 1 &&
          node->output()->type()->cast<c10::TensorType>()) {
        const std::optional<c10::IValue> value = torch::jit::toIValue(node->output());
        if (value && value->isTensor()) {
          add(value->toTensor());
        }
      }
      for (torch::jit::Block* nested : node->blocks()) {
        add_constants(nested);
      }
    }
  }
};

// The bytes of the distinct storages behind a module's tensors: parameters, buffers and
// tensor attributes of every submodule, and the tensor constants in their methods' graphs
// (where torch.jit.trace puts tensors that are not parameters, and where a module saved
// frozen keeps all its weights).
size_t tensor_bytes(const torch::jit::Module& module) {
  StorageBytes storages;
  for (const auto& attribute : module.named_attributes(/*recurse=*/true)) {
    if (attribute.value.isTensor()) {
      storages.add(attribute.value.toTensor());
    }
  }
  for (const torch::jit::Module& each : module.modules()) {
    for (const torch::jit::Method& method : each.get_methods()) {
      storages.add_constants(method.graph()->block());
    }
  }
  return storages.bytes;
}

// How an error names a value that is not a tensor.
std::string kind_of(const c10::IValue& value) {
  if (value.isNone()) return "None";
  if (value.isDouble()) return "a float";
  if (value.isInt()) return "an int";
  if (value.isBool()) return "a bool";
  if (value.isString()) return "a string";
  if (value.isTuple() || value.isList()) return "a nested sequence";
  if (value.isGenericDict()) return "a nested dict";
  return "not a tensor";
}

}  // namespace

struct modelgate_script {
  torch::jit::Module module;
};

extern "C" {

// Loads the TorchScript file at `path` onto the device (`cuda_index` < 0: the CPU) in eval
// mode and sets `*bytes` to its tensors' bytes. With `freeze`, freezes it keeping `methods`
// (forward is always kept) and optimizes it for inference (the bytes are counted before:
// the frozen module's constants are those weights, or weights folded from them).
char* modelgate_script_load(const char* path, int cuda_index, int freeze,
                            const char* const* methods, size_t method_count,
                            modelgate_script** loaded, size_t* bytes) {
  return guarded([&] {
    const c10::Device device = cuda_index < 0
                                   ? c10::Device(c10::DeviceType::CPU)
                                   : c10::Device(c10::DeviceType::CUDA,
                                                 static_cast<c10::DeviceIndex>(cuda_index));
    torch::jit::Module module = torch::jit::load(path, device);
    module.eval();
    *bytes = tensor_bytes(module);
    if (freeze == 0) {
      *loaded = new modelgate_script{std::move(module)};
      return;
    }
    std::vector<std::string> others;
    for (size_t i = 0; i < method_count; ++i) {
      if (std::string(methods[i]) != "forward") {
        others.emplace_back(methods[i]);
      }
    }
    torch::jit::Module frozen = torch::jit::freeze(module, others);
    *loaded = new modelgate_script{torch::jit::optimize_for_inference(frozen, others)};
  });
}

// Runs `method` on `count` borrowed inputs. The result is flattened into `*outputs` (a
// malloc'd array of `*output_count` owned tensors) with its form: 0 a tensor, 1 a tuple or
// list, 2 a Dict[str, Tensor] whose keys are `*keys` (malloc'd, `*keys_length` bytes of
// NUL-terminated names in the tensors' order), 3 anything else (no tensors; `*keys` names
// what it was, for the error).
char* modelgate_script_run(modelgate_script* model, const char* method,
                           const at::Tensor* const* inputs, size_t count, int* form,
                           at::Tensor*** outputs, size_t* output_count, char** keys,
                           size_t* keys_length) {
  return guarded([&] {
    std::vector<c10::IValue> stack;
    stack.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      stack.emplace_back(*inputs[i]);
    }
    c10::IValue result = model->module.get_method(method)(std::move(stack));
    std::vector<at::Tensor> tensors;
    std::string names;
    // What is not a tensor where one belongs: form 3, `names` saying where and what.
    const auto refuse = [&](const std::string& what, const c10::IValue& value) {
      *form = 3;
      tensors.clear();
      names = what + " is " + kind_of(value);
    };
    if (result.isTensor()) {
      *form = 0;
      tensors.push_back(result.toTensor());
    } else if (result.isTuple() || result.isList()) {
      *form = 1;
      const auto items = result.isTuple() ? result.toTupleRef().elements().vec()
                                          : result.toListRef().vec();
      for (const auto& item : items) {
        if (!item.isTensor()) {
          refuse("a tuple element", item);
          break;
        }
        tensors.push_back(item.toTensor());
      }
    } else if (result.isGenericDict()) {
      *form = 2;
      for (const auto& entry : result.toGenericDict()) {
        if (!entry.key().isString()) {
          refuse("a dict key", entry.key());
          break;
        }
        if (!entry.value().isTensor()) {
          refuse("dict entry '" + entry.key().toStringRef() + "'", entry.value());
          break;
        }
        const std::string& key = entry.key().toStringRef();
        if (key.find('\0') != std::string::npos) {
          // The names travel NUL-separated: such a key would shift every later name.
          *form = 3;
          tensors.clear();
          names = "a dict key with a NUL byte in it";
          break;
        }
        names.append(key).push_back('\0');
        tensors.push_back(entry.value().toTensor());
      }
    } else {
      refuse("the method's result", result);
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

void modelgate_script_free(modelgate_script* model) {
  try {
    delete model;
  } catch (...) {
  }
}

}  // extern "C"
