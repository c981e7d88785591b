"""Chat roles accepted on the public API (checked by the gateway) and by the tokenizer service."""
CHAT_ROLES = ("system", "user", "assistant", "tool")
