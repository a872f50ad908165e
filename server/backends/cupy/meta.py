"""The per-item metadata row the host writes and the kernels read: META int32 columns, the
M_* indices (q8_common.cuh defines the same, for the kernels). Shared by packing.py, which
fills the rows, and planning.py, which writes their launch columns."""

META = 32  # int32 per item row (META_STRIDE in q8_common.cuh)
(M_Q, M_K, M_V, M_DT, M_PT, M_START, M_N, M_H, M_KVH, M_LOGT, M_OUT, M_SCALE, M_UNIT,
 M_NSPLIT, M_CHUNK, M_RT, M_G, M_CNT, M_QB, M_D, M_TILES) = range(21)  # fmt: skip
