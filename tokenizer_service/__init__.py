"""The CPU tokenizer service: prompt/chat encoding and incremental, UTF-8-safe detokenization."""
