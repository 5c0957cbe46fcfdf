"""Target-neutral quantization into QDQ form: calibration, int8, int4 weights, fp16, accuracy budget."""
