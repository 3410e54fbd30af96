"""bitlm-quantization: int8-dynamic and int4 weight formats for `bitlm quantize --scheme`."""
