// A downstream program built against an installed mopt: trains y = 3x with one parameter.
#include <cmath>
#include <cstdio>
#include <mopt/mopt.hpp>

int main() {
    using namespace mopt::autodiff;
    Parameter w("w", mopt::Tensor::zeros({1, 1}));
    mopt::train::SGD opt({&w}, {.lr = 0.1f});
    const auto x = mopt::Tensor::full({8, 1}, 1.0f), y = mopt::Tensor::full({8, 1}, 3.0f);
    Tape tape;
    for (int step = 0; step < 100; ++step) {
        tape.reset();
        Var d = sub(linear(tape.constant(x), tape.parameter(w)), tape.constant(y));
        tape.backward(mean(mul(d, d)));
        opt.step();
    }
    std::printf("w = %.4f\n", w.value().at(0));
    return std::abs(w.value().at(0) - 3.0f) < 1e-3f ? 0 : 1;
}
