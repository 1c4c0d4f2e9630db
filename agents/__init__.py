"""textrl agents, one module each, built by name: ``agent_class("ppo")``."""

from textrl.agents.base import (
    AGENTS,
    ALIASES,
    Agent,
    OnPolicyConfig,
    UpdateConfig,
    agent_class,
    canonical_agent,
    register_agent,
)

__all__ = ["ALIASES", "AGENTS", "Agent", "OnPolicyConfig", "UpdateConfig", "agent_class", "canonical_agent", "register_agent"]
