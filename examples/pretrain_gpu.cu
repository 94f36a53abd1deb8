// pretrain_gpu — examples/pretrain on the GPU. This file is the whole difference: the model types'
// Backend slot is backend::Cuda instead of backend::Cpu, and nvcc compiles the program. Flags, data,
// the loop (AdamW, warmup + cosine, clipping), checkpoints with exact resume, the log, the plot and
// the outputs are pretrain's; the forward, the backward to every weight and (from the second step
// on, through train::step) the clipping and AdamW run on the GPU through nn::Transformer<…,
// backend::Cuda> (mopt/backend/cuda/transformer.cuh): weights, gradients and moments stay there, the
// host's copy is fetched for checkpoints and the saved model. Dense and Switch models.
//
//   pretrain_gpu --corpus brown --arch dense  --out runs/dense-gpu  --steps 4000
//   pretrain_gpu --corpus brown --arch switch --out runs/switch-gpu --steps 4000
#include <mopt/nn/linear_role.hpp>  // before the rest of the model's headers (see tests/backend/cuda)

#include <mopt/backend/cuda/transformer.cuh>

#define MOPT_EXAMPLE_BACKEND ::mopt::backend::Cuda
#include "pretrain.cpp"
