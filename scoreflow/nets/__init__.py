"""Neural networks: the DDPM++ score network and the Flow++ variational dequantiser."""
