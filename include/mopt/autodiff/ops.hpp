#pragma once
// All differentiable CPU ops, one file per family.
#include "mopt/autodiff/ops/elementwise.hpp"
#include "mopt/autodiff/ops/linear.hpp"
#include "mopt/autodiff/ops/packed_linear.hpp"
#include "mopt/autodiff/ops/activation.hpp"
#include "mopt/autodiff/ops/norm.hpp"
#include "mopt/autodiff/ops/softmax.hpp"
#include "mopt/autodiff/ops/distill.hpp"
#include "mopt/autodiff/ops/embedding.hpp"
#include "mopt/autodiff/ops/sequence.hpp"
#include "mopt/autodiff/ops/rope.hpp"
#include "mopt/autodiff/ops/attention.hpp"
#include "mopt/autodiff/ops/routing.hpp"
