// Which compiled variant of the SIMD kernels runs (csrc/dispatch.cpp).
#pragma once

namespace fastface {

// Instruction-set level of the SIMD kernels (align, IVF-PQ scan) chosen for this CPU, e.g.
// "x86-64-v4"; "native" for a -march=native build, "generic" elsewhere.
const char* align_isa();

// Comma-separated levels compiled into this module.
const char* align_isa_variants();

}  // namespace fastface
