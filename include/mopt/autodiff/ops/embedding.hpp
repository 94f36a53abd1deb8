#pragma once
// Token embedding lookup: a gather of table rows; the backward scatter-adds into the table, so a
// token seen twice gets both gradients.
#include "mopt/autodiff/ops/routing.hpp"

namespace mopt::autodiff {

// table: [vocab, d], ids: i32 [...] (at most 3-D) -> [..., d]
inline Var embedding(const Var& table, const Tensor& ids) { return ops_detail::gather_rows_impl("embedding", table, ids); }

}  // namespace mopt::autodiff
