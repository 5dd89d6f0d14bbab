"""Split LLaMA prefill between a trusted CPU (the TEE) and an untrusted GPU, and measure what it costs."""
