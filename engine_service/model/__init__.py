"""The model's forward pass: paged attention plugged into transformers (`attention`), the Llama-family fast path
(`llama`) with its matrix products (`linear`), our AVX2 kernels (`cpu_kernels`) and a GGUF-sourced model's own
weight blocks (`gguf_weights`). The model runner (engine_service.model_runner) drives them."""
