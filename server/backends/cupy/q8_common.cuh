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
#define M_TILES 20   // first 16-bit K/V tile pair of the item (q8_prefill_ws.cu's scratch)

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  float f;
  asm("{.reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t;}" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
  return __uint_as_float(((unsigned)h) << 16);
}

// Two floats -> one register of two 16-bit values (lo = a), round to nearest even.
template <bool BF16>
__device__ __forceinline__ unsigned pack2(float a, float b) {
  unsigned r;
  if (BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}

// code * scale in float32, rounded once to the 16-bit type: a 16-bit K/V tile of
// q8_prefill_ws.cu, written alike by q8_append (new tokens) and q8_kv_tiles (cached ones).
// 8 codes (two registers) -> 8 values (16 bytes).
template <bool BF16>
__device__ __forceinline__ unsigned dequant2_16bit(unsigned w, int byte, float s) {
  const float a = (float)(signed char)((w >> (8 * byte)) & 0xffu);
  const float b = (float)(signed char)((w >> (8 * byte + 8)) & 0xffu);
  return pack2<BF16>(a * s, b * s);
}
template <bool BF16>
__device__ __forceinline__ uint4 dequant8_16bit(unsigned w0, unsigned w1, float s) {
  return make_uint4(dequant2_16bit<BF16>(w0, 0, s), dequant2_16bit<BF16>(w0, 2, s),
                    dequant2_16bit<BF16>(w1, 0, s), dequant2_16bit<BF16>(w1, 2, s));
}
// Byte offset of (token t, dims 8 c8 .. 8 c8 + 7) in a 16-bit K or V tile of q8_prefill_ws.cu:
// wgmma's canonical no-swizzle layout, core matrices of 8 tokens x 16 bytes, core (t / 8, c8)
// at (t / 8) * 16 D + c8 * 128 bytes.
__device__ __forceinline__ int tile_offset(int t, int c8, int D) {
  return (t >> 3) * 16 * D + c8 * 128 + (t & 7) * 16;
}
#define PF_TILE 64  // tokens per tile (BN of q8_prefill_ws.cu)
// An item's tile pairs in that scratch: from its first (M_TILES), kv head by kv head,
// ceil((start + n) / PF_TILE) a head; pair (h, j) holds tokens [j PF_TILE, (j + 1) PF_TILE)
// of kv head h.
__device__ __forceinline__ int pairs_per_head(int start, int n) {
  return (start + n + PF_TILE - 1) / PF_TILE;
}
__device__ __forceinline__ int pairs_per_head(const int* im) {
  return pairs_per_head(im[M_START], im[M_N]);
}
__device__ __forceinline__ long long tile_pair(const int* im, int h, int j) {
  return (long long)im[M_TILES] + (long long)h * pairs_per_head(im) + j;
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
