#pragma once
// mopt::Error — the one exception type of the library. Messages name the file, tensor, shape,
// op or flag that is wrong, so a researcher can fix the input without a debugger.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mopt {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
[[nodiscard]] std::string concat(Args&&... args) {
    std::ostringstream os;
    (os << ... << std::forward<Args>(args));
    return os.str();
}
}  // namespace detail

// Throws mopt::Error with the streamed arguments as message when `cond` is false.
template <class... Args>
void check(bool cond, Args&&... args) {
    if (!cond) throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace mopt
