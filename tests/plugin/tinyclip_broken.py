"""A third-party plugin that cannot be imported: tinyclip must list it as unavailable, not crash."""
raise ImportError("tinyclip_broken is broken on purpose")
