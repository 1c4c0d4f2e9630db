"""textrl environments: token-level text generation envs, reward wrappers and scorers (see issue 3)."""
