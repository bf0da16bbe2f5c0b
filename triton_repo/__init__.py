"""Triton model repository templates (config.pbtxt.in + Python-backend models); `ttd triton build`
fills them in from an export directory."""
