"""Where a request goes: the tunnel's end, its monitor and gate, the embedded SSH server."""
