"""Tools around the library: the throughput benchmark (`bench`, run as
`python -m jaxdml.bench`), the GPU/TPU report (`device_check`, `python -m
jaxdml.device_check`) with PyTorch's step beside jaxdml's (`torch_step`,
`torch_reference`), the ablation runner (`ablate`) and the search timing
harness (`search_bench`)."""
