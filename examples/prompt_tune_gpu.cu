// prompt_tune_gpu — examples/prompt_tune on the GPU. This file is the whole difference: the model
// types' Backend slot (examples/model_dispatch.hpp) is backend::Cuda instead of backend::Cpu, and
// nvcc compiles the program. Flags, data, the training loop (train/prompt_tuning.hpp, federated
// included), checkpoints and outputs are prompt_tune's; the forward and the prompt's backward run
// on the GPU through nn::Transformer<…, backend::Cuda> (mopt/backend/cuda/transformer.cuh).
//
//   prompt_tune_gpu --model models/dense-brown --policy mop --experts 7 --prompt-len 28 --inject-layer 1
#include <mopt/nn/linear_role.hpp>  // before the rest of the model's headers (see tests/backend/cuda)

#include <mopt/backend/cuda/transformer.cuh>

#define MOPT_EXAMPLE_BACKEND ::mopt::backend::Cuda
#include "prompt_tune.cpp"
