// Stands in for ATen's CUDA context header when build.py compiles csrc/cuda for the host: the kernels
// include this one, and find the emulated runtime (../../../cuda_emulation.h) instead of CUDA's.
#pragma once

#include "../../../cuda_emulation.h"
