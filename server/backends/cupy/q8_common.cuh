// Shared by the q8kv CUDA kernels: the per-item metadata row and small device helpers.
// The host (packing.py) writes one row of META_STRIDE int32 per batch item.
#pragma once

#define META_STRIDE 32
#define M_Q 0        // byte offset of q in the input buffer
#define M_K 1        // byte offset of k
#define M_V 2        // byte offset of v
#define M_DT 3       // input dtype: 0 float32, 1 float16, 2 bfloat16
#define M_PT 4       // index of the item's page table in the page-table array
#define M_START 5    // tokens in the layer before this append
#define M_N 6        // new tokens
#define M_H 7        // query heads
#define M_KVH 8      // kv heads
#define M_LOGT 9     // log2(tokens per page)
#define M_OUT 10     // float offset of the item's output [n, H, D]
#define M_SCALE 11   // softmax scale * log2(e), float bits
#define M_UNIT 12    // first attention work unit of the item (within its launch)
#define M_NSPLIT 13  // splits of the sequence per row tile
#define M_CHUNK 14   // tokens per split
#define M_RT 15      // row tiles per kv head
#define M_G 16       // query heads per kv head
#define M_CNT 17     // first split counter of the item (within its launch)
#define M_QB 18      // first quantization block of the item (append launch)
#define M_D 19       // head_dim

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  float f;
  asm("{.reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t;}" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
  return __uint_as_float(((unsigned)h) << 16);
}

// Index of the last row r in [0, n) with meta[r * META_STRIDE + col] <= key (rows sorted).
__device__ __forceinline__ int find_item(const int* meta, int n, int col, int key) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (__ldg(meta + mid * META_STRIDE + col) <= key) lo = mid; else hi = mid - 1;
  }
  return lo;
}
