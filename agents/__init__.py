"""textrl agents, one module each, built by name: ``agent_class("ppo")``."""

from textrl.agents.base import AGENTS, Agent, agent_class, register_agent

__all__ = ["AGENTS", "Agent", "agent_class", "register_agent"]
