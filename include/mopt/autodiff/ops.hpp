#pragma once
// All differentiable CPU ops, one file per family.
#include "mopt/autodiff/ops/elementwise.hpp"
#include "mopt/autodiff/ops/linear.hpp"
