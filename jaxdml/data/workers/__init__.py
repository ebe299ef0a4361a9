"""The data workers: processes that make training batches beside the training
process (`processes`), handing them over in shared memory (`shared_batches`).
They import no JAX. `jaxdml.data.pipeline` starts them."""
