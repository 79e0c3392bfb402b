"""CPU kernels of one-token decoding (`kernels`, built from kernels.cpp on first use), the float16/int8
linear layers that use them (`quantized`) and the fused one-token step of a whole model (`fused`)."""
