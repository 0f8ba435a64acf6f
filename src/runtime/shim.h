// What every C++ shim shares: the error convention (NULL on success, else a malloc'd
// message the Rust side frees with free(); no C++ exception crosses into Rust) and
// malloc'd arrays handed over to Rust.

#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>

namespace modelgate_shim {

// The message of an error whose own message could not be allocated: never NULL, which
// would read as success. Static, so `release` must be what frees messages.
inline char* out_of_memory_message() {
  static char text[] = "out of memory (and for the error's message)";
  return text;
}

// A malloc'd, NUL-terminated copy of the `size` bytes at `text`, or the static
// out-of-memory message. Never throws: it runs inside catch handlers, whence an exception
// would unwind into Rust.
inline char* copy_of(const char* text, size_t size) noexcept {
  char* copy = static_cast<char*>(std::malloc(size + 1));
  if (copy == nullptr) {
    return out_of_memory_message();
  }
  std::memcpy(copy, text, size);
  copy[size] = '\0';
  return copy;
}

inline char* copy_of(const char* text) noexcept {
  return copy_of(text, std::strlen(text));
}

inline char* copy_of(const std::string& text) noexcept {
  return copy_of(text.data(), text.size());
}

// Frees what a shim handed over: a message or an array (never the static message).
inline void release(void* buffer) {
  if (buffer != out_of_memory_message()) {
    std::free(buffer);
  }
}

// Runs `body`: NULL when it returns, the message of what it threw otherwise. noexcept:
// should anything still throw, the process terminates rather than unwinding into Rust.
template <typename F>
char* guarded(F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_of(e.what());
  } catch (...) {
    return copy_of("unknown C++ exception");
  }
}

// A malloc'd array of `count` Ts (one more, so that a count of 0 is not NULL); throws
// std::bad_alloc, which `guarded` turns into a message.
template <typename T>
T* malloc_array(size_t count) {
  auto* array = static_cast<T*>(std::malloc(sizeof(T) * (count + 1)));
  if (array == nullptr) {
    throw std::bad_alloc();
  }
  return array;
}

}  // namespace modelgate_shim
