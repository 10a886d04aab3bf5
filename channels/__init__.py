"""Channel adapters: one per platform, all behind ``channels.base.ChannelAdapter``."""
