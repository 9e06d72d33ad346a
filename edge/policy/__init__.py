"""Who may call, and how often: keys, limits, bans, client addresses, connection caps."""
