"""The vLLM attention backend (imported by vLLM through its registered path only)."""
