// What the CUDA kernel headers (gspn_scan_kernels.h, gspn_propagate_kernels.h) share.
//
// The kernel headers hold the __global__ kernels, their __device__ helpers and the host-side launch
// planning (grid, block, shared memory) with plain pointers, integers and template scalar types: no
// ATen, no CUDA runtime calls.  nvcc compiles them inside the .cu launchers; the test suite compiles
// the same headers with a host C++ compiler under a CUDA host emulation (tests/cuda_emu/), which runs
// every CUDA thread of a block as a host thread, so the kernel bodies are executed on machines
// without a GPU.  Anything added to these headers must compile in both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../gspn_step.h"

// A kernel's dynamic shared memory (the `shared_bytes` of its launch), 16-byte aligned.  The host
// emulation defines it first, as a pointer to the running block's shared memory.
#ifndef GSPN_DYNAMIC_SHARED
#define GSPN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
