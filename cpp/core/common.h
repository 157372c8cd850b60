// Shared error types and small helpers for the x2l-edge core.
#pragma once
#include <stdexcept>
#include <string>

namespace x2l {

// Any failure the caller can act on (bad argument, budget exceeded, unsupported feature).
class Error : public std::runtime_error {
  public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// A malformed or unsupported model file. Mapped to x2l_edge.FormatError (a ValueError) in Python.
class FormatError : public Error {
  public:
    explicit FormatError(const std::string& msg) : Error(msg) {}
};

// A memory budget or allocation limit would be exceeded. Mapped to x2l_edge.BudgetError (a MemoryError).
class BudgetError : public Error {
  public:
    explicit BudgetError(const std::string& msg) : Error(msg) {}
};

// A file that cannot be opened, read or written: errno says why. Mapped to OSError(errno, msg, path),
// which Python turns into FileNotFoundError, IsADirectoryError, PermissionError, ...
class FileError : public Error {
  public:
    FileError(int err, const std::string& path, const std::string& msg) : Error(msg), err_(err), path_(path) {}
    int err() const { return err_; }
    const std::string& path() const { return path_; }

  private:
    int err_;
    std::string path_;
};

// A long call stopped because its caller asked (Interrupt::request(), Ctrl-C). Mapped to
// x2l_edge.CancelledError (or KeyboardInterrupt when a signal caused it).
class Cancelled : public Error {
  public:
    explicit Cancelled(const std::string& msg) : Error(msg) {}
};

}  // namespace x2l
