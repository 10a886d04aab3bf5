"""Chat gateway: platform webhooks in, one timed session per conversation, replies out."""
