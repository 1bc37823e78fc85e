"""LLM engines: TextGrad's engine interface over OpenAI-compatible servers or any registered backend."""
